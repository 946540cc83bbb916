#!/usr/bin/env bash
# Builds the wire-protocol decoder with libFuzzer + AddressSanitizer and runs it.
#
#   tools/fuzz-protocol.sh [RUNS]     (default 10000000 inputs)
#
# Covers the frame decoder, every field decoder (handshake messages must round-trip) and the
# JSON string path of the daemon's `stats` reply.
#
# SwiftPM executables do not link libFuzzer's main, so the module's sources are compiled
# directly with swiftc together with a @_cdecl("LLVMFuzzerTestOneInput") entry point.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-10000000}"
out=.build/fuzz; mkdir -p "$out/corpus"
swiftc -parse-as-library -sanitize=fuzzer,address -O -g \
  -module-name SpillwayProtocol \
  -I Sources/CSpillwayISAL -I Sources/CSpillwayCopy -Xcc -I/usr/include -lisal \
  Sources/SpillwayProtocol/*.swift Sources/SpillwayCore/JSONValue.swift tools/fuzz/ProtocolFuzzTarget.swift \
  -o "$out/fuzz-protocol"
"$out/fuzz-protocol" -runs="$runs" -max_len=4096 "$out/corpus" 2>&1 | tail -5
