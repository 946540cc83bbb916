/*
 * spillway.h — the C ABI of Spillway, a tiered page store for LLM serving
 * (device → host DRAM → remote memory → NVMe).
 *
 * Library: libSpillwayC.so (SwiftPM product `SpillwayC`; `swift build -c release` puts it in
 * .build/release/; tools/install-c-library.sh installs it as libspillway.so). Link with
 * -lSpillwayC (or -lspillway once installed).
 *
 * Conventions
 *  - Every function returns a spillway_status: 0 (SPILLWAY_OK) or an error code. After an
 *    error, spillway_last_error() returns a message for the calling thread.
 *  - Handles are opaque 64-bit values, never pointers. An unknown, closed or wrong-kind
 *    handle is SPILLWAY_E_INVALID_HANDLE; it never crashes. 0 is never a valid handle.
 *  - No call keeps a pointer it was given after it returns. Asynchronous stores are the
 *    exception: buffers must stay valid until spillway_kv_wait returns.
 *  - Keys and block hashes are 16 bytes: the 128-bit value, high half first, big-endian
 *    (the same text as the 32 hex digits Spillway prints).
 *  - Thread safety: every function may be called from any thread, concurrently, on the same
 *    or different handles, except that closing a handle while another thread uses it makes
 *    that other call fail with SPILLWAY_E_INVALID_HANDLE or SPILLWAY_E_CLOSED (never a crash).
 */
#ifndef SPILLWAY_H
#define SPILLWAY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef int32_t spillway_status;
enum {
    SPILLWAY_OK = 0,
    SPILLWAY_E_TIER_FULL = 1,
    SPILLWAY_E_STORE_FULL = 2,
    SPILLWAY_E_PAGE_TOO_LARGE = 3,
    SPILLWAY_E_UNKNOWN_KEY = 4,
    SPILLWAY_E_BUFFER_TOO_SMALL = 5,
    SPILLWAY_E_CHECKSUM_MISMATCH = 6,
    SPILLWAY_E_TIER_IO = 7,
    SPILLWAY_E_PAGE_PINNED = 8,
    SPILLWAY_E_NOT_PINNED = 9,
    SPILLWAY_E_CLOSED = 10,
    SPILLWAY_E_INVALID_CONFIGURATION = 11,
    SPILLWAY_E_INVALID_ARGUMENT = 12,
    SPILLWAY_E_TRANSPORT = 13, /* a network transport (libfabric RMA) failed */
    SPILLWAY_E_INVALID_HANDLE = 100,
    SPILLWAY_E_PARTIAL = 101, /* some blocks of a batch failed; see the count returned */
    SPILLWAY_E_NOT_ACQUIRED = 102, /* spillway_weights_release of a layer not held through that handle */
    SPILLWAY_E_TIMED_OUT = 103 /* spillway_batch_wait: the batch is still running */
};

typedef uint64_t spillway_store;   /* a tiered store */
typedef uint64_t spillway_kv_pool; /* a KV-cache block pool on a store */
typedef uint64_t spillway_ticket;  /* an asynchronous KV store in flight */

/* The version string ("0.3.0"); static storage. Thread-safe. */
const char *spillway_version(void);

/* The message of the last failed call on this thread ("" if none). Valid until this thread's
 * next failing call. Thread-safe (per thread). */
const char *spillway_last_error(void);

/* Opens a store from a TOML file (docs/operations.md), or the library default (device →
 * DRAM → NVMe in a per-user file; no sockets) when path is
 * NULL. */
spillway_status spillway_store_open(const char *config_path, spillway_store *out);
/* Closes the store and every pool on it; further use of the handles fails. */
spillway_status spillway_store_close(spillway_store store);

/* Stores length bytes under key (visible once complete; replaces an older version). */
spillway_status spillway_store_put(spillway_store store, const uint8_t key[16], const void *bytes, size_t length);

