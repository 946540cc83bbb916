#!/usr/bin/env bash
# A multi-host network on one machine for Spillway's cluster tests: HOSTS network namespaces,
# each joined by a veth pair to one bridge in the root namespace (which the test process, the
# client host, reaches through the bridge's address). Needs root and iproute2.
#
#   tools/netns-cluster.sh up    PREFIX HOSTS NET   # namespaces PREFIX0…, host i at 10.NET.0.(i+1)/24,
#                                                   # bridge PREFIXbr at 10.NET.0.254
#   tools/netns-cluster.sh down  PREFIX HOSTS       # removes them (idempotent)
#   tools/netns-cluster.sh cut   PREFIX I           # partitions host I: its link goes down, its
#                                                   # packets vanish (no reset, as a pulled cable)
#   tools/netns-cluster.sh heal  PREFIX I
#   tools/netns-cluster.sh slow  PREFIX I RATE      # rate-limits host I both ways (tc tbf, e.g. 2mbit;
#                                                   # this kernel has no netem): a slow daemon
#   tools/netns-cluster.sh fast  PREFIX I           # removes the limit
#   tools/netns-cluster.sh probe                    # exit 0 if namespaces and veths can be made here
#
# PREFIX is at most 6 characters (interface names are PREFIXh12, PREFIXn12, PREFIXbr).
set -euo pipefail
command=${1:?usage: $0 up|down|cut|heal|probe ...}
case "$command" in
  probe)
    name="spwprobe$$"
    ip netns add "$name" 2>/dev/null || exit 1
    ip link add "${name:0:8}h" type veth peer name "${name:0:8}n" 2>/dev/null || { ip netns del "$name"; exit 1; }
    ip link del "${name:0:8}h" 2>/dev/null || true
    ip netns del "$name"
    ;;
  up)
    prefix=${2:?prefix}; hosts=${3:?hosts}; net=${4:?net}
    [ ${#prefix} -le 6 ] || { echo "prefix '$prefix' longer than 6 characters" >&2; exit 2; }
    ip link add "${prefix}br" type bridge
    ip addr add "10.$net.0.254/24" dev "${prefix}br"
    ip link set "${prefix}br" up
    for i in $(seq 0 $((hosts - 1))); do
      ip netns add "$prefix$i"
      ip link add "${prefix}h$i" type veth peer name "${prefix}n$i"
      ip link set "${prefix}n$i" netns "$prefix$i"
      ip link set "${prefix}h$i" master "${prefix}br" up
      ip -n "$prefix$i" addr add "10.$net.0.$((i + 1))/24" dev "${prefix}n$i"
      ip -n "$prefix$i" link set "${prefix}n$i" up
      ip -n "$prefix$i" link set lo up
      ip -n "$prefix$i" route add default via "10.$net.0.254" 2>/dev/null || true
    done
    ;;
  down)
    prefix=${2:?prefix}; hosts=${3:?hosts}
    for i in $(seq 0 $((hosts - 1))); do ip netns del "$prefix$i" 2>/dev/null || true; done
    ip link del "${prefix}br" 2>/dev/null || true
    ;;
  cut)  ip link set "${2:?prefix}h${3:?host}" down ;;
  heal) ip link set "${2:?prefix}h${3:?host}" up ;;
  slow)
    prefix=${2:?prefix}; host=${3:?host}; rate=${4:?rate}
    tc qdisc replace dev "${prefix}h$host" root tbf rate "$rate" burst 4kb latency 500ms
    ip netns exec "$prefix$host" tc qdisc replace dev "${prefix}n$host" root tbf rate "$rate" burst 4kb latency 500ms
    ;;
  fast)
    prefix=${2:?prefix}; host=${3:?host}
    tc qdisc del dev "${prefix}h$host" root 2>/dev/null || true
    ip netns exec "$prefix$host" tc qdisc del dev "${prefix}n$host" root 2>/dev/null || true
    ;;
  *) echo "unknown command $command" >&2; exit 2 ;;
esac
