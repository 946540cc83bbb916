// libfabric (Debian libfabric-dev) for one-sided RMA: the `tcp` provider (ofi_rxm over tcp)
// here, `verbs` on RDMA NICs, `efa` on AWS. Swift imports libfabric's entry points directly,
// including the static inline wrappers of fi_domain.h / fi_endpoint.h / fi_rma.h / fi_eq.h
// (fi_domain, fi_mr_reg, fi_endpoint, fi_enable, fi_read, fi_write, fi_cq_read, ...) and its
// plain integer flag macros (FI_RMA, FI_MR_LOCAL, FI_EAGAIN, ...). The prefixed shims below
// cover only what the importer cannot see, each with the reason.
#ifndef SPILLWAY_CSPILLWAYFABRIC_SHIM_H
#define SPILLWAY_CSPILLWAYFABRIC_SHIM_H
#include <rdma/fabric.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_rma.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>

// FI_VERSION is a function-like macro (not importable). The API version this build was
// compiled against: fi_getinfo then reports the attributes and mr_mode semantics of that version.
static inline uint32_t spillway_fi_version(void) {
    return FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION);
}

// FI_ADDR_UNSPEC is a macro with a cast ((uint64_t) -1), which Swift does not import.
static inline fi_addr_t spillway_fi_addr_unspec(void) {
    return FI_ADDR_UNSPEC;
}

// Every fid_* object embeds its `struct fid` as the first member; fi_close, fi_ep_bind,
// fi_mr_bind and fi_getname take that member's address. Swift can only form the address of a
// member through a temporary (`&x.pointee.fid`, valid for one call), and fi_ep_bind keeps it,
// so these return the real address.
static inline struct fid *spillway_fid_fabric(struct fid_fabric *object) { return &object->fid; }
static inline struct fid *spillway_fid_domain(struct fid_domain *object) { return &object->fid; }
static inline struct fid *spillway_fid_av(struct fid_av *object) { return &object->fid; }
static inline struct fid *spillway_fid_cq(struct fid_cq *object) { return &object->fid; }
static inline struct fid *spillway_fid_ep(struct fid_ep *object) { return &object->fid; }
static inline struct fid *spillway_fid_mr(struct fid_mr *object) { return &object->fid; }

#endif
