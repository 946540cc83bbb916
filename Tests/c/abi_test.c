/* Exercises include/spillway.h from C: compiled and run by the Swift test suite
 * (SpillwayTests/CABITests). Prints one line per failed check; exit status = failures. */
#define _GNU_SOURCE /* mkdtemp */
#include "spillway.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;
#define CHECK(cond) do { if (!(cond)) { failures++; printf("FAIL %s:%d: %s (last error: %s)\n", __FILE__, __LINE__, #cond, spillway_last_error()); } } while (0)

/* Every "stall_nanoseconds" number in a stats JSON document (the store's and each tier's):
 * the largest, so 0 means no stall anywhere. */
static long long max_stall(const char *json) {
    const char *name = "\"stall_nanoseconds\":";
    long long largest = -1;
    for (const char *at = strstr(json, name); at != NULL; at = strstr(at + 1, name)) {
        long long value = strtoll(at + strlen(name), NULL, 10);
        if (value > largest) largest = value;
    }
    return largest;
}

/* The "hits" of tier `tier` (0 = top): the tiers array lists tiers top first, each with one "hits". */
static long long tier_hits(const char *json, int tier) {
    const char *at = strstr(json, "\"tiers\":");
    for (int index = 0; at != NULL && index <= tier; index++) {
        at = strstr(at + 1, "\"hits\":");
        if (at != NULL && index == tier) return strtoll(at + strlen("\"hits\":"), NULL, 10);
    }
    return -1;
}

static int batch_callbacks = 0;
static size_t batch_callback_succeeded = 0;
static void on_batch_done(void *context, uint64_t ticket, size_t succeeded) {
    (void)ticket;
    *(int *)context += 1;
    batch_callback_succeeded = succeeded;
}