/* Page classes: what a page holds, for the store's placement policy (docs/architecture.md,
 * "Page classes"). spillway_store_put stores SPILLWAY_PAGE_GENERIC. */
enum {
    SPILLWAY_PAGE_GENERIC = 0,
    SPILLWAY_PAGE_KV_BLOCK = 1, /* order: depth in the prefix chain; parent_key: the parent block's page */
    SPILLWAY_PAGE_WEIGHTS = 2   /* order: the layer's streaming position; parent_key: NULL */
};
/* spillway_store_put with a page class and hints. order saturates at 65535; parent_key may be
 * NULL (no parent) and is kept as the parent's 64-bit policy id (spillway_parent_id), which
 * links a KV block to its cached parent for prefix-aware policies. An unknown page_class is
 * SPILLWAY_E_INVALID_ARGUMENT. */
spillway_status spillway_store_put_hinted(spillway_store store, const uint8_t key[16], const void *bytes, size_t length,
                                          uint32_t page_class, uint32_t order, const uint8_t parent_key[16]);
/* The class and hints a stored page carries; any out pointer may be NULL. *parent_id is 0
 * without a parent. SPILLWAY_E_UNKNOWN_KEY if absent. */
spillway_status spillway_store_page_hints(spillway_store store, const uint8_t key[16], uint32_t *page_class,
                                          uint32_t *order, uint64_t *parent_id);
/* The id spillway_store_page_hints reports for a parent key (never 0). */
uint64_t spillway_parent_id(const uint8_t key[16]);
/* Reads the page into buffer (capacity bytes); *length gets its size. A buffer too small is
 * SPILLWAY_E_BUFFER_TOO_SMALL with *length set to the size needed. */
spillway_status spillway_store_get(spillway_store store, const uint8_t key[16], void *buffer, size_t capacity, size_t *length);

/* Asynchronous batches. One page of a batch: key in; for a put, buffer and length (the page's
 * bytes) in; for a get, buffer and length (its capacity) in and length (the page's) out; status
 * (0 or the page's spillway_status) and latency_ns (submission to this page's completion) out. */
typedef struct {
    uint8_t key[16];
    void *buffer;
    size_t length;
    spillway_status status;
    uint64_t latency_ns;
} spillway_page_io;

/* Called once when a submitted batch is done, on a Spillway thread, before its ticket completes;
 * it must not block for long (it holds one of the store's batch workers). */
typedef void (*spillway_batch_done)(void *context, uint64_t ticket, size_t succeeded);

/* Submit count reads (_get) or writes (_put) and return at once with *ticket. ios and every
 * buffer they name must stay valid and untouched until the batch is done: spillway_batch_wait
 * returned 0 or SPILLWAY_E_PARTIAL, or done (when not NULL) was called. queue_depth: reads or
 * writes in flight per tier (0: the tier's limit). A store keeps at most 8 batches in flight;
 * past that the call waits for room. A put's page is visible only once durable on its tier.
 * Every ticket must be waited for once (spillway_batch_wait frees it). */
spillway_status spillway_store_submit_get(spillway_store store, spillway_page_io *ios, size_t count, uint32_t queue_depth,
                                          spillway_batch_done done, void *context, uint64_t *ticket);
spillway_status spillway_store_submit_put(spillway_store store, spillway_page_io *ios, size_t count, uint32_t queue_depth,
                                          spillway_batch_done done, void *context, uint64_t *ticket);
/* Waits for a submitted batch (timeout_seconds < 0: as long as it takes) and frees its ticket;
 * *succeeded = pages that succeeded. SPILLWAY_E_TIMED_OUT: still running (the ticket stays valid:
 * wait again). 0 when every page succeeded, else SPILLWAY_E_PARTIAL (see each page's status). */
spillway_status spillway_batch_wait(uint64_t ticket, double timeout_seconds, size_t *succeeded);
spillway_status spillway_store_remove(spillway_store store, const uint8_t key[16]);
/* Writes the store's statistics as one JSON object (NUL-terminated) into buffer; *length
 * gets the JSON's length. Too small: SPILLWAY_E_BUFFER_TOO_SMALL with *length = needed. */
