/*
 * kernels.c -- speed and exactness of run.c's matrix-vector kernels.
 *
 * Usage: kernels n d [n d ...]
 *          for each shape (d rows, n columns) prints
 *          "kernel <n> <d> <fp32 GFLOP/s> <q8_0 GFLOP/s> <q4_0 GFLOP/s>"
 *        kernels check
 *          checks the Q8_0 and Q4_0 kernels of this build against exact integer arithmetic; prints
 *          "check ok <cases>" or what differs (exit status 1)
 *
 * Speed: one matrix is multiplied again and again, so after the first pass it is read from the
 * core's cache: this shows what the arithmetic itself achieves. The Q8_0 and Q4_0 times include
 * quantizing x, as every product in run.c needs (2 FLOPs are counted per multiply-add, whatever
 * the number type). Generating text instead streams every weight of the model
 * once per token, and for models larger than the cache memory bandwidth decides (see
 * `python -m tiny_transformer bench native`). Build with the same flags as run.c.
 *
 * Exactness: run.c's Q8_0 and Q4_0 kernels (AVX-512 VNNI, AVX-VNNI or plain C, whichever this
 * build compiled) must produce exactly the integer sums of int8 or 4-bit weights times int8
 * activations. With
 * activations that are already integers in -127..127 (one of them +-127 per group, so the input
 * scale is exactly 1) and power-of-two weight scales, every float operation after the integer sums
 * is exact too, so each output must equal the sum computed here in 64-bit integers from the
 * unpacked weights -- bit for bit, whatever the summation order. Weights cover their whole range
 * (int8: -128..127, 4 bits: -8..7). quantize_vec is checked against a plain restatement of its rule, on random
 * numbers, zeros, infinities, NaNs and tiny values.
 */
#define RUN_LIBRARY
#include "../run.c"

static double cpu_seconds(void) { return (double)clock() / CLOCKS_PER_SEC; }

static double gflops(const Matrix *m, QuantVec *xq, float *x, float *out) {
    double flops = 2.0 * m->rows * m->cols, best = 0.0;
    long reps = (long)(5e7 / flops) + 1;
    for (int r = 0; r < 5; r++) {
        double t0 = cpu_seconds();
        for (long k = 0; k < reps; k++) {
            if (m->q) quantize_vec(xq, x, m->cols, m->group_size, weight_offset(m->type));
            matmul(out, x, xq, m);
            x[0] += out[0] * 1e-30f; /* a dependency, so no call can be skipped */
        }
        double dt = cpu_seconds() - t0;
        if (dt > 0 && reps * flops / dt / 1e9 > best) best = reps * flops / dt / 1e9;
        if (dt < 0.02) reps *= 4, r--;
    }
    return best;
}

/* ---- exactness check ---- */

static uint64_t rng = 88172645463325252ull;
static uint32_t rnd(uint32_t n) { /* xorshift64, uniform enough for test data */
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 32) % n;
}

static int same_float(float a, float b) { return memcmp(&a, &b, 4) == 0 || (a != a && b != b); }

/* quantize_vec against its rule restated in plain C; returns the number of differences. */
static int check_quantize(int n, int gs, int special, int offset) {
    float *x = (float *)malloc((size_t)n * sizeof(float));
    QuantVec v = {(int8_t *)malloc((size_t)n), (float *)malloc((size_t)(n / gs) * 4), (int32_t *)malloc((size_t)(n / gs) * 4)};
    int bad = 0;
    for (int j = 0; j < n; j++) {
        x[j] = ((float)rnd(2000001) - 1000000.0f) * 1e-5f * (float)(1 + rnd(8));
        if (special && rnd(6) == 0) {
            static const float odd[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1e-40f, -3e-39f, 1e30f, 0.5f, -2.5f};
            x[j] = odd[rnd(10)];
        }
    }
    if (special) memset(x, 0, (size_t)gs * sizeof(float)); /* an all-zero group */
    quantize_vec(&v, x, n, gs, offset);
    for (int g = 0; g < n / gs; g++) {
        float amax = 0.0f;
        for (int j = g * gs; j < (g + 1) * gs; j++)
            if (fabsf(x[j]) > amax) amax = fabsf(x[j]);
        float scale = amax / 127.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
        int32_t sum = 0;
        for (int j = g * gs; j < (g + 1) * gs; j++) {
            float f = x[j] * inv;
            int q = f != f ? -127 : (int)nearbyintf(f < -127.0f ? -127.0f : (f > 127.0f ? 127.0f : f));
            sum += q;
            if (v.q[j] != q) {
                if (bad++ < 5) fprintf(stderr, "quantize n=%d gs=%d: x[%d] = %g gives q %d, expected %d\n", n, gs, j, x[j], v.q[j], q);
            }
        }
        if (!same_float(v.scale[g], scale) || v.bias[g] != -offset * sum) {
            if (bad++ < 5) fprintf(stderr, "quantize n=%d gs=%d: group %d scale %g bias %d, expected %g %d\n", n, gs, g,
                                   v.scale[g], v.bias[g], scale, -offset * sum);
        }
    }
    free(x), free(v.q), free(v.scale), free(v.bias);
    return bad;
}

