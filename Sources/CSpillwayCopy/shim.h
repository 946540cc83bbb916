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
#include <emmintrin.h>
#endif

/// Copies `length` bytes to `destination`, with streaming stores when both are 16-byte aligned
/// (whole 64-byte lines; the tail, if any, with memcpy), then fences. Other inputs: memcpy.
static inline void spillway_copy_streaming(void *destination, const void *source, size_t length) {
#if defined(__x86_64__)
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
