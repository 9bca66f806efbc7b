// The memory-bandwidth ceiling benches/RESULTS.md quotes: a 2-thread AVX-512 read loop over 512 MiB,
// best of 10 passes. Build and run: gcc -O3 -mavx512f -fopenmp scripts/membw.c -o /tmp/membw && /tmp/membw
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
int main(void) {
    size_t n = (512ul << 20) / sizeof(float);
    float *a = aligned_alloc(64, n * sizeof(float));
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 1023);
    double best = 0; float sink = 0;
    for (int pass = 0; pass < 10; pass++) {
        double t0 = omp_get_wtime();
        float total = 0;
        #pragma omp parallel for num_threads(2) reduction(+:total)
        for (size_t c = 0; c < n; c += 1 << 16) {
            __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
            for (size_t i = c; i < c + (1 << 16); i += 64) {
                s0 = _mm512_add_ps(s0, _mm512_load_ps(a + i));
                s1 = _mm512_add_ps(s1, _mm512_load_ps(a + i + 16));
                s2 = _mm512_add_ps(s2, _mm512_load_ps(a + i + 32));
                s3 = _mm512_add_ps(s3, _mm512_load_ps(a + i + 48));
            }
            total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
        }
        double gbs = n * sizeof(float) / (omp_get_wtime() - t0) / 1e9;
        if (gbs > best) best = gbs;
        sink += total;
    }
    printf("read bandwidth, 2 threads, best of 10: %.1f GB/s (%g)\n", best, sink);
    return 0;
}