/* The int value of weight i of a file tensor of this type. */
static int file_q(const unsigned char *file, size_t i, int type) {
    if (type == WT_Q4) return (file[i / 2] >> (4 * (i % 2)) & 15) - 8;
    return (int8_t)file[i];
}

/* One Q8_0 or Q4_0 product (rows x cols, group gs) against 64-bit integer sums; returns differences. */
static int check_product(int rows, int cols, int gs, int type) {
    size_t count = (size_t)rows * cols, groups = count / gs, vbytes = type == WT_Q4 ? count / 2 : count;
    unsigned char *file = (unsigned char *)malloc(vbytes + groups * 4);
    float *x = (float *)malloc((size_t)cols * sizeof(float)), *out = (float *)malloc((size_t)rows * sizeof(float));
    float *row = (float *)malloc((size_t)cols * sizeof(float));
    QuantVec v = {(int8_t *)malloc((size_t)cols), (float *)malloc((size_t)(cols / gs) * 4), (int32_t *)malloc((size_t)(cols / gs) * 4)};
    Config c;
    memset(&c, 0, sizeof(c));
    c.weight_type = type, c.group_size = gs;
    unsigned char *arena = (unsigned char *)malloc(packed_bytes(&c, rows, cols) + 64), *cursor = arena;
    cursor += (64 - (uintptr_t)cursor % 64) % 64;
    for (size_t i = 0; i < vbytes; i++) file[i] = (unsigned char)rnd(256); /* every int8, or every pair of 4-bit values */
    for (size_t g = 0; g < groups; g++) {
        float s = (rnd(2) ? 1.0f : -1.0f) / (float)(1 << rnd(3)); /* +-1, 1/2 or 1/4: products stay exact */
        memcpy(file + vbytes + 4 * g, &s, 4);
    }
    for (int j = 0; j < cols; j++) x[j] = (float)((int)rnd(255) - 127);
    for (int g = 0; g < cols / gs; g++) x[g * gs + (int)rnd((uint32_t)gs)] = rnd(2) ? 127.0f : -127.0f; /* scale 1 */
    Matrix m;
    Tensor t = {file, file + vbytes};
    pack_matrix(&m, &c, t, 0, rows, cols, &cursor);
    quantize_vec(&v, x, cols, gs, weight_offset(type));
    matmul(out, x, &v, &m);
    int bad = 0;
    const char *name = type == WT_Q4 ? "q4_0" : "q8_0";
    for (int r = 0; r < rows; r++) {
        double want = 0.0; /* sum of exact integer group sums times exact scales */
        for (int g = 0; g < cols / gs; g++) {
            int64_t sum = 0;
            for (int j = g * gs; j < (g + 1) * gs; j++) sum += (int64_t)file_q(file, (size_t)r * cols + j, type) * (int64_t)x[j];
            want += (double)sum * load_f32(file + vbytes + ((size_t)r * (cols / gs) + g) * 4);
        }
        if (out[r] != (float)want) {
            if (bad++ < 5) fprintf(stderr, "%s product %dx%d gs=%d: row %d gives %.9g, expected %.9g\n", name, rows, cols, gs, r, out[r], want);
        }
    }
    /* the plain-C kernel and the embedding row read the same layout */
    size_t stride = (size_t)(cols / gs) * group_bytes(type, gs);
    for (int p = 0; p < (rows + QROWS - 1) / QROWS; p++) {
        float acc[QROWS];
        quant_panels_c(acc, &v, m.q + (size_t)p * stride, stride, 1, gs, cols / gs, type);
        for (int r = 0; r < QROWS && p * QROWS + r < rows; r++)
            if (acc[r] != out[p * QROWS + r] && bad++ < 5)
                fprintf(stderr, "%s plain-C kernel %dx%d gs=%d: row %d gives %.9g, vector kernel %.9g\n", name, rows, cols,
                        gs, p * QROWS + r, acc[r], out[p * QROWS + r]);
    }
    int r = (int)rnd((uint32_t)rows);
    embedding_row(row, &m, r);
    for (int j = 0; j < cols; j++) {
        float want = (float)file_q(file, (size_t)r * cols + j, type) * load_f32(file + vbytes + ((size_t)r * (cols / gs) + j / gs) * 4);
        if (row[j] != want && bad++ < 5) fprintf(stderr, "%s embedding row %d col %d: %g, expected %g\n", name, r, j, row[j], want);
    }
    free(file), free(x), free(out), free(row), free(arena), free(v.q), free(v.scale), free(v.bias);
    return bad;
}

