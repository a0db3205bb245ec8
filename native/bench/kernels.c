/*
 * kernels.c -- speed of run.c's matrix-vector kernels when the matrix stays in cache.
 *
 * Usage: kernels n d [n d ...]
 *   for each shape (d rows, n columns) prints "kernel <n> <d> <fp32 GFLOP/s> <q8_0 GFLOP/s>".
 *
 * One matrix is multiplied again and again, so after the first pass it is read from the core's
 * cache: this shows what the arithmetic itself achieves. Generating text instead streams every
 * weight of the model once per token, and for models larger than the cache memory bandwidth
 * decides (see `python -m tiny_transformer bench native`). Build with the same flags as run.c.
 */
#define RUN_LIBRARY
#include "../run.c"

static double cpu_seconds(void) { return (double)clock() / CLOCKS_PER_SEC; }

static double gflops(const Matrix *m, int gs, float *x, float *out) {
    double flops = 2.0 * m->rows * m->cols, best = 0.0;
    long reps = (long)(5e7 / flops) + 1;
    for (int r = 0; r < 5; r++) {
        double t0 = cpu_seconds();
        for (long k = 0; k < reps; k++) {
            matmul(out, x, m, gs);
            x[0] += out[0] * 1e-30f; /* a dependency, so no call can be skipped */
        }
        double dt = cpu_seconds() - t0;
        if (dt > 0 && reps * flops / dt / 1e9 > best) best = reps * flops / dt / 1e9;
        if (dt < 0.02) reps *= 4, r--;
    }
    return best;
}

int main(int argc, char **argv) {
    for (int a = 1; a + 1 < argc; a += 2) {
        int n = atoi(argv[a]), d = atoi(argv[a + 1]), gs = 32;
        if (n <= 0 || d <= 0 || n % gs) {
            fprintf(stderr, "kernels: n must be a positive multiple of %d and d positive, got %d %d\n", gs, n, d);
            return 1;
        }
        size_t count = (size_t)n * d;
        unsigned char *f32 = (unsigned char *)malloc(count * 4);
        unsigned char *q8 = (unsigned char *)malloc(count + count / gs * 4);
        float *x = (float *)malloc((size_t)n * sizeof(float)), *out = (float *)malloc((size_t)d * sizeof(float));
        Config c;
        memset(&c, 0, sizeof(c));
        c.group_size = gs;
        size_t bytes = packed_bytes(&c, d, n) + 64;
        c.weight_type = WT_Q8;
        bytes += packed_bytes(&c, d, n);
        unsigned char *arena = (unsigned char *)malloc(bytes + 64), *cursor = arena;
        if (!f32 || !q8 || !x || !out || !arena) return 2;
        cursor += (64 - (uintptr_t)cursor % 64) % 64;
        for (size_t i = 0; i < count; i++) {
            float v = (float)((int)(i % 13) - 6) * 0.01f;
            memcpy(f32 + 4 * i, &v, 4);
            q8[i] = (unsigned char)(int8_t)((int)(i % 255) - 127);
        }
        for (size_t g = 0; g < count / gs; g++) {
            float s = 0.01f;
            memcpy(q8 + count + 4 * g, &s, 4);
        }
        for (int j = 0; j < n; j++) x[j] = (float)j * 0.001f;
        Matrix mf, mq;
        Tensor tf = {f32, NULL}, tq = {q8, q8 + count};
        c.weight_type = WT_F32;
        pack_matrix(&mf, &c, tf, 0, d, n, &cursor);
        c.weight_type = WT_Q8;
        pack_matrix(&mq, &c, tq, 0, d, n, &cursor);
        double g32 = gflops(&mf, gs, x, out), g8 = gflops(&mq, gs, x, out);
        printf("kernel %d %d %.2f %.2f\n", n, d, g32, g8);
        free(f32), free(q8), free(x), free(out), free(arena);
    }
    return 0;
}
