#!/usr/bin/env bash
# The test suite: installs what is missing, builds the executables the CLI tests run, runs
# every test. README's second command and .ci/run both call this.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
swift build
swift test
