// libibverbs (Debian libibverbs-dev), imported as-is: device discovery
// (ibv_get_device_list, ibv_get_device_name, ibv_free_device_list) is plain exported
// functions. The verbs data path (queue pairs, memory registration) is not used yet: this
// build detects RDMA hardware and, finding none (or no verbs transport), falls back to TCP.
#ifndef SPILLWAY_CSPILLWAYVERBS_SHIM_H
#define SPILLWAY_CSPILLWAYVERBS_SHIM_H
#include <infiniband/verbs.h>
#endif
