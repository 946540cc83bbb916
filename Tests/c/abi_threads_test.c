/* The C ABI under threads: compiled and run by the Swift test suite (SpillwayTests/CABITests),
 * with gcc -pthread (and, where it works, -fsanitize=thread).
 *
 *  1. spillway_last_error is per thread: every thread fails a call with a message naming
 *     itself, all wait at a barrier, then each must still read its own message.
 *  2. Closing a store while other threads put, get and store asynchronously on it (and on a KV
 *     pool on it) makes their calls fail with SPILLWAY_E_INVALID_HANDLE or SPILLWAY_E_CLOSED
 *     only, never anything else and never a crash; an asynchronous store whose ticket was issued
 *     still completes (its wait returns OK or CLOSED).
 *
 * Usage: abi_threads_test CONFIG.toml. Prints one line per failed check; exit status = failures. */
#define _GNU_SOURCE
#include "spillway.h"
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { WORKERS = 4, WARMUP_OPERATIONS = 50, MAX_OPERATIONS = 1000000 };

static atomic_int failures = 0;
#define CHECK(cond) do { if (!(cond)) { atomic_fetch_add(&failures, 1); printf("FAIL %s:%d: %s (last error: %s)\n", __FILE__, __LINE__, #cond, spillway_last_error()); } } while (0)

static int allowed_after_close(spillway_status status) {
    return status == SPILLWAY_OK || status == SPILLWAY_E_INVALID_HANDLE || status == SPILLWAY_E_CLOSED;
}

/* ---- 1. per-thread last error ---- */

static pthread_barrier_t error_barrier;

static void *own_error(void *argument) {
    long index = (long)argument;
    spillway_store bogus = 1000000 + (spillway_store)index; /* no such handle */
    uint8_t key[16] = {0};
    CHECK(spillway_store_put(bogus, key, "x", 1) == SPILLWAY_E_INVALID_HANDLE);
    char expected[64];
    snprintf(expected, sizeof expected, "handle %llu", (unsigned long long)bogus);
    pthread_barrier_wait(&error_barrier); /* every thread has failed with its own message */
    CHECK(strstr(spillway_last_error(), expected) != NULL);
    return NULL;
}

/* ---- 2. close under load ---- */

typedef struct {
    spillway_store store;
    spillway_kv_pool pool;
    size_t layer_bytes;
    const uint8_t *hashes; /* one block hash per worker */
    atomic_int *warm;      /* workers that finished their warm-up operations */
    pthread_mutex_t *mutex;
    pthread_cond_t *condition;
    long index;
    int unexpected;        /* calls that returned something other than OK/INVALID_HANDLE/CLOSED */
    int rejected;          /* calls refused because the store went away */
} worker_state;