spillway_status spillway_store_stats_json(spillway_store store, char *buffer, size_t capacity, size_t *length);

/* KV-cache geometry: K and V of tokens_per_block × kv_heads × head_dim elements of
 * dtype_size bytes per layer. layout: 0 = per-layer pages, 1 = whole-block pages. */
typedef struct {
    uint32_t tokens_per_block;
    uint32_t layers;
    uint32_t kv_heads;
    uint32_t head_dim;
    uint32_t dtype_size;
    uint32_t layout;
} spillway_kv_geometry;

spillway_status spillway_kv_pool_create(spillway_store store, const spillway_kv_geometry *geometry, const char *model_id,
                                        spillway_kv_pool *out);
spillway_status spillway_kv_pool_destroy(spillway_kv_pool pool);
/* Bytes of one layer of a block, and of a whole block. */
spillway_status spillway_kv_block_sizes(spillway_kv_pool pool, size_t *layer_bytes, size_t *block_bytes);

/* The chained prefix hashes of the full blocks of tokens (16 bytes each into hashes, at most
 * capacity of them); *blocks gets how many full blocks there are. */
spillway_status spillway_kv_block_hashes(spillway_kv_pool pool, const uint32_t *tokens, size_t count, uint8_t *hashes,
                                         size_t capacity, size_t *blocks);
/* How many blocks from the start of hashes (count × 16 bytes) are completely stored. */
spillway_status spillway_kv_lookup(spillway_kv_pool pool, const uint8_t *hashes, size_t count, size_t *matched);

/* Stores count blocks: buffers[i] holds block i (layer < 0: the whole block, block_bytes) or
 * its layer `layer` (layer_bytes). A block is visible once all its layers are stored.
 * *stored gets the number of blocks stored from the start without a gap; if some failed, the
 * status is SPILLWAY_E_PARTIAL (or the first error when none succeeded). */
spillway_status spillway_kv_store(spillway_kv_pool pool, const uint8_t *hashes, size_t count, int32_t layer,
                                  const void *const *buffers, size_t buffer_bytes, size_t *stored);
/* Like spillway_kv_store but returns at once; buffers must stay valid and unchanged until
 * spillway_kv_wait(ticket) returns. */
spillway_status spillway_kv_store_async(spillway_kv_pool pool, const uint8_t *hashes, size_t count, int32_t layer,
                                        const void *const *buffers, size_t buffer_bytes, spillway_ticket *ticket);
spillway_status spillway_kv_wait(spillway_ticket ticket, size_t *stored);
/* Loads count blocks (layer < 0: whole blocks) into buffers; *loaded = blocks loaded from the
 * start without a gap. Never writes bytes other than those stored. */
spillway_status spillway_kv_load(spillway_kv_pool pool, const uint8_t *hashes, size_t count, int32_t layer,
                                 void *const *buffers, size_t buffer_bytes, size_t *loaded);
/* Whole arrays in one call. The array holds layers first_layer .. first_layer + layer_count - 1
 * of count blocks: the slice of its layer i (pool layer first_layer + i) of block b is the
 * layer_bytes at base + i * layer_stride + b * block_stride (strides in bytes). A C-contiguous
 * [layers, blocks, layer_bytes] array has layer_stride = blocks * layer_bytes and block_stride =
 * layer_bytes; one layer's [blocks, layer_bytes] is layer_count = 1. Checked before anything
 * is read or written (SPILLWAY_E_INVALID_ARGUMENT, with a message): layer_bytes must equal the
 * pool's layer bytes, the layers must lie inside the geometry, strides must be >= 0 and the
 * array's extent must fit in a ptrdiff_t; for a load no two slices may overlap. Large arrays
 * (2 MiB or more) are copied by up to 4 threads (one per CPU). A whole-block
 * pool needs every layer of a block back to back (layer_count = layers, layer_stride =
 * layer_bytes). *stored / *loaded and the status are as for spillway_kv_store / _load. */
