// liburing (Debian liburing-dev) for the NVMe tier. Swift imports liburing's functions,
// including its static inline helpers, directly; the prefixed shims below cover only what the
// importer cannot see, each with the reason.
#ifndef SPILLWAY_CSPILLWAYURING_SHIM_H
#define SPILLWAY_CSPILLWAYURING_SHIM_H
// System headers first, with the default feature macros every other module sees: liburing.h
// defines _XOPEN_SOURCE, which would otherwise give fd_set a different member name here than
// in Glibc/Dispatch and break module merging.
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <signal.h>
#include <fcntl.h>
#include <sched.h>
#include <time.h>
#include <string.h>
#include <inttypes.h>
#include <liburing.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/file.h>

// IOSQE_FIXED_FILE is a macro expression over an enum constant, which Swift does not import.
static inline void spillway_io_uring_sqe_use_fixed_file(struct io_uring_sqe *sqe) {
    sqe->flags |= IOSQE_FIXED_FILE;
}

// O_DIRECT is only defined under _GNU_SOURCE, which the Glibc module is not built with;
// glibc's internal __O_DIRECT carries the architecture's value unconditionally.
static inline int spillway_o_direct(void) {
    return __O_DIRECT;
}

// ioctl is variadic (not importable); BLKGETSIZE64 gives a block device's size in bytes.
static inline int spillway_block_device_size(int fd, unsigned long long *bytes) {
    return ioctl(fd, BLKGETSIZE64, bytes);
}

// RWF_DSYNC is a macro with a cast (not importable); the flag makes one write durable
// (FUA or a cache flush after it) before it completes: the `durability = "power"` journal.
static inline int spillway_rwf_dsync(void) {
    return (int)RWF_DSYNC;
}

// rw_flags lives in an anonymous union of the SQE; a setter keeps Swift out of its layout.
static inline void spillway_io_uring_sqe_set_rw_flags(struct io_uring_sqe *sqe, int flags) {
    sqe->rw_flags = flags;
}

// LOCK_EX | LOCK_NB for flock(2): the NVMe file belongs to one process at a time.
static inline int spillway_flock_exclusive_nonblocking(int fd) {
    return flock(fd, LOCK_EX | LOCK_NB);
}

// O_NOFOLLOW: a symlink planted at the NVMe path is refused, not followed.
static inline int spillway_o_nofollow(void) {
    return O_NOFOLLOW;
}

#endif