static void *worker(void *argument) {
    worker_state *state = argument;
    uint8_t key[16] = {0};
    key[0] = (uint8_t)(state->index + 1);
    char page[4096], back[4096];
    char *block = malloc(state->layer_bytes);
    memset(page, (int)state->index, sizeof page);
    memset(block, (int)state->index, state->layer_bytes);
    const void *buffers[1] = {block};
    int announced = 0;
    /* Until the store is gone (two refused calls in a row), bounded by MAX_OPERATIONS. */
    int refused_in_a_row = 0;
    for (int operation = 0; operation < MAX_OPERATIONS && refused_in_a_row < 2; operation++) {
        key[15] = (uint8_t)operation;
        spillway_status put = spillway_store_put(state->store, key, page, sizeof page);
        size_t length = 0;
        spillway_status get = put == SPILLWAY_OK ? spillway_store_get(state->store, key, back, sizeof back, &length) : put;
        spillway_ticket ticket = 0;
        spillway_status async = spillway_kv_store_async(state->pool, state->hashes + 16 * state->index, 1, 0, buffers,
                                                        state->layer_bytes, &ticket);
        spillway_status waited = SPILLWAY_OK;
        size_t stored = 0;
        if (async == SPILLWAY_OK) waited = spillway_kv_wait(ticket, &stored);
        /* A get after a successful put may find the key gone only because the store closed. */
        int get_ok = allowed_after_close(get) || (put == SPILLWAY_OK && get == SPILLWAY_E_UNKNOWN_KEY);
        if (!allowed_after_close(put) || !get_ok || !allowed_after_close(async) || !allowed_after_close(waited)) {
            state->unexpected++;
            printf("FAIL worker %ld operation %d: put %d get %d async %d wait %d (last error: %s)\n", state->index, operation, put, get,
                   async, waited, spillway_last_error());
        }
        if (put == SPILLWAY_OK && get == SPILLWAY_OK && (length != sizeof back || memcmp(page, back, sizeof back) != 0)) {
            state->unexpected++;
            printf("FAIL worker %ld operation %d: got back other bytes\n", state->index, operation);
        }
        int refused = put != SPILLWAY_OK && async != SPILLWAY_OK;
        refused_in_a_row = refused ? refused_in_a_row + 1 : 0;
        state->rejected += refused;
        if (!announced && operation + 1 >= WARMUP_OPERATIONS) {
            announced = 1;
            pthread_mutex_lock(state->mutex);
            atomic_fetch_add(state->warm, 1);
            pthread_cond_broadcast(state->condition);
            pthread_mutex_unlock(state->mutex);
        }
    }
    if (!announced) { /* the loop ended early: still let the closer go */
        pthread_mutex_lock(state->mutex);
        atomic_fetch_add(state->warm, 1);
        pthread_cond_broadcast(state->condition);
        pthread_mutex_unlock(state->mutex);
    }
    free(block);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s CONFIG.toml\n", argv[0]); return 2; }

    pthread_t threads[WORKERS];
    CHECK(pthread_barrier_init(&error_barrier, NULL, WORKERS) == 0);
    for (long i = 0; i < WORKERS; i++) CHECK(pthread_create(&threads[i], NULL, own_error, (void *)i) == 0);
    for (int i = 0; i < WORKERS; i++) pthread_join(threads[i], NULL);
    pthread_barrier_destroy(&error_barrier);

    spillway_store store = 0;
    CHECK(spillway_store_open(argv[1], &store) == SPILLWAY_OK);
    spillway_kv_geometry geometry = {4, 1, 2, 8, 2, 0}; /* 256 B per layer, one layer */
    spillway_kv_pool pool = 0;
    CHECK(spillway_kv_pool_create(store, &geometry, "threads", &pool) == SPILLWAY_OK);
    size_t layer_bytes = 0, block_bytes = 0;
    CHECK(spillway_kv_block_sizes(pool, &layer_bytes, &block_bytes) == SPILLWAY_OK);
    uint32_t tokens[4 * WORKERS];
    for (int i = 0; i < 4 * WORKERS; i++) tokens[i] = (uint32_t)(i * 13 + 7);
    uint8_t hashes[16 * WORKERS];
    size_t blocks = 0;
    CHECK(spillway_kv_block_hashes(pool, tokens, 4 * WORKERS, hashes, WORKERS, &blocks) == SPILLWAY_OK && blocks == WORKERS);
    if (atomic_load(&failures) > 0) { printf("%s: %d failure(s)\n", argv[0], atomic_load(&failures)); return atomic_load(&failures); }

    atomic_int warm = 0;
    pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t condition;
    pthread_condattr_t attributes;
    pthread_condattr_init(&attributes);
    pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC);
    pthread_cond_init(&condition, &attributes);
    worker_state states[WORKERS];
    for (long i = 0; i < WORKERS; i++) {
        states[i] = (worker_state){store, pool, layer_bytes, hashes, &warm, &mutex, &condition, i, 0, 0};
        CHECK(pthread_create(&threads[i], NULL, worker, &states[i]) == 0);
    }
    /* Close once every worker is busy on the store (a condition, with a 60 s deadline). */
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += 60;
    pthread_mutex_lock(&mutex);
    int timed_out = 0;
    while (atomic_load(&warm) < WORKERS && !timed_out) timed_out = pthread_cond_timedwait(&condition, &mutex, &deadline) == ETIMEDOUT;
    pthread_mutex_unlock(&mutex);
    CHECK(!timed_out);
    CHECK(spillway_store_close(store) == SPILLWAY_OK);
    for (int i = 0; i < WORKERS; i++) pthread_join(threads[i], NULL);
    int rejected = 0;
    for (int i = 0; i < WORKERS; i++) {
        CHECK(states[i].unexpected == 0);
        rejected += states[i].rejected;
    }
    CHECK(rejected >= WORKERS); /* every worker saw the store go away (that is how it stopped) */
    CHECK(spillway_kv_lookup(pool, hashes, 1, &blocks) == SPILLWAY_E_INVALID_HANDLE);
    CHECK(spillway_store_close(store) == SPILLWAY_E_INVALID_HANDLE);
    pthread_cond_destroy(&condition);

    printf("%s: %d failure(s)\n", argv[0], atomic_load(&failures));
    return atomic_load(&failures);
}
