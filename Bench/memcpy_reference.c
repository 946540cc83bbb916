// Reference for the DRAM and device tiers: memcpy of --block-size bytes at random (or
// sequential) slots of a --size working set, one thread, queue depth 1. Same RNG (SplitMix64),
// same arena setup (mmap, MADV_HUGEPAGE, then fault in) and same latency sampling (one op in
// 16) as `spillway bench`, and the same JSON schema, so Bench/run compares like with like.
// With --lookup 1 each copy first finds its slot in a key -> slot hash table (the floor of any
// keyed store: one dependent lookup, usually a cache miss, before the copy can start).
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static uint64_t state;
static inline uint64_t splitmix64(void) {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    const char *pattern = "randread";
    size_t block = 4096, size = 64u << 20;
    double duration = 5;
    uint64_t seed = 42;
    int lookup = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--pattern")) pattern = argv[i + 1];
        else if (!strcmp(argv[i], "--block-size")) block = strtoull(argv[i + 1], 0, 10);
        else if (!strcmp(argv[i], "--size")) size = strtoull(argv[i + 1], 0, 10);
        else if (!strcmp(argv[i], "--duration")) duration = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--seed")) seed = strtoull(argv[i + 1], 0, 10);
        else if (!strcmp(argv[i], "--lookup")) lookup = atoi(argv[i + 1]);
        else { fprintf(stderr, "memcpy_reference: unknown option %s\n", argv[i]); return 2; }
    }
    int is_read = !strcmp(pattern, "randread") || !strcmp(pattern, "read");
    int is_random = !strcmp(pattern, "randread") || !strcmp(pattern, "randwrite");
    size_t pages = size / block;
    if (pages == 0) { fprintf(stderr, "memcpy_reference: --size smaller than --block-size\n"); return 2; }
    unsigned char *arena = mmap(0, pages * block, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (arena == MAP_FAILED) { perror("mmap"); return 1; }
    madvise(arena, pages * block, MADV_HUGEPAGE);  // advise, then fault in (as Spillway does)
    unsigned char *buffer = aligned_alloc(4096, block);
    memset(arena, 0x5a, pages * block);
    memset(buffer, 0xa5, block);

    // --lookup 1: each op first finds its slot in a key -> slot hash table (one 64-byte entry
    // per page, open addressing, slots a random permutation), as any keyed store must.
    struct entry { uint64_t key; uint64_t slot; uint64_t pad[6]; };
    size_t buckets = 1; while (buckets < 2 * pages) buckets <<= 1;
    struct entry *table = 0;
    if (lookup) {
        table = aligned_alloc(64, buckets * sizeof(struct entry));
        for (size_t b = 0; b < buckets; b++) table[b].key = ~0ull;
        uint64_t *perm = malloc(pages * sizeof(uint64_t));
        for (size_t p = 0; p < pages; p++) perm[p] = p;
        state = seed ^ 0x1234;
        for (size_t p = pages - 1; p > 0; p--) { size_t q = splitmix64() % (p + 1); uint64_t t = perm[p]; perm[p] = perm[q]; perm[q] = t; }
        for (size_t k = 0; k < pages; k++) {
            uint64_t h = (k * 0x9E3779B97F4A7C15ull) >> 20;
            while (table[h & (buckets - 1)].key != ~0ull) h++;
            table[h & (buckets - 1)].key = k; table[h & (buckets - 1)].slot = perm[k];
        }
        free(perm);
    }
    size_t sample_cap = 1 << 22, samples = 0;
    uint64_t *latency = malloc(sample_cap * sizeof(uint64_t));
    state = seed;
    uint64_t ops = 0, iteration = 0, cursor = 0, deadline = (uint64_t)(duration * 1e9);
    uint64_t start = now_ns(), now = start;
    for (;;) {
        size_t page;
        if (is_random) page = splitmix64() % pages;
        else { page = cursor++; if (cursor == pages) cursor = 0; }
        int timed = iteration % 16 == 0;
        uint64_t before = timed ? now_ns() : 0;
        if (lookup) {
            uint64_t h = (page * 0x9E3779B97F4A7C15ull) >> 20;
            while (table[h & (buckets - 1)].key != page) h++;
            page = table[h & (buckets - 1)].slot;
        }
        if (is_read) memcpy(buffer, arena + page * block, block);
        else memcpy(arena + page * block, buffer, block);
        __asm__ volatile("" ::: "memory");  // keep every copy
        if (timed) {
            now = now_ns();
            if (samples < sample_cap) latency[samples++] = now - before;
        }
        ops++;
        iteration++;
        if ((iteration & 63) == 0) {
            if (!timed) now = now_ns();
            if (now - start >= deadline) break;
        }
    }
    double seconds = (now_ns() - start) / 1e9;
    qsort(latency, samples, sizeof(uint64_t), cmp_u64);
    uint64_t p50 = samples ? latency[(size_t)(samples * 0.50)] : 0;
    uint64_t p99 = samples ? latency[(size_t)(samples * 0.99)] : 0;
    uint64_t p999 = samples ? latency[(size_t)(samples * 0.999)] : 0;
    uint64_t max = samples ? latency[samples - 1] : 0;
    double iops = ops / seconds;
    printf("{\"tier\": \"%s\", \"pattern\": \"%s\", \"block_size\": %zu, \"queue_depth\": 1, \"ops\": %llu, "
           "\"iops\": %.3f, \"bytes_per_s\": %.3f, \"latency_ns\": {\"p50\": %llu, \"p99\": %llu, \"p999\": %llu, \"max\": %llu}, "
           "\"duration_s\": %.6f, \"working_set_bytes\": %zu, \"seed\": %llu, \"latency_sample_every\": 16}\n",
           lookup ? "memcpy+lookup" : "memcpy", pattern, block, (unsigned long long)ops, iops, iops * block, (unsigned long long)p50, (unsigned long long)p99,
           (unsigned long long)p999, (unsigned long long)max, seconds, pages * block, (unsigned long long)seed);
    return 0;
}
