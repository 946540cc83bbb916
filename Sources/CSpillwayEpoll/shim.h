// epoll and eventfd (Linux, glibc), which the Swift Glibc module does not export: the
// daemon's event loop (SpillwayServer's Worker).
#ifndef SPILLWAY_CSPILLWAYEPOLL_SHIM_H
#define SPILLWAY_CSPILLWAYEPOLL_SHIM_H
#include <sys/epoll.h>
#include <sys/eventfd.h>

static inline int spillway_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }
static inline int spillway_eventfd(void) { return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }
#endif