int main(int argc, char **argv) {
    if (argc != 2 && argc != 3) { fprintf(stderr, "usage: %s CONFIG.toml [SCRATCH_DIRECTORY]\n", argv[0]); return 2; }
    /* Files this program writes go to the given directory, else to a fresh private one: never
     * to a fixed path another run (or another user) could collide with. */
    char made[] = "/tmp/spillway-abi-XXXXXX";
    const char *scratch = argc == 3 ? argv[2] : mkdtemp(made);
    if (scratch == NULL) { perror("mkdtemp"); return 2; }
    CHECK(strlen(spillway_version()) > 0);

    spillway_store store = 0;
    CHECK(spillway_store_open("/nonexistent/spillway.toml", &store) == SPILLWAY_E_INVALID_CONFIGURATION);
    CHECK(strlen(spillway_last_error()) > 0);
    CHECK(spillway_store_open(argv[1], &store) == SPILLWAY_OK && store != 0);

    /* Pages. */
    uint8_t key[16] = {0};
    key[15] = 42;
    char page[5000];
    for (int i = 0; i < (int)sizeof page; i++) page[i] = (char)(i * 7);
    CHECK(spillway_store_put(store, key, page, sizeof page) == SPILLWAY_OK);
    char back[5000];
    size_t length = 0;
    CHECK(spillway_store_get(store, key, back, sizeof back, &length) == SPILLWAY_OK && length == sizeof page);
    CHECK(memcmp(page, back, sizeof page) == 0);
    CHECK(spillway_store_get(store, key, back, 100, &length) == SPILLWAY_E_BUFFER_TOO_SMALL && length == sizeof page);
    uint8_t missing[16] = {1};
    CHECK(spillway_store_get(store, missing, back, sizeof back, &length) == SPILLWAY_E_UNKNOWN_KEY);
    CHECK(spillway_store_put(store, NULL, page, 1) == SPILLWAY_E_INVALID_ARGUMENT);
    CHECK(spillway_store_put(12345, key, page, 1) == SPILLWAY_E_INVALID_HANDLE);
    char stats[8192];
    CHECK(spillway_store_stats_json(store, stats, sizeof stats, &length) == SPILLWAY_OK && stats[0] == '{' && strstr(stats, "\"puts\"") != NULL);
    CHECK(spillway_store_stats_json(store, stats, 4, &length) == SPILLWAY_E_BUFFER_TOO_SMALL && length > 4);
    /* A single-tier DRAM store never waits on a lower tier. */
    CHECK(spillway_store_stats_json(store, stats, sizeof stats, &length) == SPILLWAY_OK && max_stall(stats) == 0);
    CHECK(tier_hits(stats, 0) >= 1);
    /* The configuration names no policy: the default (prefix-lru, with the class rules) is in use and reported. */
    CHECK(strstr(stats, "\"policy\":\"prefix-lru\"") != NULL);

    /* Page classes and hints. A plain put is generic. */
    uint32_t page_class = 99, order = 99;
    uint64_t digest = 99;
    CHECK(spillway_store_page_hints(store, key, &page_class, &order, &digest) == SPILLWAY_OK);
    CHECK(page_class == SPILLWAY_PAGE_GENERIC && order == 0 && digest == 0);
    uint8_t child[16] = {0};
    child[15] = 43;
    CHECK(spillway_store_put_hinted(store, child, page, 100, SPILLWAY_PAGE_KV_BLOCK, 7, key) == SPILLWAY_OK);
    CHECK(spillway_store_page_hints(store, child, &page_class, &order, &digest) == SPILLWAY_OK);
    CHECK(page_class == SPILLWAY_PAGE_KV_BLOCK && order == 7 && digest == spillway_parent_id(key) && digest != 0);
    CHECK(spillway_store_get(store, child, back, sizeof back, &length) == SPILLWAY_OK && length == 100 && memcmp(page, back, 100) == 0);
    uint8_t chunk[16] = {0};
    chunk[15] = 44;
    CHECK(spillway_store_put_hinted(store, chunk, page, 10, SPILLWAY_PAGE_WEIGHTS, 100000, NULL) == SPILLWAY_OK);
    CHECK(spillway_store_page_hints(store, chunk, &page_class, NULL, NULL) == SPILLWAY_OK && page_class == SPILLWAY_PAGE_WEIGHTS);
    CHECK(spillway_store_page_hints(store, chunk, NULL, &order, &digest) == SPILLWAY_OK && order == 65535 && digest == 0);
    CHECK(spillway_store_put_hinted(store, chunk, page, 10, 9, 0, NULL) == SPILLWAY_E_INVALID_ARGUMENT);
    CHECK(strstr(spillway_last_error(), "page class") != NULL);
    CHECK(spillway_store_put_hinted(store, NULL, page, 10, SPILLWAY_PAGE_GENERIC, 0, NULL) == SPILLWAY_E_INVALID_ARGUMENT);
    CHECK(spillway_store_page_hints(store, missing, &page_class, &order, &digest) == SPILLWAY_E_UNKNOWN_KEY);
    CHECK(spillway_store_page_hints(12345, key, &page_class, &order, &digest) == SPILLWAY_E_INVALID_HANDLE);
    CHECK(spillway_store_remove(store, child) == SPILLWAY_OK && spillway_store_remove(store, chunk) == SPILLWAY_OK);

    /* Asynchronous batches: 16 puts with a callback, then 16 gets (one missing key), each
     * waited for once; every page says its status and latency. */
    {
        static unsigned char pages[16][1024], backs[17][1024];
        spillway_page_io ios[17];
        memset(ios, 0, sizeof ios);
        for (int i = 0; i < 16; i++) {
            for (int j = 0; j < 1024; j++) pages[i][j] = (unsigned char)(i * 31 + j);
            memset(ios[i].key, 0, 16);
            ios[i].key[14] = 0xA5;
            ios[i].key[15] = (uint8_t)i;
            ios[i].buffer = pages[i];
            ios[i].length = 1024;
        }
        uint64_t ticket = 0;
        size_t succeeded = 0;
        CHECK(spillway_store_submit_put(store, ios, 16, 4, on_batch_done, &batch_callbacks, &ticket) == SPILLWAY_OK && ticket != 0);
        CHECK(spillway_batch_wait(ticket, 30, &succeeded) == SPILLWAY_OK && succeeded == 16);
        CHECK(batch_callbacks == 1 && batch_callback_succeeded == 16);
        CHECK(spillway_batch_wait(ticket, 1, &succeeded) == SPILLWAY_E_INVALID_HANDLE);
        for (int i = 0; i < 17; i++) {
            memset(ios[i].key, 0, 16);
            ios[i].key[14] = 0xA5;
            ios[i].key[15] = (uint8_t)i;
            ios[i].buffer = backs[i];
            ios[i].length = sizeof backs[i];
            ios[i].status = -1;
        }
        CHECK(spillway_store_submit_get(store, ios, 17, 0, NULL, NULL, &ticket) == SPILLWAY_OK);
        CHECK(spillway_batch_wait(ticket, 30, &succeeded) == SPILLWAY_E_PARTIAL && succeeded == 16);
        for (int i = 0; i < 16; i++) {
            CHECK(ios[i].status == SPILLWAY_OK && ios[i].length == 1024 && memcmp(backs[i], pages[i], 1024) == 0);
            CHECK(ios[i].latency_ns > 0);
        }
        CHECK(ios[16].status == SPILLWAY_E_UNKNOWN_KEY);
        CHECK(spillway_store_submit_get(store, NULL, 4, 0, NULL, NULL, &ticket) == SPILLWAY_E_INVALID_ARGUMENT);
        CHECK(spillway_store_submit_get(store, ios, 0, 0, NULL, NULL, &ticket) == SPILLWAY_E_INVALID_ARGUMENT);
        CHECK(spillway_store_submit_get(12345, ios, 4, 0, NULL, NULL, &ticket) == SPILLWAY_E_INVALID_HANDLE);
        CHECK(spillway_batch_wait(987654321, 0, &succeeded) == SPILLWAY_E_INVALID_HANDLE);
    }

    /* DRAM (64 KiB) over NVMe (a file in the scratch directory): most of 64 pages of 4 KiB land
     * on NVMe, and getting them back stalls on it. */
    {
        char nvme_config[4096], nvme_file[2048];
        snprintf(nvme_file, sizeof nvme_file, "%s/abi-spill.nvme", scratch);
        snprintf(nvme_config, sizeof nvme_config, "%s/abi-nvme.toml", scratch);
        FILE *file = fopen(nvme_config, "w");
        CHECK(file != NULL);
        if (file != NULL) {
            fprintf(file, "slot-size = \"4k\"\nmax-page-size = \"64k\"\n[[tier]]\nkind = \"dram\"\ncapacity = \"64k\"\n"
                          "[[tier]]\nkind = \"nvme\"\ncapacity = \"16m\"\npath = \"%s\"\n", nvme_file);
            fclose(file);
        }
        spillway_store layered = 0;
        CHECK(spillway_store_open(nvme_config, &layered) == SPILLWAY_OK);
        static char spill_page[4096];
        uint8_t spill_key[16] = {0};
        for (int i = 0; i < 64; i++) {
            spill_key[15] = (uint8_t)i;
            memset(spill_page, i, sizeof spill_page);
            CHECK(spillway_store_put(layered, spill_key, spill_page, sizeof spill_page) == SPILLWAY_OK);
        }
        static char before[8192], after[8192];
        CHECK(spillway_store_stats_json(layered, before, sizeof before, &length) == SPILLWAY_OK);
        int mismatched = 0;
        for (int i = 0; i < 64; i++) {
            spill_key[15] = (uint8_t)i;
            size_t got = 0;
            CHECK(spillway_store_get(layered, spill_key, spill_page, sizeof spill_page, &got) == SPILLWAY_OK && got == sizeof spill_page);
            for (size_t b = 0; b < sizeof spill_page; b++) mismatched += spill_page[b] != (char)i;
        }
        CHECK(mismatched == 0);
        CHECK(spillway_store_stats_json(layered, after, sizeof after, &length) == SPILLWAY_OK);
        CHECK(tier_hits(after, 1) > 0);                  /* some gets came from NVMe */
        CHECK(max_stall(after) > 0 && max_stall(after) > max_stall(before)); /* and they stalled */
        CHECK(spillway_store_close(layered) == SPILLWAY_OK);
        remove(nvme_file);
        remove(nvme_config);
    }

    /* KV pool: 4 tokens per block, 2 layers, 2 KV heads, head dim 8, fp16: 2 x 4 x 2 x 8 x 2 = 256 B per layer. */
    spillway_kv_geometry geometry = {4, 2, 2, 8, 2, 0};
    spillway_kv_pool pool = 0;
    spillway_kv_geometry bad = {0, 2, 2, 16, 2, 0};
    CHECK(spillway_kv_pool_create(store, &bad, "model", &pool) == SPILLWAY_E_INVALID_CONFIGURATION);
    CHECK(spillway_kv_pool_create(store, &geometry, "model", &pool) == SPILLWAY_OK && pool != 0);
    size_t layer_bytes = 0, block_bytes = 0;
    CHECK(spillway_kv_block_sizes(pool, &layer_bytes, &block_bytes) == SPILLWAY_OK && layer_bytes == 256 && block_bytes == 512);

    uint32_t tokens[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    uint8_t hashes[16 * 4];
    size_t blocks = 0;
    CHECK(spillway_kv_block_hashes(pool, tokens, 10, hashes, 4, &blocks) == SPILLWAY_OK && blocks == 2);
    CHECK(spillway_kv_block_hashes(pool, tokens, 10, hashes, 1, &blocks) == SPILLWAY_E_BUFFER_TOO_SMALL);
    size_t matched = 99;
    CHECK(spillway_kv_lookup(pool, hashes, 2, &matched) == SPILLWAY_OK && matched == 0);

    static char data[2][512];
    for (int b = 0; b < 2; b++) for (int i = 0; i < 512; i++) data[b][i] = (char)(b * 31 + i);
    const void *layer0[2] = {data[0], data[1]};
    const void *layer1[2] = {data[0] + 256, data[1] + 256};
    size_t stored = 0;
    CHECK(spillway_kv_store(pool, hashes, 2, 0, layer0, 256, &stored) == SPILLWAY_OK && stored == 2);
    CHECK(spillway_kv_lookup(pool, hashes, 2, &matched) == SPILLWAY_OK && matched == 0); /* layer 1 missing */
    spillway_ticket ticket = 0;
    CHECK(spillway_kv_store_async(pool, hashes, 2, 1, layer1, 256, &ticket) == SPILLWAY_OK);
    CHECK(spillway_kv_wait(ticket, &stored) == SPILLWAY_OK && stored == 2);
    CHECK(spillway_kv_wait(ticket, &stored) == SPILLWAY_E_INVALID_HANDLE); /* a ticket is used once */
    CHECK(spillway_kv_lookup(pool, hashes, 2, &matched) == SPILLWAY_OK && matched == 2);
    CHECK(spillway_kv_store(pool, hashes, 2, 0, layer0, 100, &stored) == SPILLWAY_E_INVALID_ARGUMENT); /* wrong size */

    static char out[2][512];
    void *whole[2] = {out[0], out[1]};
    size_t loaded = 0;
    CHECK(spillway_kv_load(pool, hashes, 2, -1, whole, 512, &loaded) == SPILLWAY_OK && loaded == 2);
    CHECK(memcmp(out, data, sizeof data) == 0);
    static char one_layer[256];
    void *layer_out[1] = {one_layer};
    CHECK(spillway_kv_load(pool, hashes + 16, 1, 1, layer_out, 256, &loaded) == SPILLWAY_OK && memcmp(one_layer, data[1] + 256, 256) == 0);

    CHECK(spillway_kv_prefetch(pool, hashes, 2) == SPILLWAY_OK);
    CHECK(spillway_kv_pin(pool, hashes, 2) == SPILLWAY_OK);
    CHECK(spillway_kv_unpin(pool, hashes, 2) == SPILLWAY_OK);
    CHECK(spillway_kv_unpin(pool, hashes, 2) == SPILLWAY_E_NOT_PINNED);

    size_t removed = 0;
    CHECK(spillway_kv_evict(pool, hashes + 16, 1, &removed) == SPILLWAY_OK && removed == 1);
    CHECK(spillway_kv_load(pool, hashes, 2, -1, whole, 512, &loaded) == SPILLWAY_E_PARTIAL && loaded == 1);

    /* Whole arrays: [layers = 2][blocks = 3][256] in one call, and a strided [blocks][layers][256] view. */
    uint32_t more_tokens[12] = {11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22};
    uint8_t array_hashes[16 * 3];
    CHECK(spillway_kv_block_hashes(pool, more_tokens, 12, array_hashes, 3, &blocks) == SPILLWAY_OK && blocks == 3);
    static unsigned char kv[2][3][256], kv_back[2][3][256], by_block[3][2][256];
    for (int l = 0; l < 2; l++) for (int b = 0; b < 3; b++) for (int i = 0; i < 256; i++) kv[l][b][i] = (unsigned char)(l * 97 + b * 13 + i);
    CHECK(spillway_kv_store_array(pool, array_hashes, 3, 0, 2, kv, sizeof kv[0], 256, 256, &stored) == SPILLWAY_OK && stored == 3);
    CHECK(spillway_kv_lookup(pool, array_hashes, 3, &matched) == SPILLWAY_OK && matched == 3);
    CHECK(spillway_kv_load_array(pool, array_hashes, 3, 0, 2, kv_back, sizeof kv_back[0], 256, 256, &loaded) == SPILLWAY_OK && loaded == 3);
    CHECK(memcmp(kv, kv_back, sizeof kv) == 0);
    /* Strided destination: layer stride 256, block stride 512. */
    CHECK(spillway_kv_load_array(pool, array_hashes, 3, 0, 2, by_block, 256, sizeof by_block[0], 256, &loaded) == SPILLWAY_OK && loaded == 3);
    int strided_ok = 1;
    for (int l = 0; l < 2; l++) for (int b = 0; b < 3; b++) strided_ok &= memcmp(by_block[b][l], kv[l][b], 256) == 0;
    CHECK(strided_ok);
    /* One layer of [blocks][256], asynchronously. */
    CHECK(spillway_kv_store_array_async(pool, array_hashes, 3, 1, 1, kv[0], 0, 256, 256, &ticket) == SPILLWAY_OK);
    CHECK(spillway_kv_wait(ticket, &stored) == SPILLWAY_OK && stored == 3);
    CHECK(spillway_kv_load_array(pool, array_hashes, 3, 1, 1, kv_back[1], 0, 256, 256, &loaded) == SPILLWAY_OK);
    CHECK(memcmp(kv_back[1], kv[0], sizeof kv[0]) == 0);
    /* Every argument is checked: typed errors, a message, nothing touched. */
    CHECK(spillway_kv_store_array(pool, array_hashes, 3, 0, 2, kv, sizeof kv[0], 256, 255, &stored) == SPILLWAY_E_INVALID_ARGUMENT);
    CHECK(strstr(spillway_last_error(), "layer_bytes") != NULL);
    CHECK(spillway_kv_store_array(pool, array_hashes, 3, 0, 2, kv, -1, 256, 256, &stored) == SPILLWAY_E_INVALID_ARGUMENT);
    CHECK(strstr(spillway_last_error(), "negative") != NULL);
    CHECK(spillway_kv_store_array(pool, array_hashes, 3, 0, 2, kv, PTRDIFF_MAX, 256, 256, &stored) == SPILLWAY_E_INVALID_ARGUMENT);
    CHECK(strstr(spillway_last_error(), "overflow") != NULL);
    CHECK(spillway_kv_store_array(pool, array_hashes, 3, 1, 2, kv, sizeof kv[0], 256, 256, &stored) == SPILLWAY_E_INVALID_ARGUMENT);
    CHECK(spillway_kv_store_array(pool, array_hashes, 3, 0, 0, kv, sizeof kv[0], 256, 256, &stored) == SPILLWAY_E_INVALID_ARGUMENT);
    CHECK(spillway_kv_store_array(pool, array_hashes, 3, -1, 2, kv, sizeof kv[0], 256, 256, &stored) == SPILLWAY_E_INVALID_ARGUMENT);
    CHECK(spillway_kv_store_array(pool, array_hashes, 3, 0, 2, NULL, sizeof kv[0], 256, 256, &stored) == SPILLWAY_E_INVALID_ARGUMENT);
    CHECK(spillway_kv_store_array(pool, NULL, 3, 0, 2, kv, sizeof kv[0], 256, 256, &stored) == SPILLWAY_E_INVALID_ARGUMENT);
    CHECK(spillway_kv_store_array_async(pool, array_hashes, 3, 0, 2, kv, -256, 256, 256, &ticket) == SPILLWAY_E_INVALID_ARGUMENT);
    CHECK(spillway_kv_store_array_async(pool, array_hashes, 3, 0, 2, kv, sizeof kv[0], 256, 256, NULL) == SPILLWAY_E_INVALID_ARGUMENT);
    memset(kv_back, 0x5A, sizeof kv_back);
    CHECK(spillway_kv_load_array(pool, array_hashes, 3, 0, 2, kv_back, 256, 128, 256, &loaded) == SPILLWAY_E_INVALID_ARGUMENT); /* overlapping */
    CHECK(strstr(spillway_last_error(), "overlap") != NULL);
    CHECK(spillway_kv_load_array(pool, array_hashes, 3, 0, 2, kv_back, 0, 256, 256, &loaded) == SPILLWAY_E_INVALID_ARGUMENT); /* layers on top of each other */
    CHECK(spillway_kv_load_array(pool, array_hashes, 3, 0, 2, kv_back, sizeof kv_back[0], 256, (size_t)-1, &loaded) == SPILLWAY_E_INVALID_ARGUMENT);
    CHECK(kv_back[0][0][0] == 0x5A && kv_back[1][2][255] == 0x5A);
    CHECK(spillway_kv_load_array(0, array_hashes, 3, 0, 2, kv_back, sizeof kv_back[0], 256, 256, &loaded) == SPILLWAY_E_INVALID_HANDLE);
    CHECK(spillway_kv_evict(pool, array_hashes + 32, 1, &removed) == SPILLWAY_OK && removed == 1);
    CHECK(spillway_kv_load_array(pool, array_hashes, 3, 0, 2, kv_back, sizeof kv_back[0], 256, 256, &loaded) == SPILLWAY_E_PARTIAL && loaded == 2);

    /* Weights: a tiny safetensors file written here (header JSON, then the data). */
    char model_path[2048];
    snprintf(model_path, sizeof model_path, "%s/abi-test-model.safetensors", scratch);
    const char *header = "{\"model.layers.0.w\":{\"dtype\":\"U8\",\"shape\":[4,8],\"data_offsets\":[0,32]},"
                         "\"model.layers.1.w\":{\"dtype\":\"F16\",\"shape\":[16],\"data_offsets\":[32,64]},"
                         "\"model.norm\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[64,72]}}";
    FILE *model = fopen(model_path, "wb");
    uint64_t header_length = strlen(header);
    fwrite(&header_length, 8, 1, model); /* little-endian host */
    fwrite(header, 1, header_length, model);
    unsigned char weights_data[72];
    for (int i = 0; i < 72; i++) weights_data[i] = (unsigned char)(i * 3 + 1);
    fwrite(weights_data, 1, sizeof weights_data, model);
    fclose(model);
    /* A new store for the weights (the first one is closed at the end). */
    spillway_weights weights = 0;
    CHECK(spillway_weights_register(store, "/nonexistent.safetensors", "m", -1, 1 << 20, 1, &weights) == SPILLWAY_E_INVALID_ARGUMENT);
    CHECK(spillway_weights_register(store, model_path, "tiny", -1, 1 << 20, 1, &weights) == SPILLWAY_OK && weights != 0);
    int32_t layer_ids[8];
    size_t layer_count = 0;
    CHECK(spillway_weights_layers(weights, layer_ids, 8, &layer_count) == SPILLWAY_OK && layer_count == 3);
    CHECK(layer_ids[0] == -1 && layer_ids[1] == 0 && layer_ids[2] == 1);
    spillway_tensor_view views[4];
    size_t tensor_count = 0;
    CHECK(spillway_weights_acquire(weights, 1, views, 4, &tensor_count) == SPILLWAY_OK && tensor_count == 1);
    CHECK(strcmp(views[0].name, "model.layers.1.w") == 0 && strcmp(views[0].dtype, "F16") == 0 && views[0].bytes == 32);
    CHECK(memcmp(views[0].data, weights_data + 32, 32) == 0);
    /* Acquiring a layer this handle already holds (so loaded) never waits: the stall stays put. */
    uint64_t stall = 0, stall_again = 1;
    CHECK(spillway_weights_stall(weights, &stall) == SPILLWAY_OK);
    CHECK(spillway_weights_acquire(weights, 1, views, 4, &tensor_count) == SPILLWAY_OK);
    CHECK(spillway_weights_stall(weights, &stall_again) == SPILLWAY_OK && stall_again == stall);
    /* Releases pair with acquires: two acquired, two released, the third is refused. */
    CHECK(spillway_weights_release(weights, 1) == SPILLWAY_OK);
    CHECK(spillway_weights_release(weights, 1) == SPILLWAY_OK);
    CHECK(spillway_weights_release(weights, 1) == SPILLWAY_E_NOT_ACQUIRED && strstr(spillway_last_error(), "not acquired") != NULL);
    CHECK(spillway_weights_release(weights, 0) == SPILLWAY_E_NOT_ACQUIRED); /* never acquired */
    /* Another handle on the same store cannot release this handle's acquisition. */
    spillway_weights other = 0;
    CHECK(spillway_weights_register(store, model_path, "tiny-2", -1, 1 << 20, 1, &other) == SPILLWAY_OK);
    CHECK(spillway_weights_acquire(weights, 0, views, 4, &tensor_count) == SPILLWAY_OK && tensor_count == 1);
    CHECK(spillway_weights_release(other, 0) == SPILLWAY_E_NOT_ACQUIRED);
    CHECK(memcmp(views[0].data, weights_data, 32) == 0); /* still held, still there */
    CHECK(spillway_weights_release(weights, 0) == SPILLWAY_OK);
    CHECK(spillway_weights_destroy(other) == SPILLWAY_OK);
    CHECK(spillway_weights_acquire(weights, 7, views, 4, &tensor_count) == SPILLWAY_E_INVALID_ARGUMENT);
    CHECK(spillway_weights_acquire(weights, 0, views, 0, &tensor_count) == SPILLWAY_E_BUFFER_TOO_SMALL);
    CHECK(spillway_weights_release(weights, 0) == SPILLWAY_E_NOT_ACQUIRED); /* a failed acquire holds nothing */
    CHECK(spillway_weights_destroy(weights) == SPILLWAY_OK);
    CHECK(spillway_weights_release(weights, 1) == SPILLWAY_E_INVALID_HANDLE);
    remove(model_path);

    CHECK(spillway_kv_pool_destroy(pool) == SPILLWAY_OK);
    CHECK(spillway_kv_lookup(pool, hashes, 2, &matched) == SPILLWAY_E_INVALID_HANDLE);
    CHECK(spillway_store_close(store) == SPILLWAY_OK);
    CHECK(spillway_store_close(store) == SPILLWAY_E_INVALID_HANDLE);
    CHECK(spillway_store_get(store, key, back, sizeof back, &length) == SPILLWAY_E_INVALID_HANDLE);

    if (argc == 2) remove(scratch); /* the directory made here (empty again) */
    printf("%s: %d failure(s)\n", argv[0], failures);
    return failures;
}