static int check(void) {
    static const int group_sizes[] = {4, 8, 12, 16, 20, 32, 64};
    static const int row_counts[] = {1, 7, 15, 16, 17, 31, 48, 63, 64, 65, 100, 130};
    int cases = 0, bad = 0;
    for (size_t gi = 0; gi < sizeof(group_sizes) / sizeof(group_sizes[0]); gi++) {
        int gs = group_sizes[gi];
        for (int ng = 1; ng * gs <= 192; ng += (ng < 3 ? 1 : 2)) {
            for (size_t ri = 0; ri < sizeof(row_counts) / sizeof(row_counts[0]); ri++) {
                bad += check_product(row_counts[ri], ng * gs, gs, WT_Q8), cases++;
                if (gs % 8 == 0) bad += check_product(row_counts[ri], ng * gs, gs, WT_Q4), cases++;
            }
            bad += check_quantize(ng * gs, gs, 0, 128) + check_quantize(ng * gs, gs, 1, 8);
            cases += 2;
        }
    }
    if (bad) {
        printf("check failed: %d differences in %d cases\n", bad, cases);
        return 1;
    }
    printf("check ok %d\n", cases);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "check") == 0) return check();
    for (int a = 1; a + 1 < argc; a += 2) {
        int n = atoi(argv[a]), d = atoi(argv[a + 1]), gs = 32;
        if (n <= 0 || d <= 0 || n % gs) {
            fprintf(stderr, "kernels: n must be a positive multiple of %d and d positive, got %d %d\n", gs, n, d);
            return 1;
        }
        size_t count = (size_t)n * d;
        unsigned char *f32 = (unsigned char *)malloc(count * 4);
        unsigned char *q8 = (unsigned char *)malloc(count + count / gs * 4);
        unsigned char *q4 = (unsigned char *)malloc(count / 2 + count / gs * 4);
        float *x = (float *)malloc((size_t)n * sizeof(float)), *out = (float *)malloc((size_t)d * sizeof(float));
        QuantVec xq = {(int8_t *)malloc((size_t)n), (float *)malloc((size_t)(n / gs) * 4), (int32_t *)malloc((size_t)(n / gs) * 4)};
        Config c;
        memset(&c, 0, sizeof(c));
        c.group_size = gs;
        size_t bytes = packed_bytes(&c, d, n) + 64;
        c.weight_type = WT_Q8;
        bytes += packed_bytes(&c, d, n);
        c.weight_type = WT_Q4;
        bytes += packed_bytes(&c, d, n);
        unsigned char *arena = (unsigned char *)malloc(bytes + 64), *cursor = arena;
        if (!f32 || !q8 || !q4 || !x || !out || !arena || !xq.q || !xq.scale || !xq.bias) return 2;
        cursor += (64 - (uintptr_t)cursor % 64) % 64;
        for (size_t i = 0; i < count; i++) {
            float v = (float)((int)(i % 13) - 6) * 0.01f;
            memcpy(f32 + 4 * i, &v, 4);
            q8[i] = (unsigned char)(int8_t)((int)(i % 255) - 127);
            if (i % 2 == 0) q4[i / 2] = (unsigned char)(i % 16 | (i + 5) % 16 << 4);
        }
        for (size_t g = 0; g < count / gs; g++) {
            float s = 0.01f;
            memcpy(q8 + count + 4 * g, &s, 4);
            memcpy(q4 + count / 2 + 4 * g, &s, 4);
        }
        for (int j = 0; j < n; j++) x[j] = (float)j * 0.001f;
        Matrix mf, mq, m4;
        Tensor tf = {f32, NULL}, tq = {q8, q8 + count}, t4 = {q4, q4 + count / 2};
        c.weight_type = WT_F32;
        pack_matrix(&mf, &c, tf, 0, d, n, &cursor);
        c.weight_type = WT_Q8;
        pack_matrix(&mq, &c, tq, 0, d, n, &cursor);
        c.weight_type = WT_Q4;
        pack_matrix(&m4, &c, t4, 0, d, n, &cursor);
        double g32 = gflops(&mf, &xq, x, out), g8 = gflops(&mq, &xq, x, out), g4 = gflops(&m4, &xq, x, out);
        printf("kernel %d %d %.2f %.2f %.2f\n", n, d, g32, g8, g4);
        free(f32), free(q8), free(q4), free(x), free(out), free(arena), free(xq.q), free(xq.scale), free(xq.bias);
    }
    return 0;
}
