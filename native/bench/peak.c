/*
 * peak.c -- what one core of this machine can do at best, to put run.c's speed in perspective.
 *
 * Usage: peak [bytes ...]
 *   prints "fma_gflops <x>": fp32 multiply-add throughput (one thread), and for every size given
 *   "read_gbps <bytes> <x>": how fast one thread streams through a buffer of that size.
 *
 * Build it with the same flags as run.c (native_bench.py does), so both use the same vector width.
 * The multiply-add loop keeps 12 independent vector accumulators: a multiply-add takes about 4
 * cycles and a core can start 1-2 per cycle, so fewer accumulators would measure latency instead
 * of throughput. Times are CPU time (clock()), so other programs sharing the machine do not count.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__AVX512F__)
#define VLEN 16
#elif defined(__AVX__)
#define VLEN 8
#else
#define VLEN 4
#endif
typedef float vfloat __attribute__((vector_size(VLEN * sizeof(float))));

static double cpu_seconds(void) { return (double)clock() / CLOCKS_PER_SEC; }

static double fma_gflops(void) {
    vfloat m, c, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11;
    for (int i = 0; i < VLEN; i++) {
        m[i] = 0.999999f, c[i] = 1e-6f;
        a0[i] = a1[i] = a2[i] = a3[i] = a4[i] = a5[i] = (float)i;
        a6[i] = a7[i] = a8[i] = a9[i] = a10[i] = a11[i] = (float)-i;
    }
    long iters = 2000000;
    double best = 0.0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = cpu_seconds();
        for (long it = 0; it < iters; it++) {
            a0 = a0 * m + c, a1 = a1 * m + c, a2 = a2 * m + c, a3 = a3 * m + c;
            a4 = a4 * m + c, a5 = a5 * m + c, a6 = a6 * m + c, a7 = a7 * m + c;
            a8 = a8 * m + c, a9 = a9 * m + c, a10 = a10 * m + c, a11 = a11 * m + c;
        }
        double dt = cpu_seconds() - t0;
        if (dt > 0 && iters * 12.0 * VLEN * 2.0 / dt / 1e9 > best) best = iters * 12.0 * VLEN * 2.0 / dt / 1e9;
        if (dt < 0.05) iters *= 2, rep--; /* too short to time: run longer */
    }
    vfloat s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
    float sink = 0.0f;
    for (int i = 0; i < VLEN; i++) sink += s[i];
    if (sink == 12345.0f) printf(" "); /* keep the result alive */
    return best;
}

static double read_gbps(size_t bytes) {
    size_t n = bytes / sizeof(float) / (4 * VLEN) * (4 * VLEN);
    if (n == 0) n = 4 * VLEN;
    float *buf = (float *)malloc(n * sizeof(float));
    if (!buf) return 0.0;
    for (size_t i = 0; i < n; i++) buf[i] = (float)(i % 7);
    vfloat s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, v;
    long reps = (long)(4e8 / (double)(n * sizeof(float))) + 1;
    double best = 0.0;
    for (int r = 0; r < 5; r++) {
        double t0 = cpu_seconds();
        for (long k = 0; k < reps; k++)
            for (size_t i = 0; i < n; i += 4 * VLEN) {
                memcpy(&v, buf + i, sizeof(v)), s0 += v;
                memcpy(&v, buf + i + VLEN, sizeof(v)), s1 += v;
                memcpy(&v, buf + i + 2 * VLEN, sizeof(v)), s2 += v;
                memcpy(&v, buf + i + 3 * VLEN, sizeof(v)), s3 += v;
            }
        double dt = cpu_seconds() - t0;
        if (dt > 0 && (double)reps * n * sizeof(float) / dt / 1e9 > best) best = (double)reps * n * sizeof(float) / dt / 1e9;
    }
    vfloat s = s0 + s1 + s2 + s3;
    if (s[0] == 12345.0f) printf(" ");
    free(buf);
    return best;
}

int main(int argc, char **argv) {
    printf("vector_lanes %d\n", VLEN);
    printf("fma_gflops %.2f\n", fma_gflops());
    for (int i = 1; i < argc; i++) {
        size_t bytes = (size_t)strtoull(argv[i], NULL, 10);
        printf("read_gbps %zu %.2f\n", bytes, read_gbps(bytes));
    }
    return 0;
}