spillway_status spillway_kv_store_array(spillway_kv_pool pool, const uint8_t *hashes, size_t count, int32_t first_layer,
                                        int32_t layer_count, const void *base, ptrdiff_t layer_stride, ptrdiff_t block_stride,
                                        size_t layer_bytes, size_t *stored);
/* Like spillway_kv_store_array but returns at once: the store runs as one of the store's
 * submitted batches (at most 8 in flight per store; a call past that waits), as
 * spillway_kv_store_async does; the array must stay valid and unchanged until
 * spillway_kv_wait(ticket) returns. Destroying the pool or closing its store first finishes
 * the submitted stores. Arguments are checked before the call returns. */
spillway_status spillway_kv_store_array_async(spillway_kv_pool pool, const uint8_t *hashes, size_t count, int32_t first_layer,
                                              int32_t layer_count, const void *base, ptrdiff_t layer_stride,
                                              ptrdiff_t block_stride, size_t layer_bytes, spillway_ticket *ticket);
spillway_status spillway_kv_load_array(spillway_kv_pool pool, const uint8_t *hashes, size_t count, int32_t first_layer,
                                       int32_t layer_count, void *base, ptrdiff_t layer_stride, ptrdiff_t block_stride,
                                       size_t layer_bytes, size_t *loaded);
spillway_status spillway_kv_prefetch(spillway_kv_pool pool, const uint8_t *hashes, size_t count);
spillway_status spillway_kv_pin(spillway_kv_pool pool, const uint8_t *hashes, size_t count);
spillway_status spillway_kv_unpin(spillway_kv_pool pool, const uint8_t *hashes, size_t count);
spillway_status spillway_kv_evict(spillway_kv_pool pool, const uint8_t *hashes, size_t count, size_t *removed);

/* Model weights (safetensors). */
typedef uint64_t spillway_weights;

/* One tensor of an acquired layer: name and dtype are NUL-terminated and live as long as the
 * weights handle; data is valid until the matching spillway_weights_release (or
 * until the weights or their store are destroyed). */
typedef struct {
    const char *name;
    const char *dtype;
    const void *data;
    size_t bytes;
} spillway_tensor_view;

/* Registers a safetensors model (copies its tensors into the store, on tier `tier`, or where
 * the store's policy puts them when tier < 0) and prepares a streamer with a device-memory
 * budget of device_budget bytes and `prefetch` layers loaded ahead. */
spillway_status spillway_weights_register(spillway_store store, const char *path, const char *model_id, int32_t tier,
                                          size_t device_budget, uint32_t prefetch, spillway_weights *out);
/* The model's layer numbers, ascending (-1 = shared tensors: embeddings, final norm, head). */
spillway_status spillway_weights_layers(spillway_weights weights, int32_t *layers, size_t capacity, size_t *count);
/* Acquires a layer: its tensors in device memory (waits only while they load). *count gets the
 * number of tensors; views receives up to capacity of them. */
spillway_status spillway_weights_acquire(spillway_weights weights, int32_t layer, spillway_tensor_view *views, size_t capacity,
                                         size_t *count);
/* Gives back one acquisition of the layer made through this weights handle (acquire and
 * release pair up, like a counted lock; any thread may release). Releasing a layer this handle
 * holds no acquisition of (never acquired, or released as many times as acquired) is
 * SPILLWAY_E_NOT_ACQUIRED and changes nothing: it never gives back another caller's hold. */
spillway_status spillway_weights_release(spillway_weights weights, int32_t layer);
/* Nanoseconds acquire calls waited for layers not loaded yet, in total. */
spillway_status spillway_weights_stall(spillway_weights weights, uint64_t *nanoseconds);
spillway_status spillway_weights_destroy(spillway_weights weights);

#ifdef __cplusplus
}
#endif

#endif /* SPILLWAY_H */
