// ISA-L's public headers, imported as-is: every function Spillway calls is a plain extern
// function Swift can import, so no wrappers are needed here.
#ifndef SPILLWAY_CSPILLWAYISAL_SHIM_H
#define SPILLWAY_CSPILLWAYISAL_SHIM_H
#include <isa-l/crc.h>
#include <isa-l/erasure_code.h>
#endif
