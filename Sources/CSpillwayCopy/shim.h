// A page copy with non-temporal (streaming) stores, for writing a page into a host-memory tier.
// Why C: Swift cannot emit `movntdq`; this is the one SIMD intrinsic loop Spillway needs.
// Why streaming: a page written to a spill tier is not read back soon, and ordinary stores
// first read every destination line (read-for-ownership) — for a 4 KiB page at a random place
// in a large arena that is 64 cache misses, which the next locked instruction (the directory's
// shard lock, its version clock) then waits for. Streaming stores write the lines without
// reading them. An `sfence` orders them before the caller publishes the page.
#ifndef SPILLWAY_CSPILLWAYCOPY_SHIM_H
#define SPILLWAY_CSPILLWAYCOPY_SHIM_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__)
#include <cpuid.h>
#include <emmintrin.h>
#include <immintrin.h>
#endif

#if defined(__x86_64__)
/// Whether the CPU and the kernel support AVX-512F (CPUID leaf 7 EBX bit 16, and XCR0 saving
/// the opmask and ZMM state). Checked once per module that includes this header; the race
/// on `cached` is benign (every thread computes the same answer).
static inline int spillway_has_avx512f(void) {
    static int cached = -1;
    if (cached < 0) {
        unsigned a, b, c, d;
        int supported = 0;
        if (__get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 27)) &&  // OSXSAVE: xgetbv is allowed
            __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 16))) {
            unsigned low, high;
            __asm__ volatile("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
            supported = (low & 0xE6) == 0xE6;  // SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM state
        }
        cached = supported;
    }
    return cached;
}

/// Returns the AVX and AVX-512 register state to its initial configuration: zmm16-31 zeroed,
/// then VZEROUPPER. Why: once a thread has used AVX-512 (ISA-L's CRC32C and erasure coding
/// pick AVX-512 code on this CPU, and so does the copy below), every context switch saves and
/// restores the extra 1.5 KiB of register state until it is back in its initial
/// configuration, and a queue-depth-1 I/O costs two switches. Measured on this VM (one ISA-L
/// CRC32C call before a liburing QD1 4 KiB read loop): 12.3–13.2k IOPS, against 14.1–16.9k
/// with this reset after it and 14.3–15.9k with no CRC at all. `noinline`: the SysV ABI makes
/// every vector register caller-saved across a call, so no caller keeps a value in one.
__attribute__((noinline, target("avx512f")))
static void spillway_vector_state_reset_avx512(void) {
    __asm__ volatile(
        "vpxord %%zmm16, %%zmm16, %%zmm16\n\tvpxord %%zmm17, %%zmm17, %%zmm17\n\t"
        "vpxord %%zmm18, %%zmm18, %%zmm18\n\tvpxord %%zmm19, %%zmm19, %%zmm19\n\t"
        "vpxord %%zmm20, %%zmm20, %%zmm20\n\tvpxord %%zmm21, %%zmm21, %%zmm21\n\t"
        "vpxord %%zmm22, %%zmm22, %%zmm22\n\tvpxord %%zmm23, %%zmm23, %%zmm23\n\t"
        "vpxord %%zmm24, %%zmm24, %%zmm24\n\tvpxord %%zmm25, %%zmm25, %%zmm25\n\t"
        "vpxord %%zmm26, %%zmm26, %%zmm26\n\tvpxord %%zmm27, %%zmm27, %%zmm27\n\t"
        "vpxord %%zmm28, %%zmm28, %%zmm28\n\tvpxord %%zmm29, %%zmm29, %%zmm29\n\t"
        "vpxord %%zmm30, %%zmm30, %%zmm30\n\tvpxord %%zmm31, %%zmm31, %%zmm31\n\t"
        "vzeroupper"
        ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
            "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22",
            "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31", "memory");
}

/// `spillway_vector_state_reset_avx512` where the CPU has AVX-512, else nothing (AVX2 code
/// ends in VZEROUPPER by convention already).
static inline void spillway_vector_state_reset(void) {
    if (spillway_has_avx512f()) spillway_vector_state_reset_avx512();
}

/// 64-byte streaming stores: one instruction per line instead of four (measured with a CRC
/// per 16 KiB beside it, 64 KiB pages at random slots: 8.4 against 7.3 GiB/s for SSE2).
__attribute__((target("avx512f")))
static inline void spillway_copy_streaming_avx512(void *destination, const void *source, size_t lines) {
    __m512i *to = (__m512i *)destination;
    const char *from = (const char *)source;
    for (size_t line = 0; line < lines; line++) {
        _mm512_stream_si512(to + line, _mm512_loadu_si512((const void *)(from + line * 64)));
    }
}
#endif

/// Copies `length` bytes to `destination`, with streaming stores (64-byte ones where AVX-512F
/// is available and `destination` is 64-byte aligned, else 16-byte ones when both are 16-byte
/// aligned; whole 64-byte lines, the tail with memcpy), then fences. Other inputs: memcpy.
static inline void spillway_copy_streaming(void *destination, const void *source, size_t length) {
#if defined(__x86_64__)
    if (((uintptr_t)destination & 63) == 0 && length >= 64 && spillway_has_avx512f()) {
        size_t lines = length / 64;
        spillway_copy_streaming_avx512(destination, source, lines);
        spillway_vector_state_reset_avx512();
        size_t done = lines * 64;
        if (done < length) memcpy((char *)destination + done, (const char *)source + done, length - done);
        _mm_sfence();
        return;
    }
    if (((uintptr_t)destination & 15) == 0 && ((uintptr_t)source & 15) == 0 && length >= 64) {
        __m128i *to = (__m128i *)destination;
        const __m128i *from = (const __m128i *)source;
        size_t lines = length / 64;
        for (size_t line = 0; line < lines; line++) {
            __m128i a = _mm_load_si128(from + 0), b = _mm_load_si128(from + 1);
            __m128i c = _mm_load_si128(from + 2), d = _mm_load_si128(from + 3);
            _mm_stream_si128(to + 0, a);
            _mm_stream_si128(to + 1, b);
            _mm_stream_si128(to + 2, c);
            _mm_stream_si128(to + 3, d);
            to += 4;
            from += 4;
        }
        size_t done = lines * 64;
        if (done < length) memcpy((char *)destination + done, (const char *)source + done, length - done);
        _mm_sfence();
        return;
    }
#endif
    memcpy(destination, source, length);
}
#endif
