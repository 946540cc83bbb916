#!/usr/bin/env bash
# The test suite: installs what is missing, builds the executables and the C library the
# tests run, runs every Swift test (including the C ABI program), then the Python binding's
# tests. README's second command and .ci/run both call this.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
swift build
swift test
# Debian's python3 (python3-pytest, python3-numpy from install-deps.sh), against the debug build.
SPILLWAY_LIBRARY="$PWD/.build/debug/libSpillwayC.so" /usr/bin/python3 -m pytest -q -p no:cacheprovider python/tests
