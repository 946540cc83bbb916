// xxHash (Debian libxxhash-dev), imported as-is: the XXH3 functions Spillway calls
// (XXH3_64bits_withSeed, XXH3_128bits_withSeed) are plain exported functions of libxxhash.so,
// so no wrappers are needed. XXH_INLINE_ALL is deliberately not defined: the library's
// exported, dispatching implementation is used.
#ifndef SPILLWAY_CSPILLWAYXXHASH_SHIM_H
#define SPILLWAY_CSPILLWAYXXHASH_SHIM_H
#include <xxhash.h>
#endif
