// Raw ISA-L Reed-Solomon encode loop: the reference for Spillway's encoder (Bench/run ec).
// Same code as ReedSolomonCode: gf_gen_cauchy1_matrix + ec_init_tables, then ec_encode_data
// over k data splits of ceil(block/k) bytes rounded up to 64, in a loop for the duration.
//   isal_encode_reference K R BLOCK_BYTES SECONDS  ->  {"tier": "isa-l", "bytes_per_s": …}
#include <isa-l/erasure_code.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s K R BLOCK_BYTES SECONDS\n", argv[0]);
        return 2;
    }
    int k = atoi(argv[1]), r = atoi(argv[2]), block = atoi(argv[3]);
    double seconds = atof(argv[4]);
    int n = k + r;
    int split = ((block + k - 1) / k + 63) / 64 * 64;
    unsigned char *matrix = malloc(n * k), *tables = malloc(32 * k * r);
    gf_gen_cauchy1_matrix(matrix, n, k);
    ec_init_tables(k, r, matrix + k * k, tables);
    unsigned char *buffer = aligned_alloc(64, (size_t)n * split);
    unsigned char *pointers[64];
    uint64_t state = 7;
    for (int i = 0; i < n * split; i++) {
        state = state * 6364136223846793005ULL + 1442695040888963407ULL;
        buffer[i] = (unsigned char)(state >> 33);
    }
    for (int i = 0; i < n; i++) pointers[i] = buffer + (size_t)i * split;
    double start = now(), deadline = start + seconds;
    long pages = 0;
    do {
        for (int i = 0; i < 64; i++) ec_encode_data(split, k, r, tables, pointers, pointers + k);
        pages += 64;
    } while (now() < deadline);
    double elapsed = now() - start;
    printf("{\"tier\": \"isa-l\", \"k\": %d, \"r\": %d, \"block_size\": %d, \"bytes_per_s\": %.1f, \"parity_byte\": %d}\n", k, r, block,
           (double)pages * block / elapsed, buffer[(size_t)k * split]);
    return 0;
}
