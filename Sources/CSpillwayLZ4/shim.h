// LZ4 (Debian liblz4-dev), imported as-is: LZ4_compress_default, LZ4_decompress_safe and
// LZ4_compressBound are plain exported functions, so no wrappers are needed.
#ifndef SPILLWAY_CSPILLWAYLZ4_SHIM_H
#define SPILLWAY_CSPILLWAYLZ4_SHIM_H
#include <lz4.h>
#endif
