#!/usr/bin/env bash
# The one list of system packages Spillway needs (build, tests, Bench). README's commands and
# .ci/run both call this. Installs only what is missing, so repeated runs are fast.
set -euo pipefail
packages=(
  pkg-config gcc
  liburing-dev          # NVMe tier (io_uring)
  libibverbs-dev librdmacm-dev   # RDMA transport (builds without a device; falls back to TCP)
  libfabric-dev         # one-sided RMA through libfabric (tcp provider here, verbs on RDMA NICs)
  libisal-dev           # CRC32C and Reed-Solomon erasure coding
  libxxhash-dev         # stable 128-bit KV prefix hashes
  liblz4-dev            # opt-in compression of spilled pages
  fio                   # NVMe reference in Bench/
  redis-server          # TCP round-trip reference in Bench/ (redis-benchmark)
  iperf3                # TCP bandwidth reference in Bench/
  iproute2              # network-namespace fault tests
  etcd-server           # cluster mode (SpillwayCluster): its tests start a real etcd 3.4 on loopback
  python3 python3-pytest python3-numpy   # the Python binding (python/) and its tests
  python3-venv python3-pip python3-setuptools python3-wheel   # the offline `pip install ./python` test (a venv)
  e2fsprogs util-linux mount   # NVMe tests: a small ext4 image on a loop device (ENOSPC, block device)
)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update
  $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi
if ! command -v swift >/dev/null 2>&1; then
  [ -x /opt/swift/usr/bin/swift ] && echo "swift is at /opt/swift/usr/bin: add it to PATH" >&2
  echo "install-deps: a Swift 6.1+ toolchain is required (swift.org/install)" >&2
  exit 1
fi
