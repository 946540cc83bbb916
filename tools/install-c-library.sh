#!/usr/bin/env bash
# Builds the C ABI library (SwiftPM product SpillwayC) in release mode and installs it as
# PREFIX/lib/libspillway.so with PREFIX/include/spillway.h (PREFIX defaults to /usr/local).
# The library finds the Swift runtime through its RUNPATH (the toolchain's lib/swift/linux).
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${1:-/usr/local}"
swift build -c release --product SpillwayC >&2
install -d "$prefix/lib" "$prefix/include"
install -m 0755 .build/release/libSpillwayC.so "$prefix/lib/libspillway.so"
install -m 0644 include/spillway.h "$prefix/include/spillway.h"
echo "installed $prefix/lib/libspillway.so and $prefix/include/spillway.h"
