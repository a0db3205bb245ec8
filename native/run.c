/*
 * run.c -- inference for a Llama-style transformer, in one C file.
 *
 * Read it top to bottom: short vectors, errors, the model file format and its checks, packed weights
 * and the matrix-vector product, the forward pass, tokenizer, sampler, generation, and finally the
 * two front ends: a small C API for Python (compiled with -DRUN_LIBRARY, loaded with cffi or ctypes)
 * and the command-line program (`main`).
 *
 * Two model file formats are read:
 *   - llama2.c's legacy "version 0" model.bin: 7 int32 then fp32 weights. Byte compatible, so the
 *     published llama2.c models (stories15M.bin, ...) run unchanged.
 *   - our extended format (256-byte header starting with a magic number and a version) for what
 *     version 0 cannot say: QK-norm, logit soft-capping, RoPE theta, norm eps, sliding-window
 *     attention, a padded classifier and 8- or 4-bit weights (Q8_0, Q4_0), which run.c multiplies by
 *     int8-quantized activations in integer arithmetic. Its first int32 is negative, so a version-0 reader sees
 *     "dim < 0" and refuses it instead of misreading it.
 * native/README.md documents both byte by byte.
 *
 * Every number in a file is checked before it is trusted: dimensions, their consistency, and that the
 * file size is exactly what the header implies. Errors say what is wrong and how to fix it.
 *
 * Build:  cc -O3 -march=native -o native/build/run native/run.c -lm     (this CPU only)
 *         cc -O3 -o native/build/run native/run.c -lm                   (portable)
 *         add -fopenmp to spread the matrix-vector products over cores (off by default).
 * Run:    native/build/run model.bin -z tokenizer.bin -t 0.8 -p 0.9 -n 256 -i "ROMEO:"
 */

#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#endif
#if defined(__linux__) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE /* madvise */
#endif
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif
#if (defined(__GNUC__) || defined(__clang__)) && !defined(RUN_NO_VECTORS) && \
    (defined(__AVX512F__) || defined(__AVX2__))
#include <immintrin.h>
#endif

/* ------------------------------------------------------------------------------------------------
 * Short vectors. GCC and Clang let C work on fixed-size vectors of floats ("vector extensions");
 * they compile to SIMD instructions (AVX-512, AVX2, SSE, NEON) without -ffast-math, because each
 * lane is an independent computation. Other compilers get plain loops.
 */
#if (defined(__GNUC__) || defined(__clang__)) && !defined(RUN_NO_VECTORS) /* -DRUN_NO_VECTORS: plain C */
#define HAVE_VEC 1
#if defined(__AVX512F__)
#define VLEN 16 /* floats per vector: the widest registers the target has */
#elif defined(__AVX__)
#define VLEN 8
#else
#define VLEN 4 /* SSE2, NEON */
#endif
typedef float vfloat __attribute__((vector_size(VLEN * sizeof(float))));

static inline vfloat vload(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof(v)); /* any alignment */
    return v;
}

static inline void vstore(float *p, vfloat v) { memcpy(p, &v, sizeof(v)); }

/* Lane-wise choice: mask lanes are all ones (take a) or all zeros (take b), as comparisons give. */
typedef int32_t vint __attribute__((vector_size(VLEN * sizeof(int32_t))));
typedef uint32_t vuint __attribute__((vector_size(VLEN * sizeof(uint32_t))));
static inline vfloat vselect(vint mask, vfloat a, vfloat b) { return (vfloat)((mask & (vint)a) | (~mask & (vint)b)); }

static inline float vsum(vfloat v) {
    float lanes[VLEN], s = 0.0f;
    vstore(lanes, v);
    for (int i = 0; i < VLEN; i++) s += lanes[i];
    return s;
}

/* e^x on a whole vector, within about 1 ulp of expf (softmax and SiLU call exp thousands of times
 * per token, and libm's expf works one number at a time). e^x = 2^k * e^r with k = round(x / ln 2)
 * and |r| <= ln(2)/2; e^r from its Taylor series to r^7/7!, 2^k built directly in the exponent
 * bits. Inputs are clamped to [-87, 88] so 2^k stays a normal float. */
static inline vfloat vexp(vfloat x) {
    const vfloat zero = {0}, lo = zero - 87.0f, hi = zero + 88.0f;
    x = vselect(x < lo, lo, x); /* NaN compares false: NaN lanes stay NaN */
    x = vselect(x > hi, hi, x);
    const float shift = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer, kept in the low bits */
    vfloat t = x * 1.44269504088896341f + shift;
    vfloat k = t - shift;
    vfloat r = x - k * 0.693359375f; /* x - k ln 2, with ln 2 split in two parts for accuracy */
    r = r - k * -2.12194440e-4f;
    vfloat p = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vuint e = ((vuint)t - 0x4B400000u + 127u) << 23; /* k + 127 in the exponent field: 2^k */
    return p * (vfloat)e;
}
#define PANEL VLEN /* rows per panel of a packed matrix (see "Packed weights") */
#define KBLOCK (2 * VLEN) /* positions per block of the key cache (see attention_scores) */
#else
#define PANEL 8
#define KBLOCK 8
#endif

/* ------------------------------------------------------------------------------------------------
 * Errors. Every function that can fail returns 0 on success and -1 on failure after writing a
 * message into an Err. The command-line program prints it; the library hands it back to the caller
 * (no exit() anywhere in library code).
 */

typedef struct {
    char *buf;
    int len;
} Err;

static int fail(Err *err, const char *fmt, ...) {
    if (err && err->buf && err->len > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->buf, (size_t)err->len, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* ------------------------------------------------------------------------------------------------
 * Model file format and configuration
 */

#define BOS_ID 1 /* llama2.c convention, also SentencePiece's default with unk=0, bos=1, eos=2 */
#define EOS_ID 2
#define UNK_ID 0

#define V0_HEADER_BYTES 28       /* 7 x int32 */
#define EXT_HEADER_BYTES 256     /* fixed size; unused bytes are reserved and must be zero */
#define EXT_MAGIC 0x8D4C5454u    /* bytes "TTL\x8d": read as an int32 `dim` this is negative */
#define EXT_VERSION 1
#define AK42_MAGIC 0x616b3432u   /* llama2.c's export.py --version 1/2 files (not read here) */

#define FLAG_SHARED_CLASSIFIER 1 /* classifier = token embedding table (tied weights) */
#define FLAG_QK_NORM 2           /* RMSNorm over each head's q and k before RoPE */
#define KNOWN_FLAGS (FLAG_SHARED_CLASSIFIER | FLAG_QK_NORM)

#define WT_F32 0 /* weight types */
#define WT_Q8 1  /* Q8_0: int8 weights, one fp32 scale per group of `group_size` along each row */
#define WT_Q4 2  /* Q4_0: 4-bit weights (-8..7, two per byte), one fp32 scale per group */

/* Upper limits keep all size arithmetic far from overflow (sizes are computed in 64 bits) and catch
 * garbage headers early. They are far above anything this engine is meant for. */
#define MAX_DIM (1 << 16)
#define MAX_HIDDEN (1 << 18)
#define MAX_LAYERS 1024
#define MAX_VOCAB (1 << 22)
#define MAX_SEQ_LEN (1 << 20)
#define MAX_TOKEN_BYTES 4096       /* longest tokenizer piece we accept */
#define MAX_PROMPT_BYTES 65536     /* longest prompt generate/chat accept */
#define MAX_GROUP 1024             /* largest Q8_0/Q4_0 group: keeps every int32 group sum far from overflow */

/* The KV cache is n_layers * seq_len * kv_dim * 2 floats; refuse headers that would need more. */
static uint64_t max_state_bytes = 4ull << 30;

typedef struct {
    int dim;            /* width of the residual stream */
    int hidden_dim;     /* width of the feed-forward layer */
    int n_layers;
    int n_heads;        /* query heads */
    int n_kv_heads;     /* key/value heads (< n_heads: grouped-query attention) */
    int vocab_size;     /* tokens the tokenizer knows; logits returned per position */
    int seq_len;        /* longest context */
    int head_rows;      /* rows of the classifier (>= vocab_size; extra rows are padding) */
    int shared_classifier;
    int qk_norm;
    int sliding_window; /* attend to at most this many most recent positions; 0 = all */
    int weight_type;    /* WT_F32, WT_Q8 or WT_Q4 */
    int group_size;     /* Q8_0/Q4_0 group size (0 for fp32) */
    float norm_eps;
    double rope_theta;
    float logit_softcap; /* logits = cap * tanh(logits / cap); 0 = off */
    int version;         /* 0 = llama2.c legacy, 1 = ours */
} Config;

/* A tensor as stored in the file: bytes of fp32 values, or of quantized values (Q8_0: one int8 per
 * byte; Q4_0: two 4-bit values per byte) followed by the group scales. Read through memcpy, so any
 * alignment is fine. */
typedef struct {
    const unsigned char *data;
    const unsigned char *scales; /* Q8_0 and Q4_0 only */
} Tensor;

/* Where each tensor lies in the file (layers stacked, see native/README.md). */
typedef struct {
    Tensor token_embedding; /* (vocab_size, dim) */
    Tensor rms_att;         /* (layer, dim) */
    Tensor wq;              /* (layer, n_heads * head_size, dim) */
    Tensor wk;              /* (layer, n_kv_heads * head_size, dim) */
    Tensor wv;              /* (layer, n_kv_heads * head_size, dim) */
    Tensor q_norm;          /* (layer, head_size), QK-norm only */
    Tensor k_norm;          /* (layer, head_size), QK-norm only */
    Tensor wo;              /* (layer, dim, n_heads * head_size) */
    Tensor rms_ffn;         /* (layer, dim) */
    Tensor w1;              /* (layer, hidden, dim) */
    Tensor w2;              /* (layer, dim, hidden) */
    Tensor w3;              /* (layer, hidden, dim) */
    Tensor rms_final;       /* (dim) */
    Tensor wcls;            /* (head_rows, dim) */
} FileWeights;

static int32_t read_i32(const unsigned char *p) {
    /* Files are little-endian; assemble bytes so the code also works on big-endian machines. */
    uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    int32_t v;
    memcpy(&v, &u, 4);
    return v;
}

static float read_f32(const unsigned char *p) {
    int32_t i = read_i32(p);
    float f;
    memcpy(&f, &i, 4);
    return f;
}

static double read_f64(const unsigned char *p) {
    uint64_t u = (uint64_t)(uint32_t)read_i32(p) | (uint64_t)(uint32_t)read_i32(p + 4) << 32;
    double d;
    memcpy(&d, &u, 8);
    return d;
}

static int is_big_endian(void) {
    const uint16_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 0;
}

/* Check the dimensions every format shares. `what` names the file in messages. */
static int check_dims(const Config *c, const char *what, Err *err) {
    if (c->dim <= 0 || c->dim > MAX_DIM)
        return fail(err, "%s: dim = %d is out of range (1..%d); the file is not a model file or is corrupt",
                    what, c->dim, MAX_DIM);
    if (c->hidden_dim <= 0 || c->hidden_dim > MAX_HIDDEN)
        return fail(err, "%s: hidden_dim = %d is out of range (1..%d); the file is corrupt", what,
                    c->hidden_dim, MAX_HIDDEN);
    if (c->n_layers <= 0 || c->n_layers > MAX_LAYERS)
        return fail(err, "%s: n_layers = %d is out of range (1..%d); the file is corrupt", what,
                    c->n_layers, MAX_LAYERS);
    if (c->n_heads <= 0 || c->n_heads > c->dim || c->dim % c->n_heads != 0)
        return fail(err, "%s: n_heads = %d must be positive and divide dim = %d; the file is corrupt",
                    what, c->n_heads, c->dim);
    if (c->n_kv_heads <= 0 || c->n_kv_heads > c->n_heads || c->n_heads % c->n_kv_heads != 0)
        return fail(err,
                    "%s: n_kv_heads = %d must be positive and divide n_heads = %d; the file is corrupt",
                    what, c->n_kv_heads, c->n_heads);
    if ((c->dim / c->n_heads) % 2 != 0)
        return fail(err, "%s: head size dim/n_heads = %d must be even for RoPE; the file is corrupt",
                    what, c->dim / c->n_heads);
    if (c->vocab_size <= 0 || c->vocab_size > MAX_VOCAB)
        return fail(err, "%s: vocab_size = %d is out of range (1..%d); the file is corrupt", what,
                    c->vocab_size, MAX_VOCAB);
    if (c->seq_len <= 0 || c->seq_len > MAX_SEQ_LEN)
        return fail(err, "%s: seq_len = %d is out of range (1..%d); the file is corrupt", what,
                    c->seq_len, MAX_SEQ_LEN);
    uint64_t kv_dim = (uint64_t)c->dim / c->n_heads * c->n_kv_heads;
    uint64_t state = (uint64_t)c->n_layers * c->seq_len * kv_dim * 2 * sizeof(float);
    if (state > max_state_bytes)
        return fail(err,
                    "%s: the KV cache for seq_len = %d would take %.1f GiB (limit %.1f GiB); the file "
                    "is corrupt, or export the model with a smaller max_seq_len",
                    what, c->seq_len, state / 1073741824.0, max_state_bytes / 1073741824.0);
    return 0;
}

static const char *weight_type_name(int type) {
    return type == WT_F32 ? "fp32" : type == WT_Q8 ? "Q8_0" : type == WT_Q4 ? "Q4_0" : "unknown";
}

/* Bytes of the values of a weight tensor with n elements of the file's weight type (for Q8_0 and
 * Q4_0 the group scales follow them), and of the whole tensor. */
static uint64_t value_bytes(const Config *c, uint64_t n) {
    return c->weight_type == WT_Q8 ? n : c->weight_type == WT_Q4 ? n / 2 : n * 4;
}

static uint64_t tensor_bytes(const Config *c, uint64_t n) {
    return value_bytes(c, n) + (c->weight_type == WT_F32 ? 0 : n / (uint64_t)c->group_size * 4);
}

/* Walk the weight layout once. With base == NULL it only counts bytes; otherwise it also records
 * where each tensor starts. Doing both with one function guarantees the size check and the reads
 * agree. */
static uint64_t map_weights(const Config *c, FileWeights *w, const unsigned char *base, uint64_t offset) {
    uint64_t L = (uint64_t)c->n_layers, dim = (uint64_t)c->dim, hidden = (uint64_t)c->hidden_dim;
    uint64_t hs = dim / (uint64_t)c->n_heads, kv_dim = hs * (uint64_t)c->n_kv_heads;
    FileWeights tmp;
    if (!w) w = &tmp;
    memset(w, 0, sizeof(*w));

#define TAKE_F32(field, n)                                \
    do {                                                  \
        if (base) w->field.data = base + offset;          \
        offset += (uint64_t)(n) * 4;                      \
    } while (0)
#define TAKE_MAT(field, n)                                \
    do {                                                  \
        uint64_t n_ = (n);                                \
        if (base) w->field.data = base + offset;          \
        if (base && c->weight_type != WT_F32)             \
            w->field.scales = base + offset + value_bytes(c, n_); \
        offset += tensor_bytes(c, n_);                    \
    } while (0)

    TAKE_MAT(token_embedding, (uint64_t)c->vocab_size * dim);
    TAKE_F32(rms_att, L * dim);
    TAKE_MAT(wq, L * dim * dim);
    TAKE_MAT(wk, L * kv_dim * dim);
    TAKE_MAT(wv, L * kv_dim * dim);
    if (c->version > 0 && c->qk_norm) {
        TAKE_F32(q_norm, L * hs);
        TAKE_F32(k_norm, L * hs);
    }
    TAKE_MAT(wo, L * dim * dim);
    TAKE_F32(rms_ffn, L * dim);
    TAKE_MAT(w1, L * hidden * dim);
    TAKE_MAT(w2, L * dim * hidden);
    TAKE_MAT(w3, L * hidden * dim);
    TAKE_F32(rms_final, dim);
    if (c->version == 0) offset += (uint64_t)c->seq_len * hs * 4; /* freq_cis real + imag: unused */
    if (c->shared_classifier) {
        w->wcls = w->token_embedding;
    } else {
        TAKE_MAT(wcls, (uint64_t)c->head_rows * dim);
    }
#undef TAKE_F32
#undef TAKE_MAT
    return offset;
}

/* Parse and validate a model held in memory (the whole file). */
static int parse_model(const unsigned char *data, uint64_t size, Config *c, FileWeights *w, Err *err) {
    memset(c, 0, sizeof(*c));
    if (is_big_endian())
        return fail(err, "this engine maps little-endian weights directly and needs a little-endian CPU");
    if (size < V0_HEADER_BYTES)
        return fail(err,
                    "model file is %llu bytes, smaller than the smallest header (28 bytes): it is "
                    "empty or truncated; export it again",
                    (unsigned long long)size);
    uint32_t magic = (uint32_t)read_i32(data);
    if (magic == AK42_MAGIC)
        return fail(err,
                    "this model.bin was written by llama2.c's export.py with --version 1 or 2, which "
                    "this engine does not read; export it with --version 0 (legacy) or with "
                    "`python -m tiny_transformer export`");
    if (magic == EXT_MAGIC) {
        if (size < EXT_HEADER_BYTES)
            return fail(err, "model file is %llu bytes, smaller than its 256-byte header: it is truncated; "
                             "export it again", (unsigned long long)size);
        c->version = read_i32(data + 4);
        if (c->version != EXT_VERSION)
            return fail(err,
                        "model file has format version %d, but this run.c reads version %d; update "
                        "native/run.c or export the model again with this version of tiny_transformer",
                        c->version, EXT_VERSION);
        c->dim = read_i32(data + 8);
        c->hidden_dim = read_i32(data + 12);
        c->n_layers = read_i32(data + 16);
        c->n_heads = read_i32(data + 20);
        c->n_kv_heads = read_i32(data + 24);
        c->vocab_size = read_i32(data + 28);
        c->seq_len = read_i32(data + 32);
        c->head_rows = read_i32(data + 36);
        int flags = read_i32(data + 40);
        c->weight_type = read_i32(data + 44);
        c->group_size = read_i32(data + 48);
        c->norm_eps = read_f32(data + 52);
        c->rope_theta = read_f64(data + 56);
        c->logit_softcap = read_f32(data + 64);
        c->sliding_window = read_i32(data + 68);
        for (int i = 72; i < EXT_HEADER_BYTES; i++)
            if (data[i] != 0)
                return fail(err,
                            "model header byte %d is reserved and must be zero but is %d: the file is "
                            "corrupt or was written by a newer exporter; update native/run.c",
                            i, data[i]);
        if (flags & ~KNOWN_FLAGS)
            return fail(err, "model header has unknown flags 0x%x (known: 0x%x); update native/run.c "
                             "or export without the new features", (unsigned)flags, KNOWN_FLAGS);
        c->shared_classifier = (flags & FLAG_SHARED_CLASSIFIER) != 0;
        c->qk_norm = (flags & FLAG_QK_NORM) != 0;
        if (check_dims(c, "model file", err)) return -1;
        if (c->head_rows < c->vocab_size || c->head_rows > MAX_VOCAB)
            return fail(err, "model file: head_rows = %d must lie in vocab_size..%d (= %d..%d); the file is "
                             "corrupt", c->head_rows, MAX_VOCAB, c->vocab_size, MAX_VOCAB);
        if (c->shared_classifier && c->head_rows != c->vocab_size)
            return fail(err, "model file: a shared (tied) classifier must have head_rows = vocab_size = %d, "
                             "got %d; the file is corrupt", c->vocab_size, c->head_rows);
        if (c->weight_type == WT_F32) {
            if (c->group_size != 0)
                return fail(err, "model file: fp32 weights must have group_size 0, got %d; the file is "
                                 "corrupt", c->group_size);
        } else if (c->weight_type == WT_Q8 || c->weight_type == WT_Q4) {
            /* Q8_0 kernels take 4 columns at a time, Q4_0 kernels 8 (two 4-bit values per byte) */
            int step = c->weight_type == WT_Q8 ? 4 : 8;
            if (c->group_size < step || c->group_size > MAX_GROUP || c->group_size % step != 0)
                return fail(err, "model file: %s group_size = %d must be a multiple of %d in %d..%d; the file "
                                 "is corrupt", weight_type_name(c->weight_type), c->group_size, step, step, MAX_GROUP);
            if (c->dim % c->group_size != 0 || c->hidden_dim % c->group_size != 0)
                return fail(err, "model file: %s group_size = %d must divide dim = %d and hidden_dim = %d; "
                                 "the file is corrupt", weight_type_name(c->weight_type), c->group_size, c->dim,
                            c->hidden_dim);
        } else {
            return fail(err, "model file: unknown weight type %d (0 = fp32, 1 = Q8_0, 2 = Q4_0); update "
                             "native/run.c", c->weight_type);
        }
        if (!(c->norm_eps > 0.0f && c->norm_eps < 1.0f))
            return fail(err, "model file: norm_eps = %g must lie in (0, 1); the file is corrupt", c->norm_eps);
        if (!(c->rope_theta >= 1.0 && c->rope_theta < 1e30))
            return fail(err, "model file: rope_theta = %g must be a finite number >= 1; the file is corrupt",
                        c->rope_theta);
        if (!(c->logit_softcap >= 0.0f && c->logit_softcap < 1e30f))
            return fail(err, "model file: logit_softcap = %g must be finite and >= 0 (0 = off); the file is "
                             "corrupt", c->logit_softcap);
        if (c->sliding_window < 0)
            return fail(err, "model file: sliding_window = %d must be >= 0 (0 = off); the file is corrupt",
                        c->sliding_window);
        uint64_t expected = map_weights(c, NULL, NULL, EXT_HEADER_BYTES);
        if (expected != size)
            return fail(err,
                        "model file is %llu bytes but its header (dim %d, hidden %d, layers %d, heads %d, "
                        "kv_heads %d, vocab %d, head_rows %d, %s) implies %llu bytes: the file is %s; "
                        "export it again",
                        (unsigned long long)size, c->dim, c->hidden_dim, c->n_layers, c->n_heads,
                        c->n_kv_heads, c->vocab_size, c->head_rows, weight_type_name(c->weight_type),
                        (unsigned long long)expected, size < expected ? "truncated" : "too long or corrupt");
        map_weights(c, w, data, EXT_HEADER_BYTES);
        return 0;
    }

    /* llama2.c version 0: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len. */
    c->version = 0;
    c->dim = read_i32(data);
    c->hidden_dim = read_i32(data + 4);
    c->n_layers = read_i32(data + 8);
    c->n_heads = read_i32(data + 12);
    c->n_kv_heads = read_i32(data + 16);
    int32_t v = read_i32(data + 20);
    c->seq_len = read_i32(data + 24);
    /* A negative vocab_size marks an untied classifier stored after the other weights. */
    c->shared_classifier = v > 0;
    c->vocab_size = v == INT32_MIN ? INT32_MIN : (v < 0 ? -v : v);
    c->head_rows = c->vocab_size;
    c->weight_type = WT_F32;
    c->norm_eps = 1e-5f;
    c->rope_theta = 10000.0f;
    if (c->dim <= 0 && (magic & 0xffu) == 'T' && ((magic >> 8) & 0xffu) == 'T')
        return fail(err, "model file starts like our extended format but the magic number is wrong; the "
                         "file is corrupt, export it again");
    if (check_dims(c, "model file (llama2.c version 0 header)", err)) return -1;
    uint64_t expected = map_weights(c, NULL, NULL, V0_HEADER_BYTES);
    if (expected != size)
        return fail(err,
                    "model file is %llu bytes but its llama2.c header (dim %d, hidden %d, layers %d, heads "
                    "%d, kv_heads %d, vocab %d%s, seq_len %d) implies %llu bytes: the file is %s; export "
                    "it again",
                    (unsigned long long)size, c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads,
                    c->vocab_size, c->shared_classifier ? "" : " untied", c->seq_len,
                    (unsigned long long)expected, size < expected ? "truncated" : "too long or corrupt");
    map_weights(c, w, data, V0_HEADER_BYTES);
    return 0;
}

/* Read a whole file into memory. Returns NULL (message in err) on failure. */
static unsigned char *read_file(const char *path, const char *what, uint64_t *size_out, Err *err) {
    if (!path || !*path) {
        fail(err, "no %s path given", what);
        return NULL;
    }
    FILE *f = fopen(path, "rb");
    if (!f) {
        fail(err, "cannot open %s '%s': %s; check the path", what, path, strerror(errno));
        return NULL;
    }
    unsigned char *data = NULL;
    size_t cap = 0, n = 0;
    for (;;) { /* read in chunks: works for pipes too, and needs no 64-bit ftell */
        if (n == cap) {
            size_t new_cap = cap ? cap * 2 : 1 << 16;
            if (new_cap < cap) break;
            unsigned char *p = (unsigned char *)realloc(data, new_cap);
            if (!p) {
                free(data);
                fclose(f);
                fail(err, "out of memory reading %s '%s'", what, path);
                return NULL;
            }
            data = p;
            cap = new_cap;
        }
        size_t got = fread(data + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(data);
        fail(err, "error reading %s '%s'", what, path);
        return NULL;
    }
    *size_out = n;
    return data;
}

/* ------------------------------------------------------------------------------------------------
 * Packed weights and the matrix-vector product
 *
 * Matrix-vector products dominate the run time: every weight is read once per token. To make them
 * fast, each weight matrix is rearranged once, at load time, into "panels" of rows that the product
 * reads strictly in order, with no horizontal sums.
 *
 * fp32: panels of PANEL rows. Panel p holds, for column j = 0, 1, ..., the PANEL weights
 * W[p*PANEL + r][j] (r = 0..PANEL-1) side by side. Then out = W x is, panel by panel, "for each
 * column j: out[panel] += W[panel][j] * x[j]", one vector multiply-add per column that updates PANEL
 * outputs at once, and four panels share every load of x[j].
 *
 * Q8_0 and Q4_0: integer dot products. The file stores each weight as a small integer q_w (int8, or
 * 4 bits: -8..7) and one fp32 scale per group of gs consecutive weights of a row: W[r][j] =
 * q_w[r][j] * ws[r][g] with g = j / gs. Before a product, run.c quantizes the input vector to int8
 * the same way (quantize_vec): per group of gs entries, xs[g] = max|x| / 127 and q_x[j] = x[j] /
 * xs[g] rounded to the nearest integer (ties to even), so that x[j] ~ q_x[j] * xs[g]. Then
 *
 *     out[r] = sum over groups g of  ws[r][g] * xs[g] * (sum over j in group g of q_w[r][j] * q_x[j])
 *
 * where the inner sum is exact integer arithmetic on bytes. That is the point: with AVX-512 VNNI
 * one instruction (vpdpbusd) does 64 byte multiply-adds into 16 int32 sums, four times the work of
 * an fp32 multiply-add instruction, on weights that take a quarter (Q8_0) or an eighth (Q4_0) of the
 * bytes. The price is a second rounding: the product sees x rounded to 8 bits per group (an error of
 * at most xs[g] / 2 per entry) on top of the rounded weights. native/README.md gives the measured
 * effect on the model's predictions.
 *
 * vpdpbusd multiplies UNSIGNED bytes by SIGNED bytes. The weights are therefore stored offset,
 * u = q_w + 128 (Q8_0: 0..255) or u = q_w + 8 (Q4_0: 0..15, as in the file), and the activations
 * stay signed. The offset adds 128 (or 8) * (sum of the group's q_x) to every row's sum;
 * quantize_vec computes that once per group and the kernels start each group's int32 sums at its
 * negative (`bias`), which cancels it exactly.
 *
 * Quantized panels have QROWS = 16 rows whatever the vector width, stored group after group. In a
 * group, every 4 consecutive columns ("quad") of the 16 rows make 64 bytes, row after row:
 * [row 0: u[j..j+3]][row 1: u[j..j+3]]...[row 15: ...]. Read as 16 int32 lanes, lane r is row r,
 * exactly what vpdpbusd multiplies by 4 bytes of x broadcast to every lane. Q8_0 stores each quad as
 * one 64-byte piece. Q4_0 stores two quads in one piece, quad 2k in the low 4 bits of each byte and
 * quad 2k+1 in the high 4 bits; a mask and a shift turn a piece back into two vectors of bytes. The
 * group's 16 row scales (64 bytes) follow its pieces, so a panel is one stream of 64-byte pieces.
 * The 256-bit AVX-VNNI kernels read each piece as two halves of 8 rows; the plain-C kernels loop.
 *
 * Rows past the end of a matrix (in its last panel) are zero weights (q_w = 0, scale 0); their
 * outputs are computed and dropped.
 */

#define QROWS 16 /* rows per Q8_0/Q4_0 panel */

#if defined(HAVE_VEC) && defined(__AVX512F__) && defined(__AVX512VNNI__)
#define QUANT_AVX512 1 /* 16 rows per vector: one vpdpbusd per panel and quad */
#elif defined(HAVE_VEC) && defined(__AVXVNNI__)
#define QUANT_AVX256 1 /* 8 rows per vector (AVX-VNNI, e.g. CPUs without AVX-512) */
#endif

typedef struct {
    int rows, cols;
    int type;       /* WT_F32, WT_Q8 or WT_Q4 */
    int group_size; /* Q8_0 and Q4_0 */
    float *f;       /* fp32 panels */
    uint8_t *q;     /* Q8_0/Q4_0 panels: offset weights and group scales, see above */
} Matrix;

/* The int8 version of a vector, made by quantize_vec for the Q8_0/Q4_0 kernels. */
typedef struct {
    int8_t *q;     /* quantized entries, -127..127 */
    float *scale;  /* per group: max |x| / 127 (0 for an all-zero group) */
    int32_t *bias; /* per group: -(weight offset) * (sum of its q), cancels the weights' offset */
} QuantVec;

typedef struct {
    Matrix token_embedding;                   /* (vocab, dim); also the classifier when shared */
    Matrix *wq, *wk, *wv, *wo, *w1, *w2, *w3; /* one per layer */
    Matrix wcls;                              /* the classifier's first vocab_size rows */
    float *rms_att, *q_norm, *k_norm, *rms_ffn, *rms_final;
    Matrix *matrices; /* storage for the per-layer Matrix structs */
    void *arena;      /* one allocation for all weights */
} Weights;

static float load_f32(const unsigned char *p) {
    float f;
    memcpy(&f, p, 4);
    return f;
}

static size_t panels_of(int rows) { return ((size_t)rows + PANEL - 1) / PANEL; }
static size_t qpanels_of(int rows) { return ((size_t)rows + QROWS - 1) / QROWS; }
static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* What the stored unsigned weights exceed q_w by. */
static int weight_offset(int type) { return type == WT_Q4 ? 8 : 128; }

/* Bytes of one group of one panel: Q8_0 one 64-byte piece per quad, Q4_0 one per two quads; then the
 * 16 float scales. */
static size_t group_bytes(int type, int gs) {
    return (size_t)gs / (type == WT_Q4 ? 8 : 4) * 64 + QROWS * sizeof(float);
}

static size_t packed_bytes(const Config *c, int rows, int cols) {
    if (c->weight_type != WT_F32)
        return qpanels_of(rows) * (size_t)(cols / c->group_size) * group_bytes(c->weight_type, c->group_size);
    return align64(panels_of(rows) * PANEL * (size_t)cols * sizeof(float));
}

/* The stored (offset, unsigned) value of weight i of a file tensor: Q8_0 int8 + 128; Q4_0 two
 * values per byte, the even-numbered one in the low 4 bits, already offset by 8. */
static uint8_t file_weight(const Config *c, Tensor t, size_t i) {
    if (c->weight_type == WT_Q4) return (uint8_t)((t.data[i / 2] >> (4 * (i % 2))) & 15u);
    return (uint8_t)(t.data[i] ^ 0x80u); /* flipping the top bit of an int8 adds 128 */
}

/* Fill matrix m (rows x cols) from the file tensor t, starting at row `row0` (layer offset), using
 * memory at *cursor. */
static void pack_matrix(Matrix *m, const Config *c, Tensor t, size_t row0, int rows, int cols,
                        unsigned char **cursor) {
    size_t ncols = (size_t)cols;
    m->rows = rows, m->cols = cols, m->type = c->weight_type, m->group_size = 0, m->f = NULL, m->q = NULL;
    if (c->weight_type == WT_F32) {
        size_t n = panels_of(rows) * PANEL * ncols;
        m->f = (float *)(void *)*cursor;
        *cursor += align64(n * sizeof(float));
        memset(m->f, 0, n * sizeof(float));
        for (size_t row = 0; row < (size_t)rows; row++)
            for (size_t j = 0; j < ncols; j++)
                m->f[((row / PANEL) * ncols + j) * PANEL + row % PANEL] = load_f32(t.data + ((row0 + row) * ncols + j) * 4);
        return;
    }
    int q4 = c->weight_type == WT_Q4;
    size_t gs = (size_t)c->group_size, groups = ncols / gs, gbytes = group_bytes(c->weight_type, c->group_size);
    size_t np = qpanels_of(rows);
    uint8_t zero = (uint8_t)weight_offset(c->weight_type); /* a zero weight, for padding rows */
    m->group_size = c->group_size;
    m->q = *cursor;
    *cursor += np * groups * gbytes;
    memset(m->q, 0, np * groups * gbytes);
    for (size_t p = 0; p < np; p++) {
        for (size_t g = 0; g < groups; g++) {
            uint8_t *block = m->q + (p * groups + g) * gbytes;
            float *scales = (float *)(void *)(block + gbytes - QROWS * sizeof(float));
            for (size_t r = 0; r < QROWS; r++) {
                size_t row = p * QROWS + r;
                for (size_t j = 0; j < gs; j++) {
                    uint8_t u = row < (size_t)rows ? file_weight(c, t, (row0 + row) * ncols + g * gs + j) : zero;
                    size_t quad = j / 4, at = r * 4 + j % 4;
                    if (!q4) block[quad * 64 + at] = u;
                    else block[quad / 2 * 64 + at] |= (uint8_t)(u << (4 * (quad % 2))); /* odd quads: high bits */
                }
                scales[r] = row < (size_t)rows ? load_f32(t.scales + ((row0 + row) * groups + g) * 4) : 0.0f;
            }
        }
    }
}

/* Memory for the buffers every token streams through: the packed weights and the KV cache. On
 * Linux, buffers of 2 MiB or more are aligned to 2 MiB and marked for transparent huge pages
 * (a hint the kernel may ignore): one page-table entry then covers 2 MiB instead of 4 KiB, so
 * streaming megabytes per token costs far fewer TLB misses (measured: the 6.1M model runs ~5%
 * faster, and much more evenly from run to run). Free with free(). */
#define HUGE_PAGE ((size_t)1 << 21)
static void *alloc_streamed(size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= HUGE_PAGE) {
        void *p = NULL;
        if (posix_memalign(&p, HUGE_PAGE, bytes) != 0) return NULL;
        (void)madvise(p, bytes, MADV_HUGEPAGE); /* before the first touch; failure only costs speed */
        return p;
    }
#endif
    return malloc(bytes);
}

static float *copy_floats(Tensor t, size_t n, unsigned char **cursor) {
    float *dst = (float *)(void *)*cursor;
    *cursor += align64(n * sizeof(float));
    memcpy(dst, t.data, n * sizeof(float));
    return dst;
}

static void free_weights(Weights *w) {
    free(w->matrices);
    free(w->arena);
    memset(w, 0, sizeof(*w));
}

/* Build the packed weights from the file's tensors (after which the file bytes can be freed). */
static int pack_weights(Weights *w, const Config *c, const FileWeights *fw, Err *err) {
    int L = c->n_layers, dim = c->dim, hidden = c->hidden_dim;
    int hs = dim / c->n_heads, kv_dim = hs * c->n_kv_heads;
    memset(w, 0, sizeof(*w));
    size_t per_layer = 2 * packed_bytes(c, dim, dim) + 2 * packed_bytes(c, kv_dim, dim) +
                       2 * packed_bytes(c, hidden, dim) + packed_bytes(c, dim, hidden);
    size_t bytes = packed_bytes(c, c->vocab_size, dim) + (size_t)L * per_layer + 64 +
                   (c->shared_classifier ? 0 : packed_bytes(c, c->vocab_size, dim)) +
                   2 * align64((size_t)L * dim * sizeof(float)) + 2 * align64((size_t)L * hs * sizeof(float)) +
                   align64((size_t)dim * sizeof(float));
    w->arena = alloc_streamed(bytes);
    w->matrices = (Matrix *)calloc((size_t)L * 7, sizeof(Matrix));
    if (!w->arena || !w->matrices) {
        free_weights(w);
        return fail(err, "out of memory: the weights need %.1f MiB", bytes / 1048576.0);
    }
    unsigned char *cursor = (unsigned char *)w->arena;
    cursor += (64 - (uintptr_t)cursor % 64) % 64; /* vectors read best from 64-byte boundaries */
    w->wq = w->matrices, w->wk = w->wq + L, w->wv = w->wk + L, w->wo = w->wv + L;
    w->w1 = w->wo + L, w->w2 = w->w1 + L, w->w3 = w->w2 + L;
    pack_matrix(&w->token_embedding, c, fw->token_embedding, 0, c->vocab_size, dim, &cursor);
    for (int l = 0; l < L; l++) {
        pack_matrix(&w->wq[l], c, fw->wq, (size_t)l * dim, dim, dim, &cursor);
        pack_matrix(&w->wk[l], c, fw->wk, (size_t)l * kv_dim, kv_dim, dim, &cursor);
        pack_matrix(&w->wv[l], c, fw->wv, (size_t)l * kv_dim, kv_dim, dim, &cursor);
        pack_matrix(&w->wo[l], c, fw->wo, (size_t)l * dim, dim, dim, &cursor);
        pack_matrix(&w->w1[l], c, fw->w1, (size_t)l * hidden, hidden, dim, &cursor);
        pack_matrix(&w->w2[l], c, fw->w2, (size_t)l * dim, dim, hidden, &cursor);
        pack_matrix(&w->w3[l], c, fw->w3, (size_t)l * hidden, hidden, dim, &cursor);
    }
    if (c->shared_classifier) w->wcls = w->token_embedding;
    else pack_matrix(&w->wcls, c, fw->wcls, 0, c->vocab_size, dim, &cursor); /* padding rows dropped */
    w->rms_att = copy_floats(fw->rms_att, (size_t)L * dim, &cursor);
    w->rms_ffn = copy_floats(fw->rms_ffn, (size_t)L * dim, &cursor);
    w->rms_final = copy_floats(fw->rms_final, (size_t)dim, &cursor);
    if (c->qk_norm) {
        w->q_norm = copy_floats(fw->q_norm, (size_t)L * hs, &cursor);
        w->k_norm = copy_floats(fw->k_norm, (size_t)L * hs, &cursor);
    }
    return 0;
}

/* out = W x for an fp32 matrix. Blocks of 4 panels are independent (and shared out among threads
 * when compiled with OpenMP). */
static void matmul_f32(float *out, const float *x, const Matrix *m) {
    int n = m->cols, np = (int)panels_of(m->rows);
    int p0;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
    for (p0 = 0; p0 < np; p0 += 4) {
        int k = np - p0 < 4 ? np - p0 : 4; /* panels in this block */
        float acc[4 * PANEL];
        const float *w = m->f + (size_t)p0 * n * PANEL;
#ifdef HAVE_VEC
        if (k == 4) {
            const float *w0 = w, *w1 = w0 + (size_t)n * PANEL, *w2 = w1 + (size_t)n * PANEL, *w3 = w2 + (size_t)n * PANEL;
            /* two sets of accumulators (even and odd columns) keep both multiply-add units busy */
            vfloat a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
            int j = 0;
            for (; j + 1 < n; j += 2) {
                float x0 = x[j], x1 = x[j + 1];
                size_t o = (size_t)j * PANEL;
                a0 += vload(w0 + o) * x0, a1 += vload(w1 + o) * x0, a2 += vload(w2 + o) * x0, a3 += vload(w3 + o) * x0;
                o += PANEL;
                b0 += vload(w0 + o) * x1, b1 += vload(w1 + o) * x1, b2 += vload(w2 + o) * x1, b3 += vload(w3 + o) * x1;
            }
            if (j < n) {
                size_t o = (size_t)j * PANEL;
                a0 += vload(w0 + o) * x[j], a1 += vload(w1 + o) * x[j], a2 += vload(w2 + o) * x[j], a3 += vload(w3 + o) * x[j];
            }
            vstore(acc, a0 + b0), vstore(acc + PANEL, a1 + b1), vstore(acc + 2 * PANEL, a2 + b2), vstore(acc + 3 * PANEL, a3 + b3);
        } else {
            for (int q = 0; q < k; q++) {
                const float *wq = w + (size_t)q * n * PANEL;
                vfloat a = {0};
                for (int j = 0; j < n; j++) a += vload(wq + (size_t)j * PANEL) * x[j];
                vstore(acc + q * PANEL, a);
            }
        }
#else
        for (int q = 0; q < k; q++) {
            float *a = acc + q * PANEL;
            for (int r = 0; r < PANEL; r++) a[r] = 0.0f;
            for (int j = 0; j < n; j++)
                for (int r = 0; r < PANEL; r++) a[r] += w[((size_t)q * n + j) * PANEL + r] * x[j];
        }
#endif
        int valid = m->rows - p0 * PANEL; /* the last panel may be partly padding */
        memcpy(out + (size_t)p0 * PANEL, acc, (size_t)(valid < 4 * PANEL ? valid : 4 * PANEL) * sizeof(float));
    }
}

/* Quantize x (n entries, groups of gs) for the Q8_0/Q4_0 kernels; see above. In float32: scale =
 * max|x| / 127, q = round-to-nearest-even(x * (1 / scale)); an all-zero group gets scale 0 and q 0.
 * bias = -offset * sum(q), where offset is what the stored weights exceed q_w by (128 or 8).
 * (tiny_transformer.export.quantize_input_q8_0 does the same in PyTorch.) The clamp to +-127 only
 * matters for inputs holding inf or NaN, which then give a NaN or inf scale, as an fp32 product
 * would; it keeps every conversion to int defined. */
static void quantize_vec(QuantVec *v, const float *x, int n, int gs, int offset) {
    for (int g = 0; g < n / gs; g++) {
        const float *xg = x + (size_t)g * gs;
        int8_t *qg = v->q + (size_t)g * gs;
        float amax = 0.0f;
        int32_t sum = 0;
        int j = 0;
#if defined(QUANT_AVX512)
        if (gs % 16 == 0) {
            __m512 m = _mm512_setzero_ps();
            for (j = 0; j < gs; j += 16) m = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(xg + j)), m); /* NaN: skipped */
            amax = _mm512_reduce_max_ps(m);
        }
#endif
        for (; j < gs; j++) amax = fabsf(xg[j]) > amax ? fabsf(xg[j]) : amax;
        float scale = amax / 127.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
        j = 0;
#if defined(QUANT_AVX512)
        if (gs % 16 == 0) {
            __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
            __m512i s = _mm512_setzero_si512();
            for (; j < gs; j += 16) {
                __m512 f = _mm512_mul_ps(_mm512_loadu_ps(xg + j), vinv);
                f = _mm512_min_ps(_mm512_max_ps(f, lo), hi); /* max(NaN, lo) = lo, as below */
                __m512i q = _mm512_cvtps_epi32(f);          /* rounds to nearest, ties to even */
                _mm_storeu_si128((__m128i *)(void *)(qg + j), _mm512_cvtepi32_epi8(q));
                s = _mm512_add_epi32(s, q);
            }
            sum = _mm512_reduce_add_epi32(s);
        }
#endif
        for (; j < gs; j++) {
            float f = xg[j] * inv;
            f = f > -127.0f ? f : -127.0f; /* NaN -> -127 */
            f = f < 127.0f ? f : 127.0f;
            int q = (int)rintf(f); /* the default rounding mode: to nearest, ties to even */
            qg[j] = (int8_t)q;
            sum += q;
        }
        v->scale[g] = scale;
        v->bias[g] = -offset * sum;
    }
}

/* The product for the k panels (k = 1..4) that start at w, `stride` bytes apart, of a Q8_0 or Q4_0
 * matrix: acc[16 * i + r] = output row r of panel i. Plain C, for every CPU, and the reference the
 * vector kernels must match (native/bench/kernels.c checks): the int32 sums are exact, so only the
 * float rounding of the final sums may differ. */
#if defined(__GNUC__) || defined(__clang__)
__attribute__((unused)) /* only called where no vector kernel exists */
#endif
static void quant_panels_c(float *acc, const QuantVec *xq, const uint8_t *w, size_t stride, int k, int gs,
                           int groups, int type) {
    const int q4 = type == WT_Q4;
    const size_t gbytes = group_bytes(type, gs);
    for (int i = 0; i < k; i++) {
        float *t = acc + QROWS * i;
        for (int r = 0; r < QROWS; r++) t[r] = 0.0f;
        for (int g = 0; g < groups; g++) {
            const uint8_t *p = w + (size_t)i * stride + (size_t)g * gbytes;
            const int8_t *x = xq->q + (size_t)g * gs;
            int32_t a[QROWS];
            for (int r = 0; r < QROWS; r++) a[r] = xq->bias[g];
            for (int j = 0; j < gs; j += 4) { /* quad j/4: its own piece (Q8_0), or 4 bits of a shared one */
                const uint8_t *b = p + (size_t)(q4 ? j / 8 : j / 4) * 64;
                int shift = q4 ? 4 * (j / 4 % 2) : 0, mask = q4 ? 15 : 255;
                for (int r = 0; r < QROWS; r++)
                    a[r] += (b[4 * r] >> shift & mask) * x[j] + (b[4 * r + 1] >> shift & mask) * x[j + 1] +
                            (b[4 * r + 2] >> shift & mask) * x[j + 2] + (b[4 * r + 3] >> shift & mask) * x[j + 3];
            }
            const float *ws = (const float *)(const void *)(p + gbytes - QROWS * sizeof(float)); /* row scales */
            for (int r = 0; r < QROWS; r++) t[r] += (float)a[r] * (ws[r] * xq->scale[g]);
        }
    }
}

#if defined(QUANT_AVX512) || defined(QUANT_AVX256)
static int32_t load_i32(const int8_t *p) { /* 4 bytes of x, to broadcast to every lane */
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}
#define ALWAYS_INLINE inline __attribute__((always_inline))
#endif

#if defined(QUANT_AVX512)
/* Quads j and j + 1 (j even) of a panel's group as two vectors of 16 rows x 4 unsigned bytes. */
static ALWAYS_INLINE void quad_pair(const uint8_t *p, int j, int q4, __m512i *v0, __m512i *v1) {
    if (q4) { /* one piece: low 4 bits, high 4 bits */
        __m512i v = _mm512_loadu_si512(p + (size_t)j / 2 * 64), low = _mm512_set1_epi8(15);
        *v0 = _mm512_and_si512(v, low);
        *v1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    } else {
        *v0 = _mm512_loadu_si512(p + (size_t)j * 64);
        *v1 = _mm512_loadu_si512(p + (size_t)j * 64 + 64);
    }
}

/* AVX-512 VNNI: one 64-byte vector of unsigned bytes per quad is 16 int32 lanes (rows) of 4 bytes
 * (columns). Per group, each panel's sums grow in two chains (even and odd quads) so that
 * consecutive vpdpbusd do not wait for each other; the 4 panels share each broadcast of x.
 * Compiled twice, for Q8_0 and Q4_0 (q4 is a constant in each). */
static ALWAYS_INLINE void panels_avx512(float *acc, const QuantVec *xq, const uint8_t *w, size_t stride, int k,
                                        int gs, int groups, int q4) {
    const int quads = gs / 4; /* even for Q4_0 */
    const size_t gbytes = group_bytes(q4 ? WT_Q4 : WT_Q8, gs), so = gbytes - QROWS * sizeof(float);
    if (k == 4) {
        const uint8_t *w0 = w, *w1 = w0 + stride, *w2 = w1 + stride, *w3 = w2 + stride;
        __m512 t0 = _mm512_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
        for (int g = 0; g < groups; g++) {
            const int8_t *x = xq->q + (size_t)g * gs;
            __m512i a0 = _mm512_set1_epi32(xq->bias[g]), a1 = a0, a2 = a0, a3 = a0; /* even quads */
            __m512i b0 = _mm512_setzero_si512(), b1 = b0, b2 = b0, b3 = b0;         /* odd quads */
            int j = 0;
            for (; j + 1 < quads; j += 2) {
                __m512i x0 = _mm512_set1_epi32(load_i32(x + 4 * j)), x1 = _mm512_set1_epi32(load_i32(x + 4 * j + 4));
                __m512i v0, v1;
                quad_pair(w0, j, q4, &v0, &v1), a0 = _mm512_dpbusd_epi32(a0, v0, x0), b0 = _mm512_dpbusd_epi32(b0, v1, x1);
                quad_pair(w1, j, q4, &v0, &v1), a1 = _mm512_dpbusd_epi32(a1, v0, x0), b1 = _mm512_dpbusd_epi32(b1, v1, x1);
                quad_pair(w2, j, q4, &v0, &v1), a2 = _mm512_dpbusd_epi32(a2, v0, x0), b2 = _mm512_dpbusd_epi32(b2, v1, x1);
                quad_pair(w3, j, q4, &v0, &v1), a3 = _mm512_dpbusd_epi32(a3, v0, x0), b3 = _mm512_dpbusd_epi32(b3, v1, x1);
            }
            if (j < quads) { /* Q8_0 with gs/4 odd: the last quad alone */
                __m512i x0 = _mm512_set1_epi32(load_i32(x + 4 * j));
                size_t o = (size_t)j * 64;
                a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(w0 + o), x0);
                a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(w1 + o), x0);
                a2 = _mm512_dpbusd_epi32(a2, _mm512_loadu_si512(w2 + o), x0);
                a3 = _mm512_dpbusd_epi32(a3, _mm512_loadu_si512(w3 + o), x0);
            }
            /* t += float(sum) * (weight scale * input scale), per row */
            __m512 xs = _mm512_set1_ps(xq->scale[g]);
            t0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0, b0)),
                                 _mm512_mul_ps(_mm512_loadu_ps((const float *)(const void *)(w0 + so)), xs), t0);
            t1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a1, b1)),
                                 _mm512_mul_ps(_mm512_loadu_ps((const float *)(const void *)(w1 + so)), xs), t1);
            t2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a2, b2)),
                                 _mm512_mul_ps(_mm512_loadu_ps((const float *)(const void *)(w2 + so)), xs), t2);
            t3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a3, b3)),
                                 _mm512_mul_ps(_mm512_loadu_ps((const float *)(const void *)(w3 + so)), xs), t3);
            w0 += gbytes, w1 += gbytes, w2 += gbytes, w3 += gbytes;
        }
        _mm512_storeu_ps(acc, t0), _mm512_storeu_ps(acc + 16, t1);
        _mm512_storeu_ps(acc + 32, t2), _mm512_storeu_ps(acc + 48, t3);
        return;
    }
    for (int i = 0; i < k; i++) { /* the last 1-3 panels of a matrix, one at a time */
        const uint8_t *p = w + (size_t)i * stride;
        __m512 t = _mm512_setzero_ps();
        for (int g = 0; g < groups; g++, p += gbytes) {
            const int8_t *x = xq->q + (size_t)g * gs;
            __m512i a = _mm512_set1_epi32(xq->bias[g]), b = _mm512_setzero_si512(), v0, v1;
            int j = 0;
            for (; j + 1 < quads; j += 2) {
                quad_pair(p, j, q4, &v0, &v1);
                a = _mm512_dpbusd_epi32(a, v0, _mm512_set1_epi32(load_i32(x + 4 * j)));
                b = _mm512_dpbusd_epi32(b, v1, _mm512_set1_epi32(load_i32(x + 4 * j + 4)));
            }
            if (j < quads)
                a = _mm512_dpbusd_epi32(a, _mm512_loadu_si512(p + (size_t)j * 64), _mm512_set1_epi32(load_i32(x + 4 * j)));
            __m512 s = _mm512_mul_ps(_mm512_loadu_ps((const float *)(const void *)(p + so)), _mm512_set1_ps(xq->scale[g]));
            t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a, b)), s, t);
        }
        _mm512_storeu_ps(acc + QROWS * i, t);
    }
}

static void quant_panels(float *acc, const QuantVec *xq, const uint8_t *w, size_t stride, int k, int gs, int groups,
                         int type) {
    if (type == WT_Q4) panels_avx512(acc, xq, w, stride, k, gs, groups, 1);
    else panels_avx512(acc, xq, w, stride, k, gs, groups, 0);
}
#elif defined(QUANT_AVX256)
/* Half h (rows 8h..8h+7) of quads j and j + 1 (j even) of a panel's group, as two vectors of 8 rows x
 * 4 unsigned bytes. */
static ALWAYS_INLINE void quad_pair_half(const uint8_t *p, int j, int h, int q4, __m256i *v0, __m256i *v1) {
    if (q4) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)(p + (size_t)j / 2 * 64 + 32 * h));
        __m256i low = _mm256_set1_epi8(15);
        *v0 = _mm256_and_si256(v, low);
        *v1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    } else {
        *v0 = _mm256_loadu_si256((const __m256i *)(const void *)(p + (size_t)j * 64 + 32 * h));
        *v1 = _mm256_loadu_si256((const __m256i *)(const void *)(p + (size_t)j * 64 + 64 + 32 * h));
    }
}

/* AVX-VNNI (256-bit): a 64-byte piece is two vectors, rows 0-7 and rows 8-15. Panels go in pairs:
 * four chains of sums, sharing each broadcast of x. */
static ALWAYS_INLINE void panels_avx256(float *acc, const QuantVec *xq, const uint8_t *w, size_t stride, int k,
                                        int gs, int groups, int q4) {
    const int quads = gs / 4;
    const size_t gbytes = group_bytes(q4 ? WT_Q4 : WT_Q8, gs), so = gbytes - QROWS * sizeof(float);
    for (int i = 0; i < k; i += 2) {
        const uint8_t *p0 = w + (size_t)i * stride, *p1 = i + 1 < k ? p0 + stride : p0; /* a lone panel: twice */
        __m256 t0 = _mm256_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
        for (int g = 0; g < groups; g++, p0 += gbytes, p1 += gbytes) {
            const int8_t *x = xq->q + (size_t)g * gs;
            __m256i a0 = _mm256_set1_epi32(xq->bias[g]), a1 = a0, a2 = a0, a3 = a0, v0, v1;
            int j = 0;
            for (; j + 1 < quads; j += 2) {
                __m256i x0 = _mm256_set1_epi32(load_i32(x + 4 * j)), x1 = _mm256_set1_epi32(load_i32(x + 4 * j + 4));
                quad_pair_half(p0, j, 0, q4, &v0, &v1), a0 = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(a0, v0, x0), v1, x1);
                quad_pair_half(p0, j, 1, q4, &v0, &v1), a1 = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(a1, v0, x0), v1, x1);
                quad_pair_half(p1, j, 0, q4, &v0, &v1), a2 = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(a2, v0, x0), v1, x1);
                quad_pair_half(p1, j, 1, q4, &v0, &v1), a3 = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(a3, v0, x0), v1, x1);
            }
            if (j < quads) { /* Q8_0 with gs/4 odd: the last quad alone */
                __m256i x0 = _mm256_set1_epi32(load_i32(x + 4 * j));
                const uint8_t *b0 = p0 + (size_t)j * 64, *b1 = p1 + (size_t)j * 64;
                a0 = _mm256_dpbusd_avx_epi32(a0, _mm256_loadu_si256((const __m256i *)(const void *)b0), x0);
                a1 = _mm256_dpbusd_avx_epi32(a1, _mm256_loadu_si256((const __m256i *)(const void *)(b0 + 32)), x0);
                a2 = _mm256_dpbusd_avx_epi32(a2, _mm256_loadu_si256((const __m256i *)(const void *)b1), x0);
                a3 = _mm256_dpbusd_avx_epi32(a3, _mm256_loadu_si256((const __m256i *)(const void *)(b1 + 32)), x0);
            }
            __m256 xs = _mm256_set1_ps(xq->scale[g]);
            const float *s0 = (const float *)(const void *)(p0 + so), *s1 = (const float *)(const void *)(p1 + so);
            t0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0), _mm256_mul_ps(_mm256_loadu_ps(s0), xs), t0);
            t1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1), _mm256_mul_ps(_mm256_loadu_ps(s0 + 8), xs), t1);
            t2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a2), _mm256_mul_ps(_mm256_loadu_ps(s1), xs), t2);
            t3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a3), _mm256_mul_ps(_mm256_loadu_ps(s1 + 8), xs), t3);
        }
        float *out = acc + QROWS * i;
        _mm256_storeu_ps(out, t0), _mm256_storeu_ps(out + 8, t1);
        if (i + 1 < k) _mm256_storeu_ps(out + 16, t2), _mm256_storeu_ps(out + 24, t3);
    }
}

static void quant_panels(float *acc, const QuantVec *xq, const uint8_t *w, size_t stride, int k, int gs, int groups,
                         int type) {
    if (type == WT_Q4) panels_avx256(acc, xq, w, stride, k, gs, groups, 1);
    else panels_avx256(acc, xq, w, stride, k, gs, groups, 0);
}
#else
#define quant_panels quant_panels_c
#endif

/* out = W x for a Q8_0 or Q4_0 matrix, with xq = quantize_vec(x). Blocks of 4 panels are
 * independent (and shared out among threads when compiled with OpenMP). */
static void matmul_quant(float *out, const QuantVec *xq, const Matrix *m) {
    int gs = m->group_size, groups = m->cols / gs, np = (int)qpanels_of(m->rows);
    size_t stride = (size_t)groups * group_bytes(m->type, gs); /* bytes per panel */
    int p0;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
    for (p0 = 0; p0 < np; p0 += 4) {
        int k = np - p0 < 4 ? np - p0 : 4;
        float acc[4 * QROWS];
        quant_panels(acc, xq, m->q + (size_t)p0 * stride, stride, k, gs, groups, m->type);
        int valid = m->rows - p0 * QROWS; /* the last panel may be partly padding */
        memcpy(out + (size_t)p0 * QROWS, acc, (size_t)(valid < 4 * QROWS ? valid : 4 * QROWS) * sizeof(float));
    }
}

/* out = W x. Q8_0 and Q4_0 matrices read xq, the quantized x (quantize_vec), instead of x. */
static void matmul(float *out, const float *x, const QuantVec *xq, const Matrix *m) {
    if (m->f) matmul_f32(out, x, m);
    else matmul_quant(out, xq, m);
}

/* Row `token` of the (packed) token embedding table, dequantised if needed. */
static void embedding_row(float *out, const Matrix *emb, int token) {
    size_t cols = (size_t)emb->cols;
    if (emb->f) {
        size_t p = (size_t)token / PANEL, r = (size_t)token % PANEL;
        for (size_t j = 0; j < cols; j++) out[j] = emb->f[(p * cols + j) * PANEL + r];
        return;
    }
    int q4 = emb->type == WT_Q4, offset = weight_offset(emb->type);
    size_t gs = (size_t)emb->group_size, gbytes = group_bytes(emb->type, emb->group_size);
    size_t p = (size_t)token / QROWS, r = (size_t)token % QROWS;
    for (size_t g = 0; g < cols / gs; g++) {
        const uint8_t *block = emb->q + (p * (cols / gs) + g) * gbytes;
        float scale = ((const float *)(const void *)(block + gbytes - QROWS * sizeof(float)))[r];
        for (size_t j = 0; j < gs; j++) {
            size_t quad = j / 4, at = r * 4 + j % 4;
            int u = q4 ? block[quad / 2 * 64 + at] >> (4 * (quad % 2)) & 15 : block[quad * 64 + at];
            out[g * gs + j] = (float)(u - offset) * scale;
        }
    }
}

/* RMSNorm: out = x / sqrt(mean(x^2) + eps) * weight. `out` may equal `x`. */
static void rmsnorm(float *out, const float *x, const float *weight, int n, float eps) {
    float ss = 0.0f;
    int j = 0;
#ifdef HAVE_VEC
    vfloat a = {0}, b = {0}; /* two vector sums: no chain of n dependent additions */
    for (; j + 2 * VLEN <= n; j += 2 * VLEN) {
        vfloat u = vload(x + j), v = vload(x + j + VLEN);
        a += u * u, b += v * v;
    }
    ss = vsum(a + b);
#endif
    for (; j < n; j++) ss += x[j] * x[j];
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int j = 0; j < n; j++) out[j] = weight[j] * (inv * x[j]);
}

static void softmax(float *x, int n) {
    float max = x[0], sum = 0.0f;
    int i = 0;
#ifdef HAVE_VEC
    if (n >= VLEN) {
        vfloat m = vload(x);
        for (i = VLEN; i + VLEN <= n; i += VLEN) {
            vfloat v = vload(x + i);
            m = vselect(v > m, v, m);
        }
        float lanes[VLEN];
        vstore(lanes, m);
        for (int j = 0; j < VLEN; j++)
            if (lanes[j] > max) max = lanes[j];
    }
#endif
    for (; i < n; i++)
        if (x[i] > max) max = x[i];
    i = 0;
#ifdef HAVE_VEC
    vfloat acc = {0};
    for (; i + VLEN <= n; i += VLEN) {
        vfloat e = vexp(vload(x + i) - max);
        vstore(x + i, e);
        acc += e;
    }
    sum = vsum(acc);
#endif
    for (; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    for (i = 0; i < n; i++) x[i] /= sum;
}

/* ------------------------------------------------------------------------------------------------
 * The transformer
 */

typedef struct {
    float *x, *xb, *xb2;    /* residual stream and scratch (dim) */
    float *hb, *hb2;        /* feed-forward scratch (hidden_dim) */
    float *q;               /* query (dim) */
    float *k;               /* key of the current position (kv_dim) */
    float *att;             /* attention scores (n_heads, seq_len) */
    float *logits;          /* (head_rows) */
    float *key_cache;       /* (layer, kv_head, block of KBLOCK positions, head_size, KBLOCK): see forward() */
    int key_blocks;         /* blocks of KBLOCK positions per head: seq_len / KBLOCK rounded up */
    float *value_cache;     /* (layer, seq_len, kv_dim) */
    float *rope_cos, *rope_sin; /* (seq_len, head_size / 2) */
    QuantVec xq;            /* Q8_0/Q4_0: the int8 version of the next product's input (max(dim, hidden)) */
} RunState;

typedef struct {
    Config config;
    Weights weights;
    RunState state;
} Transformer;

static void free_state(RunState *s) {
    free(s->x), free(s->xb), free(s->xb2), free(s->hb), free(s->hb2), free(s->q), free(s->k), free(s->att);
    free(s->logits), free(s->key_cache), free(s->value_cache), free(s->rope_cos), free(s->rope_sin);
    free(s->xq.q), free(s->xq.scale), free(s->xq.bias);
    memset(s, 0, sizeof(*s));
}

static int alloc_state(RunState *s, const Config *c, Err *err) {
    size_t hs = (size_t)(c->dim / c->n_heads), kv_dim = hs * c->n_kv_heads;
    size_t cache = (size_t)c->n_layers * c->seq_len * kv_dim;
    memset(s, 0, sizeof(*s));
    s->key_blocks = (c->seq_len + KBLOCK - 1) / KBLOCK;
    s->x = (float *)calloc((size_t)c->dim, sizeof(float));
    s->xb = (float *)calloc((size_t)c->dim, sizeof(float));
    s->xb2 = (float *)calloc((size_t)c->dim, sizeof(float));
    s->hb = (float *)calloc((size_t)c->hidden_dim, sizeof(float));
    s->hb2 = (float *)calloc((size_t)c->hidden_dim, sizeof(float));
    s->q = (float *)calloc((size_t)c->dim, sizeof(float));
    s->k = (float *)calloc(kv_dim, sizeof(float));
    s->att = (float *)calloc((size_t)c->n_heads * c->seq_len, sizeof(float));
    s->logits = (float *)calloc((size_t)c->head_rows, sizeof(float));
    size_t key_floats = (size_t)c->n_layers * kv_dim * s->key_blocks * KBLOCK;
    s->key_cache = (float *)alloc_streamed(key_floats * sizeof(float));
    s->value_cache = (float *)alloc_streamed(cache * sizeof(float)); /* written before it is read */
    /* attention_scores reads whole blocks, positions not yet written included (and drops them) */
    if (s->key_cache) memset(s->key_cache, 0, key_floats * sizeof(float));
    s->rope_cos = (float *)calloc((size_t)c->seq_len * hs / 2, sizeof(float));
    s->rope_sin = (float *)calloc((size_t)c->seq_len * hs / 2, sizeof(float));
    size_t widest = (size_t)(c->dim > c->hidden_dim ? c->dim : c->hidden_dim); /* longest product input */
    size_t groups = c->weight_type != WT_F32 ? widest / (size_t)c->group_size : 1;
    s->xq.q = (int8_t *)calloc(widest, 1);
    s->xq.scale = (float *)calloc(groups, sizeof(float));
    s->xq.bias = (int32_t *)calloc(groups, sizeof(int32_t));
    if (!s->x || !s->xb || !s->xb2 || !s->hb || !s->hb2 || !s->q || !s->k || !s->att || !s->logits ||
        !s->key_cache || !s->value_cache || !s->rope_cos || !s->rope_sin || !s->xq.q || !s->xq.scale ||
        !s->xq.bias) {
        free_state(s);
        return fail(err, "out of memory allocating the run state (KV cache %.1f MiB); use a model with a "
                         "smaller seq_len", cache * 8.0 / 1048576.0);
    }
    /* RoPE rotates feature pair (2i, 2i+1) of every head by pos * theta^(-2i/head_size). The table
     * is computed once, in double precision like the PyTorch model's, then rounded to float. */
    for (size_t pos = 0; pos < (size_t)c->seq_len; pos++) {
        for (size_t i = 0; i < hs / 2; i++) {
            double inv_freq = 1.0 / pow(c->rope_theta, (double)(2 * i) / (double)hs);
            double angle = (double)pos * inv_freq;
            s->rope_cos[pos * (hs / 2) + i] = (float)cos(angle);
            s->rope_sin[pos * (hs / 2) + i] = (float)sin(angle);
        }
    }
    return 0;
}

/* Attention scores of one head for positions first..last: att[t] = scale * q . K[.][t], with the
 * head's keys in blocks of KBLOCK positions, feature-major inside a block (K[i][t] at
 * keys[((t / KBLOCK) * hs + i) * KBLOCK + t % KBLOCK]). Each vector of VLEN positions accumulates
 * over the head's features in a register: no horizontal sums, and the keys are read in order. A
 * partial block (the newest positions, or the first of a sliding window) is computed whole and only
 * its valid scores are kept; lanes never mix, so the unused positions cannot affect them. */
static void attention_scores(float *att, const float *q, const float *keys, int hs, int first, int last,
                             float scale) {
    for (int b = first / KBLOCK; b <= last / KBLOCK; b++) {
        const float *kb = keys + (size_t)b * hs * KBLOCK;
        float block[KBLOCK];
#ifdef HAVE_VEC
        /* four independent chains (two position vectors, even and odd features) hide the
         * multiply-add latency; hs is even */
        vfloat a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0};
        for (int i = 0; i < hs; i += 2) {
            const float *k = kb + (size_t)i * KBLOCK;
            a0 += vload(k) * q[i];
            a1 += vload(k + VLEN) * q[i];
            b0 += vload(k + KBLOCK) * q[i + 1];
            b1 += vload(k + KBLOCK + VLEN) * q[i + 1];
        }
        vstore(block, (a0 + b0) * scale), vstore(block + VLEN, (a1 + b1) * scale);
#else
        for (int j = 0; j < KBLOCK; j++) {
            float score = 0.0f;
            for (int i = 0; i < hs; i++) score += q[i] * kb[(size_t)i * KBLOCK + j];
            block[j] = score * scale;
        }
#endif
        int t0 = b * KBLOCK > first ? b * KBLOCK : first; /* the valid positions of this block */
        int t1 = b * KBLOCK + KBLOCK - 1 < last ? b * KBLOCK + KBLOCK - 1 : last;
        memcpy(att + t0, block + (t0 - b * KBLOCK), (size_t)(t1 - t0 + 1) * sizeof(float));
    }
}

/* out = sum over t of att[t] * V[t] for one head (V[t] at values + t * stride, hs floats). */
static void attention_values(float *out, const float *att, const float *values, int hs, int stride, int first,
                             int last) {
    int i = 0;
#ifdef HAVE_VEC
    for (; i + 2 * VLEN <= hs; i += 2 * VLEN) { /* two vectors of features share each att[t] */
        vfloat a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0}; /* even and odd positions: independent chains */
        const float *v = values + i;
        int t = first;
        for (; t + 1 <= last; t += 2) {
            const float *v0 = v + (size_t)t * stride, *v1 = v0 + stride;
            a0 += vload(v0) * att[t], a1 += vload(v0 + VLEN) * att[t];
            b0 += vload(v1) * att[t + 1], b1 += vload(v1 + VLEN) * att[t + 1];
        }
        if (t <= last) {
            const float *v0 = v + (size_t)t * stride;
            a0 += vload(v0) * att[t], a1 += vload(v0 + VLEN) * att[t];
        }
        vstore(out + i, a0 + b0), vstore(out + i + VLEN, a1 + b1);
    }
    for (; i + VLEN <= hs; i += VLEN) {
        vfloat a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}; /* positions t mod 4: independent chains */
        const float *v = values + i;
        int t = first;
        for (; t + 3 <= last; t += 4) {
            a0 += vload(v + (size_t)t * stride) * att[t];
            a1 += vload(v + (size_t)(t + 1) * stride) * att[t + 1];
            a2 += vload(v + (size_t)(t + 2) * stride) * att[t + 2];
            a3 += vload(v + (size_t)(t + 3) * stride) * att[t + 3];
        }
        for (; t <= last; t++) a0 += vload(v + (size_t)t * stride) * att[t];
        vstore(out + i, (a0 + a1) + (a2 + a3));
    }
#endif
    for (; i < hs; i++) {
        float acc = 0.0f;
        for (int t = first; t <= last; t++) acc += att[t] * values[(size_t)t * stride + i];
        out[i] = acc;
    }
}

static void rope(float *vec, int n_heads, int hs, const float *cos_row, const float *sin_row) {
    for (int h = 0; h < n_heads; h++) {
        float *v = vec + (size_t)h * hs;
        for (int i = 0; i < hs / 2; i++) {
            float a = v[2 * i], b = v[2 * i + 1];
            v[2 * i] = a * cos_row[i] - b * sin_row[i];
            v[2 * i + 1] = a * sin_row[i] + b * cos_row[i];
        }
    }
}

/* With Q8_0 or Q4_0 weights, quantize x (n entries) into s->xq for the products that read it. */
static void prepare_input(RunState *s, const Config *p, const float *x, int n) {
    if (p->weight_type != WT_F32) quantize_vec(&s->xq, x, n, p->group_size, weight_offset(p->weight_type));
}

/* Run the model on one token at position `pos` (0-based) with keys/values of positions < pos
 * already in the cache. Returns the logits (vocab_size of them are meaningful). */
static float *forward(Transformer *t, int token, int pos) {
    const Config *p = &t->config;
    const Weights *w = &t->weights;
    RunState *s = &t->state;
    int dim = p->dim, hidden = p->hidden_dim, hs = dim / p->n_heads;
    int kv_dim = hs * p->n_kv_heads, kv_mul = p->n_heads / p->n_kv_heads;
    float eps = p->norm_eps, scale = 1.0f / sqrtf((float)hs);
    const float *cos_row = s->rope_cos + (size_t)pos * (hs / 2);
    const float *sin_row = s->rope_sin + (size_t)pos * (hs / 2);
    int first = 0; /* earliest position this token may attend to */
    if (p->sliding_window > 0 && pos - p->sliding_window + 1 > 0) first = pos - p->sliding_window + 1;

    embedding_row(s->x, &w->token_embedding, token);

    for (int l = 0; l < p->n_layers; l++) {
        /* attention: x += wo(attend(q, k, v)) over rmsnorm(x) */
        rmsnorm(s->xb, s->x, w->rms_att + (size_t)l * dim, dim, eps);
        size_t layer_off = (size_t)l * p->seq_len * kv_dim;
        float *v = s->value_cache + layer_off + (size_t)pos * kv_dim; /* v goes straight into the cache */
        size_t head_keys = (size_t)s->key_blocks * hs * KBLOCK; /* floats per kv head */
        float *keys = s->key_cache + (size_t)l * p->n_kv_heads * head_keys;
        prepare_input(s, p, s->xb, dim); /* Q8_0/Q4_0: quantize xb once for all three products */
        matmul(s->q, s->xb, &s->xq, &w->wq[l]);
        matmul(s->k, s->xb, &s->xq, &w->wk[l]);
        matmul(v, s->xb, &s->xq, &w->wv[l]);
        if (p->qk_norm) { /* normalise each head's q and k before rotating them */
            for (int h = 0; h < p->n_heads; h++)
                rmsnorm(s->q + (size_t)h * hs, s->q + (size_t)h * hs, w->q_norm + (size_t)l * hs, hs, eps);
            for (int h = 0; h < p->n_kv_heads; h++)
                rmsnorm(s->k + (size_t)h * hs, s->k + (size_t)h * hs, w->k_norm + (size_t)l * hs, hs, eps);
        }
        rope(s->q, p->n_heads, hs, cos_row, sin_row);
        rope(s->k, p->n_kv_heads, hs, cos_row, sin_row);
        /* Keys are cached per kv head in blocks of KBLOCK positions, feature-major inside a block:
         * K[i][t] for feature i of position t at (t / KBLOCK, i, t % KBLOCK). The scores of a block
         * of positions then come out of one vector loop, and a head's keys are read as one
         * sequential stream (see attention_scores). */
        for (int i = 0; i < kv_dim; i++)
            keys[(size_t)(i / hs) * head_keys + ((size_t)(pos / KBLOCK) * hs + i % hs) * KBLOCK + pos % KBLOCK] = s->k[i];

        int h;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
        for (h = 0; h < p->n_heads; h++) {
            int kvh = h / kv_mul; /* query heads share a kv head in groups (GQA) */
            float *att = s->att + (size_t)h * p->seq_len;
            attention_scores(att, s->q + (size_t)h * hs, keys + (size_t)kvh * head_keys, hs, first, pos, scale);
            softmax(att + first, pos - first + 1);
            attention_values(s->xb + (size_t)h * hs, att, s->value_cache + layer_off + (size_t)kvh * hs, hs,
                             kv_dim, first, pos);
        }
        prepare_input(s, p, s->xb, dim);
        matmul(s->xb2, s->xb, &s->xq, &w->wo[l]);
        for (int i = 0; i < dim; i++) s->x[i] += s->xb2[i];

        /* feed-forward (SwiGLU): x += w2(silu(w1 x) * w3 x) over rmsnorm(x) */
        rmsnorm(s->xb, s->x, w->rms_ffn + (size_t)l * dim, dim, eps);
        prepare_input(s, p, s->xb, dim);
        matmul(s->hb, s->xb, &s->xq, &w->w1[l]);
        matmul(s->hb2, s->xb, &s->xq, &w->w3[l]);
        int i = 0;
#ifdef HAVE_VEC
        for (; i + VLEN <= hidden; i += VLEN) {
            vfloat g = vload(s->hb + i);
            vstore(s->hb + i, g / (1.0f + vexp(-g)) * vload(s->hb2 + i));
        }
#endif
        for (; i < hidden; i++) {
            float g = s->hb[i];
            s->hb[i] = g / (1.0f + expf(-g)) * s->hb2[i];
        }
        prepare_input(s, p, s->hb, hidden);
        matmul(s->xb, s->hb, &s->xq, &w->w2[l]);
        for (int i = 0; i < dim; i++) s->x[i] += s->xb[i];
    }

    rmsnorm(s->x, s->x, w->rms_final, dim, eps);
    /* Padding rows of the classifier (head_rows > vocab_size) were dropped when packing. */
    prepare_input(s, p, s->x, dim);
    matmul(s->logits, s->x, &s->xq, &w->wcls);
    if (p->logit_softcap > 0.0f) {
        float cap = p->logit_softcap;
        for (int i = 0; i < p->vocab_size; i++) s->logits[i] = cap * tanhf(s->logits[i] / cap);
    }
    return s->logits;
}

static void free_transformer(Transformer *t) {
    free_state(&t->state);
    free_weights(&t->weights);
    memset(t, 0, sizeof(*t));
}

/* Validate a model file held in memory and build a runnable model from it. The weights are copied
 * (packed), so `data` may be freed afterwards. */
static int build_transformer(Transformer *t, const unsigned char *data, uint64_t size, Err *err) {
    FileWeights fw;
    memset(t, 0, sizeof(*t));
    if (parse_model(data, size, &t->config, &fw, err)) return -1;
    if (pack_weights(&t->weights, &t->config, &fw, err) || alloc_state(&t->state, &t->config, err)) {
        free_transformer(t);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * Tokenizer: llama2.c's tokenizer.bin, a SentencePiece BPE vocabulary in a simple binary form.
 * Layout: uint32 max_token_length; then for each of the model's vocab_size ids: float32 score,
 * int32 length, `length` bytes (no terminator). Ids 0, 1, 2 are <unk>, BOS, EOS. With byte fallback,
 * ids 3..258 are the pieces "<0x00>".."<0xFF>" for the 256 byte values.
 */

typedef struct {
    const char *str; /* points into Tokenizer.pool, NUL-terminated */
    int len;
    int id;
} TokenIndex;

typedef struct {
    char **vocab;           /* piece text per id (NUL-terminated; may contain inner NULs) */
    int *lens;              /* piece length in bytes */
    float *scores;          /* merge priority: higher merges first */
    int vocab_size;
    int max_token_length;
    char *pool;             /* storage for all pieces */
    TokenIndex *sorted;     /* pieces sorted by bytes, for lookups; excludes special/byte pieces */
    int n_sorted;
    int byte_fallback;      /* ids 3..258 are <0x00>..<0xFF> */
    unsigned char byte_pieces[512]; /* "\x00\0\x01\0..." single-byte strings for decoding */
} Tokenizer;

static int compare_pieces(const char *a, int alen, const char *b, int blen) {
    int n = alen < blen ? alen : blen;
    int c = memcmp(a, b, (size_t)n);
    if (c) return c;
    return alen < blen ? -1 : (alen > blen ? 1 : 0);
}

static int compare_tokens(const void *a, const void *b) {
    const TokenIndex *x = (const TokenIndex *)a, *y = (const TokenIndex *)b;
    int c = compare_pieces(x->str, x->len, y->str, y->len);
    return c ? c : (x->id < y->id ? -1 : (x->id > y->id));
}

/* The id of the piece with exactly these bytes, or -1. (Among duplicates, the smallest id.) */
static int lookup_piece(const Tokenizer *tk, const char *s, int len) {
    int lo = 0, hi = tk->n_sorted; /* first entry >= key */
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (compare_pieces(tk->sorted[mid].str, tk->sorted[mid].len, s, len) < 0) lo = mid + 1;
        else hi = mid;
    }
    if (lo < tk->n_sorted && compare_pieces(tk->sorted[lo].str, tk->sorted[lo].len, s, len) == 0)
        return tk->sorted[lo].id;
    return -1;
}

static int parse_byte_piece(const char *s, int len) {
    /* "<0xAB>" -> 0xAB, anything else -> -1 */
    if (len != 6 || s[0] != '<' || s[1] != '0' || s[2] != 'x' || s[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char ch = s[i];
        int d = (ch >= '0' && ch <= '9') ? ch - '0'
              : (ch >= 'A' && ch <= 'F') ? ch - 'A' + 10
              : (ch >= 'a' && ch <= 'f') ? ch - 'a' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

static void free_tokenizer(Tokenizer *tk) {
    free(tk->vocab), free(tk->lens), free(tk->scores), free(tk->pool), free(tk->sorted);
    memset(tk, 0, sizeof(*tk));
}

/* Parse and validate a tokenizer.bin held in memory, for a model with `vocab_size` tokens. */
static int parse_tokenizer(Tokenizer *tk, const unsigned char *data, uint64_t size, int vocab_size, Err *err) {
    memset(tk, 0, sizeof(*tk));
    if (size < 4)
        return fail(err, "tokenizer file is %llu bytes, too small to hold its 4-byte header; export it again",
                    (unsigned long long)size);
    int32_t max_len = read_i32(data);
    if (max_len <= 0 || max_len > MAX_TOKEN_BYTES)
        return fail(err, "tokenizer: max_token_length = %d is out of range (1..%d); this is not a "
                         "tokenizer.bin or it is corrupt, export it again", max_len, MAX_TOKEN_BYTES);
    /* First pass: check the structure and measure the pieces, before allocating anything. */
    uint64_t off = 4, text = 0;
    for (int i = 0; i < vocab_size; i++) {
        if (size - off < 8)
            return fail(err, "tokenizer file ends after %d pieces but the model has vocab_size = %d: the "
                             "tokenizer belongs to a different model (or is truncated); pass the matching "
                             "tokenizer.bin with -z", i, vocab_size);
        float score = read_f32(data + off);
        int32_t len = read_i32(data + off + 4);
        if (!isfinite(score))
            return fail(err, "tokenizer: piece %d has a non-finite score; the file is corrupt, export it again", i);
        if (len < 0 || len > max_len)
            return fail(err, "tokenizer: piece %d has length %d outside 0..max_token_length (%d); the file "
                             "is corrupt, export it again", i, len, max_len);
        off += 8;
        if (size - off < (uint64_t)len)
            return fail(err, "tokenizer file is truncated inside piece %d; export it again", i);
        off += (uint64_t)len;
        text += (uint64_t)len + 1;
    }
    if (off != size) {
        /* Count how many more well-formed entries follow, to name the likely mistake. */
        int extra = 0;
        uint64_t o = off;
        while (size - o >= 8) {
            int32_t len = read_i32(data + o + 4);
            if (len < 0 || len > max_len || size - o - 8 < (uint64_t)len) break;
            o += 8 + (uint64_t)len;
            extra++;
        }
        if (o == size)
            return fail(err, "tokenizer has %d pieces but the model has vocab_size = %d: the tokenizer "
                             "belongs to a different model; pass the matching tokenizer.bin with -z",
                        vocab_size + extra, vocab_size);
        return fail(err, "tokenizer file has %llu unexpected bytes after its %d pieces; the file is "
                         "corrupt, export it again", (unsigned long long)(size - off), vocab_size);
    }

    tk->vocab_size = vocab_size;
    tk->max_token_length = max_len;
    tk->vocab = (char **)calloc((size_t)vocab_size, sizeof(char *));
    tk->lens = (int *)calloc((size_t)vocab_size, sizeof(int));
    tk->scores = (float *)calloc((size_t)vocab_size, sizeof(float));
    tk->pool = (char *)malloc((size_t)text);
    tk->sorted = (TokenIndex *)calloc((size_t)vocab_size, sizeof(TokenIndex));
    if (!tk->vocab || !tk->lens || !tk->scores || !tk->pool || !tk->sorted) {
        free_tokenizer(tk);
        return fail(err, "out of memory loading the tokenizer");
    }
    off = 4;
    char *dst = tk->pool;
    for (int i = 0; i < vocab_size; i++) {
        tk->scores[i] = read_f32(data + off);
        tk->lens[i] = read_i32(data + off + 4);
        memcpy(dst, data + off + 8, (size_t)tk->lens[i]);
        dst[tk->lens[i]] = '\0';
        tk->vocab[i] = dst;
        dst += tk->lens[i] + 1;
        off += 8 + (uint64_t)tk->lens[i];
    }
    /* Byte fallback: SentencePiece places the 256 byte pieces right after <unk>, <s>, </s>. */
    tk->byte_fallback = vocab_size >= 259;
    for (int b = 0; b < 256 && tk->byte_fallback; b++)
        if (parse_byte_piece(tk->vocab[b + 3], tk->lens[b + 3]) != b) tk->byte_fallback = 0;
    /* Text lookups skip <unk>, BOS, EOS and the byte pieces: typing "<0x41>" or "<s>" in a prompt
     * means those characters, not the special token (SentencePiece does the same). */
    for (int i = 0; i < vocab_size; i++) {
        if (i <= EOS_ID || (tk->byte_fallback && i < 259)) continue;
        tk->sorted[tk->n_sorted].str = tk->vocab[i];
        tk->sorted[tk->n_sorted].len = tk->lens[i];
        tk->sorted[tk->n_sorted].id = i;
        tk->n_sorted++;
    }
    qsort(tk->sorted, (size_t)tk->n_sorted, sizeof(TokenIndex), compare_tokens);
    for (int b = 0; b < 256; b++) {
        tk->byte_pieces[2 * b] = (unsigned char)b;
        tk->byte_pieces[2 * b + 1] = '\0';
    }
    return 0;
}

/* The text of `token` for printing. After BOS, SentencePiece drops the leading space of the first
 * piece (it was the dummy prefix added by encode). Byte pieces "<0xAB>" become the raw byte. */
static const char *decode_piece(const Tokenizer *tk, int prev_token, int token) {
    if (token < 0 || token >= tk->vocab_size) return "";
    const char *piece = tk->vocab[token];
    int len = tk->lens[token];
    if (prev_token == BOS_ID && len > 0 && piece[0] == ' ') piece++, len--;
    int byte = parse_byte_piece(piece, len);
    if (byte >= 0) return (const char *)tk->byte_pieces + 2 * byte;
    return piece;
}

/* Encode `text` into token ids, the way SentencePiece BPE does with a dummy prefix:
 *   1. prepend a space (so " the" at the start and in the middle tokenize alike),
 *   2. split into UTF-8 characters; a character missing from the vocabulary becomes its bytes
 *      (byte fallback, ids 3 + byte) or <unk> (id 0) when the vocabulary has no byte pieces,
 *   3. repeatedly merge the adjacent pair whose concatenation is the highest-scoring piece
 *      (leftmost pair on ties) until no pair merges.
 * `out` must hold strlen(text) + 3 ids (each byte yields at most one id, plus prefix, BOS, EOS).
 * Returns the number of ids, or -1. */
static int encode(const Tokenizer *tk, const char *text, int bos, int eos, int *out, int max_out, Err *err) {
    if (!text) return fail(err, "encode: text is NULL; pass a string (\"\" for none)");
    size_t text_len = strlen(text);
    if ((uint64_t)text_len + 3 > (uint64_t)max_out)
        return fail(err, "encode: output buffer holds %d ids but a text of %zu bytes may need %zu; pass a "
                         "larger buffer", max_out, text_len, text_len + 3);
    int n = 0;
    int *ids = out;
    /* Each id is paired with the id its merge with the right neighbour would give and that piece's
     * score, so a merge step only recomputes the two neighbours of the merged pair. */
    int *merge_id = (int *)malloc((text_len + 3) * sizeof(int));
    float *merge_score = (float *)malloc((text_len + 3) * sizeof(float));
    char *buf = (char *)malloc((size_t)tk->max_token_length * 2 + 1);
    if (!merge_id || !merge_score || !buf) {
        free(merge_id), free(merge_score), free(buf);
        return fail(err, "encode: out of memory");
    }
    int n_bos = 0;
    if (bos && tk->vocab_size > BOS_ID) ids[n++] = BOS_ID, n_bos = 1;
    if (text_len > 0) {
        int space = lookup_piece(tk, " ", 1);
        if (space < 0) space = tk->byte_fallback ? ' ' + 3 : UNK_ID;
        ids[n++] = space;
    }
    for (size_t i = 0; i < text_len;) {
        /* one UTF-8 character: a lead byte and up to 3 continuation bytes (10xxxxxx) */
        size_t clen = 1;
        while (clen < 4 && i + clen < text_len && ((unsigned char)text[i + clen] & 0xC0) == 0x80) clen++;
        int id = lookup_piece(tk, text + i, (int)clen);
        if (id >= 0) {
            ids[n++] = id;
        } else if (tk->byte_fallback) {
            for (size_t b = 0; b < clen; b++) ids[n++] = (unsigned char)text[i + b] + 3;
        } else {
            ids[n++] = UNK_ID;
        }
        i += clen;
    }

    /* BPE merges. A pair can merge only if both sides are ordinary pieces (not BOS, <unk>, bytes). */
#define MERGEABLE(id) ((id) > EOS_ID && !(tk->byte_fallback && (id) < 259))
#define PAIR(i)                                                                                      \
    do {                                                                                             \
        merge_id[i] = -1;                                                                            \
        int a_ = ids[i], b_ = ids[(i) + 1];                                                          \
        if (MERGEABLE(a_) && MERGEABLE(b_) && tk->lens[a_] + tk->lens[b_] <= tk->max_token_length) { \
            memcpy(buf, tk->vocab[a_], (size_t)tk->lens[a_]);                                        \
            memcpy(buf + tk->lens[a_], tk->vocab[b_], (size_t)tk->lens[b_]);                         \
            int m_ = lookup_piece(tk, buf, tk->lens[a_] + tk->lens[b_]);                             \
            if (m_ >= 0) merge_id[i] = m_, merge_score[i] = tk->scores[m_];                          \
        }                                                                                            \
    } while (0)
    for (int i = n_bos; i + 1 < n; i++) PAIR(i);
    for (;;) {
        int best = -1;
        for (int i = n_bos; i + 1 < n; i++)
            if (merge_id[i] >= 0 && (best < 0 || merge_score[i] > merge_score[best])) best = i;
        if (best < 0) break;
        ids[best] = merge_id[best];
        memmove(ids + best + 1, ids + best + 2, (size_t)(n - best - 2) * sizeof(int));
        memmove(merge_id + best + 1, merge_id + best + 2, (size_t)(n - best - 2) * sizeof(int));
        memmove(merge_score + best + 1, merge_score + best + 2, (size_t)(n - best - 2) * sizeof(float));
        n--;
        if (best > n_bos) PAIR(best - 1);
        if (best + 1 < n) PAIR(best);
        else merge_id[best] = -1;
    }
#undef PAIR
#undef MERGEABLE
    if (eos && tk->vocab_size > EOS_ID) ids[n++] = EOS_ID;
    free(merge_id), free(merge_score), free(buf);
    return n;
}

/* ------------------------------------------------------------------------------------------------
 * Sampler: greedy (temperature 0), or temperature + top-p (nucleus) sampling.
 */

typedef struct {
    float prob;
    int index;
} ProbIndex;

typedef struct {
    int vocab_size;
    ProbIndex *probindex; /* scratch for top-p */
    float temperature;
    float topp;
    unsigned long long rng_state;
} Sampler;

/* xorshift64* : a small, fast generator; the same seed gives the same text on every machine. */
static uint32_t random_u32(unsigned long long *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float random_f32(unsigned long long *state) { /* uniform in [0, 1) */
    return (float)(random_u32(state) >> 8) / 16777216.0f;
}

static int argmax(const float *p, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (p[i] > p[best]) best = i;
    return best;
}

/* Sample from probabilities p (summing to 1) using a uniform coin in [0, 1). */
static int sample_mult(const float *p, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += p[i];
        if (coin < cdf) return i;
    }
    return n - 1; /* rounding left the cdf just below 1 */
}

static int compare_prob_desc(const void *a, const void *b) {
    float pa = ((const ProbIndex *)a)->prob, pb = ((const ProbIndex *)b)->prob;
    return pa > pb ? -1 : (pa < pb ? 1 : 0);
}

/* Top-p: sample only from the smallest set of most likely tokens whose probability reaches topp. */
static int sample_topp(const float *p, int n, float topp, ProbIndex *pi, float coin) {
    /* Tokens below (1 - topp) / (n - 1) can never be needed to reach topp: skip them before sorting. */
    float cutoff = n > 1 ? (1.0f - topp) / (float)(n - 1) : 0.0f;
    int n0 = 0;
    for (int i = 0; i < n; i++)
        if (p[i] >= cutoff) pi[n0].index = i, pi[n0].prob = p[i], n0++;
    if (n0 == 0) return argmax(p, n); /* only with NaN probabilities */
    qsort(pi, (size_t)n0, sizeof(ProbIndex), compare_prob_desc);
    float cum = 0.0f;
    int last = n0 - 1;
    for (int i = 0; i < n0; i++) {
        cum += pi[i].prob;
        if (cum > topp) {
            last = i;
            break;
        }
    }
    float r = coin * cum, cdf = 0.0f;
    for (int i = 0; i <= last; i++) {
        cdf += pi[i].prob;
        if (r < cdf) return pi[i].index;
    }
    return pi[last].index;
}

static int build_sampler(Sampler *s, int vocab_size, float temperature, float topp,
                         unsigned long long seed, Err *err) {
    s->vocab_size = vocab_size;
    s->temperature = temperature;
    s->topp = topp;
    s->rng_state = seed ? seed : (unsigned long long)time(NULL) ^ 0x9E3779B97F4A7C15ull;
    if (s->rng_state == 0) s->rng_state = 1; /* xorshift must not start at 0 */
    s->probindex = (ProbIndex *)malloc((size_t)vocab_size * sizeof(ProbIndex));
    if (!s->probindex) return fail(err, "out of memory allocating the sampler");
    return 0;
}

static void free_sampler(Sampler *s) {
    free(s->probindex);
    s->probindex = NULL;
}

/* Pick the next token from logits (modified in place). */
static int sample(Sampler *s, float *logits) {
    if (s->temperature == 0.0f) return argmax(logits, s->vocab_size);
    for (int i = 0; i < s->vocab_size; i++) logits[i] /= s->temperature;
    softmax(logits, s->vocab_size);
    float coin = random_f32(&s->rng_state);
    if (s->topp <= 0.0f || s->topp >= 1.0f) return sample_mult(logits, s->vocab_size, coin);
    return sample_topp(logits, s->vocab_size, s->topp, s->probindex, coin);
}

/* ------------------------------------------------------------------------------------------------
 * Generation
 */

static double now_seconds(void) {
#if defined(_WIN32)
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
#endif
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef void (*PieceFn)(const char *piece, void *user);

/* Feed the prompt, then sample until `steps` positions are filled or the model emits BOS/EOS.
 * `steps` counts all positions, prompt included (as in llama2.c); 0 means the whole context.
 * Each new token's text goes to on_piece (the prompt's pieces too when echo_prompt is set); new ids
 * go to out_tokens. Returns the number of new tokens, or -1. */
static int generate(Transformer *t, const Tokenizer *tk, Sampler *sampler, const char *prompt, int steps,
                    int echo_prompt, PieceFn on_piece, void *user, int *out_tokens, int max_out,
                    int *prompt_ids, int *n_prompt_out, double *tok_per_s, double *cpu_tok_per_s, Err *err) {
    const Config *c = &t->config;
    if (steps < 0) return fail(err, "steps = %d must be >= 0 (0 = the model's seq_len, %d)", steps, c->seq_len);
    if (steps == 0 || steps > c->seq_len) steps = c->seq_len;
    if (!prompt) prompt = "";
    size_t plen = strlen(prompt);
    if (plen > MAX_PROMPT_BYTES)
        return fail(err, "prompt is %zu bytes; the limit is %d bytes: shorten it", plen, MAX_PROMPT_BYTES);
    if (plen > 0 && !tk) return fail(err, "a prompt needs a tokenizer: open the model with a tokenizer.bin");
    int *ids = (int *)malloc((plen + 3) * sizeof(int));
    if (!ids) return fail(err, "out of memory");
    int n_prompt;
    if (tk) {
        n_prompt = encode(tk, prompt, 1, 0, ids, (int)plen + 3, err);
        if (n_prompt < 0) {
            free(ids);
            return -1;
        }
    } else {
        n_prompt = 0;
    }
    if (n_prompt == 0) { /* no tokenizer, or a vocabulary too small to have BOS: start from BOS or 0 */
        ids[0] = BOS_ID < c->vocab_size ? BOS_ID : 0;
        n_prompt = 1;
    }
    if (n_prompt > c->seq_len || n_prompt >= steps) {
        fail(err, "the prompt is %d tokens (with BOS) but only %d positions are allowed (-n steps, at most "
                  "seq_len = %d), which leaves no room to generate: shorten the prompt or raise -n",
             n_prompt, steps, c->seq_len);
        free(ids);
        return -1;
    }
    if (prompt_ids) memcpy(prompt_ids, ids, (size_t)n_prompt * sizeof(int));
    if (n_prompt_out) *n_prompt_out = n_prompt;

    int token = ids[0], pos = 0, generated = 0;
    double start = now_seconds();
    clock_t cpu_start = clock(); /* processor time: unaffected by other programs sharing the CPU */
    while (pos < steps - 1) {
        float *logits = forward(t, token, pos);
        int next;
        if (pos + 1 < n_prompt) {
            next = ids[pos + 1]; /* still reading the prompt: force its next token */
            if (echo_prompt && on_piece && tk) on_piece(decode_piece(tk, token, next), user);
        } else {
            next = sample(sampler, logits);
            if (next == BOS_ID || next == EOS_ID) { pos++; break; } /* the model ended the text */
            if (out_tokens && generated < max_out) out_tokens[generated] = next;
            generated++;
            if (on_piece && tk) on_piece(decode_piece(tk, token, next), user);
        }
        token = next;
        pos++;
    }
    double elapsed = now_seconds() - start;
    double cpu = (double)(clock() - cpu_start) / CLOCKS_PER_SEC;
    if (tok_per_s) *tok_per_s = elapsed > 0 ? pos / elapsed : 0.0;
    if (cpu_tok_per_s) *cpu_tok_per_s = cpu > 0 ? pos / cpu : 0.0;
    free(ids);
    return generated;
}

/* ------------------------------------------------------------------------------------------------
 * Library mode: a small C API for Python (cffi/ctypes). Compile with -DRUN_LIBRARY.
 */

typedef struct tt_engine {
    Transformer transformer;
    Tokenizer tokenizer;
    int has_tokenizer;
} tt_engine;

#if defined(_WIN32)
#define TT_API __declspec(dllexport)
#else
#define TT_API __attribute__((visibility("default")))
#endif

/* Build an engine from a model file (and optionally a tokenizer) held in memory; both buffers may
 * be freed afterwards. Returns NULL with a message in err on failure. */
TT_API tt_engine *tt_open_memory(const void *model, size_t model_len, const void *tokenizer,
                                 size_t tokenizer_len, char *errbuf, int errlen) {
    Err err = {errbuf, errlen};
    if (errbuf && errlen > 0) errbuf[0] = '\0';
    if (!model) {
        fail(&err, "no model data given");
        return NULL;
    }
    tt_engine *e = (tt_engine *)calloc(1, sizeof(tt_engine));
    if (!e) {
        fail(&err, "out of memory");
        return NULL;
    }
    if (build_transformer(&e->transformer, (const unsigned char *)model, model_len, &err)) {
        free(e);
        return NULL;
    }
    if (tokenizer) {
        if (parse_tokenizer(&e->tokenizer, (const unsigned char *)tokenizer, tokenizer_len,
                            e->transformer.config.vocab_size, &err)) {
            free_transformer(&e->transformer);
            free(e);
            return NULL;
        }
        e->has_tokenizer = 1;
    }
    return e;
}

TT_API tt_engine *tt_open(const char *model_path, const char *tokenizer_path, char *errbuf, int errlen) {
    Err err = {errbuf, errlen};
    if (errbuf && errlen > 0) errbuf[0] = '\0';
    uint64_t size = 0;
    unsigned char *data = read_file(model_path, "model file", &size, &err);
    if (!data) return NULL;
    tt_engine *e = (tt_engine *)calloc(1, sizeof(tt_engine));
    if (!e) {
        free(data);
        fail(&err, "out of memory");
        return NULL;
    }
    int bad = build_transformer(&e->transformer, data, size, &err);
    free(data);
    if (bad) {
        free(e);
        return NULL;
    }
    if (tokenizer_path) {
        uint64_t tsize = 0;
        unsigned char *tdata = read_file(tokenizer_path, "tokenizer file", &tsize, &err);
        int bad = !tdata || parse_tokenizer(&e->tokenizer, tdata, tsize, e->transformer.config.vocab_size, &err);
        free(tdata);
        if (bad) {
            free_transformer(&e->transformer);
            free(e);
            return NULL;
        }
        e->has_tokenizer = 1;
    }
    return e;
}

TT_API void tt_close(tt_engine *e) {
    if (!e) return;
    free_transformer(&e->transformer);
    free_tokenizer(&e->tokenizer);
    free(e);
}

/* dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len. Returns 0, or -1 if NULL. */
TT_API int tt_config(const tt_engine *e, int *out7) {
    if (!e || !out7) return -1;
    const Config *c = &e->transformer.config;
    out7[0] = c->dim, out7[1] = c->hidden_dim, out7[2] = c->n_layers, out7[3] = c->n_heads;
    out7[4] = c->n_kv_heads, out7[5] = c->vocab_size, out7[6] = c->seq_len;
    return 0;
}

/* The rest of the configuration: version (0 = llama2.c, 1 = extended), weight type (0 fp32, 1 Q8_0, 2 Q4_0),
 * group size, flags (1 shared classifier, 2 QK-norm), head_rows, sliding window, and three floats:
 * norm_eps, rope_theta, logit_softcap. Returns 0, or -1 if NULL. */
TT_API int tt_config_ext(const tt_engine *e, int *out6, float *out3) {
    if (!e || !out6 || !out3) return -1;
    const Config *c = &e->transformer.config;
    out6[0] = c->version, out6[1] = c->weight_type, out6[2] = c->group_size;
    out6[3] = (c->shared_classifier ? FLAG_SHARED_CLASSIFIER : 0) | (c->qk_norm ? FLAG_QK_NORM : 0);
    out6[4] = c->head_rows, out6[5] = c->sliding_window;
    out3[0] = c->norm_eps, out3[1] = (float)c->rope_theta, out3[2] = c->logit_softcap;
    return 0;
}

TT_API int tt_forward_all(tt_engine *e, const int *tokens, int n, float *out_logits, char *errbuf, int errlen) {
    Err err = {errbuf, errlen};
    if (!e || !tokens || !out_logits) return fail(&err, "tt_forward_all: NULL argument");
    const Config *c = &e->transformer.config;
    if (n <= 0 || n > c->seq_len)
        return fail(&err, "tt_forward_all: %d tokens given; pass 1..seq_len (%d) tokens", n, c->seq_len);
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size)
            return fail(&err, "tt_forward_all: token %d at position %d is outside the vocabulary "
                              "(0..%d); encode with the model's tokenizer", tokens[i], i, c->vocab_size - 1);
    for (int i = 0; i < n; i++) { /* positions 0..n-1 overwrite the cache, so earlier calls don't matter */
        float *logits = forward(&e->transformer, tokens[i], i);
        memcpy(out_logits + (size_t)i * c->vocab_size, logits, (size_t)c->vocab_size * sizeof(float));
    }
    return 0;
}

TT_API int tt_encode(tt_engine *e, const char *text, int bos, int eos, int *out, int max_out, char *errbuf,
                     int errlen) {
    Err err = {errbuf, errlen};
    if (!e || !out) return fail(&err, "tt_encode: NULL argument");
    if (!e->has_tokenizer) return fail(&err, "no tokenizer loaded: pass a tokenizer.bin path to tt_open");
    return encode(&e->tokenizer, text, bos, eos, out, max_out, &err);
}

/* The text of `token` when it follows `prev_token` (see decode_piece). Never NULL: "" for an id
 * outside the vocabulary or when no tokenizer is loaded. Valid until tt_close. */
TT_API const char *tt_decode_piece(tt_engine *e, int prev_token, int token) {
    if (!e || !e->has_tokenizer) return "";
    return decode_piece(&e->tokenizer, prev_token, token);
}

/* Generate from `prompt` (see generate): steps counts all positions, prompt included, 0 = seq_len;
 * temperature 0 = greedy; seed 0 = seeded from the clock. on_piece receives the text of each new
 * token only (not the prompt), as raw bytes: a multi-byte character may arrive split over byte
 * pieces. Generation stops early if the model emits BOS or EOS. Returns the number of new tokens
 * (at most max_out of them are stored) or -1. */
TT_API int tt_generate(tt_engine *e, const char *prompt, int steps, float temperature, float topp,
                       unsigned long long seed, void (*on_piece)(const char *, void *), void *user,
                       int *out_tokens, int max_out, double *tok_per_s, char *errbuf, int errlen) {
    Err err = {errbuf, errlen};
    if (!e) return fail(&err, "tt_generate: engine is NULL");
    if (!(temperature >= 0.0f) || !isfinite(temperature))
        return fail(&err, "temperature = %g must be a finite number >= 0 (0 = greedy)", temperature);
    if (!(topp > 0.0f && topp <= 1.0f))
        return fail(&err, "top-p = %g must lie in (0, 1] (1 = no nucleus cut)", topp);
    if (max_out < 0) return fail(&err, "max_out = %d must be >= 0", max_out);
    Sampler sampler;
    if (build_sampler(&sampler, e->transformer.config.vocab_size, temperature, topp, seed, &err)) return -1;
    int n = generate(&e->transformer, e->has_tokenizer ? &e->tokenizer : NULL, &sampler, prompt, steps, 0,
                     on_piece, user, out_tokens, max_out, NULL, NULL, tok_per_s, NULL, &err);
    free_sampler(&sampler);
    return n;
}

/* ------------------------------------------------------------------------------------------------
 * Command line (compiled unless RUN_LIBRARY is defined; the fuzz driver defines RUN_FUZZ to test the
 * option parser in-process)
 */

#if !defined(RUN_LIBRARY) || defined(RUN_FUZZ)

typedef struct {
    const char *checkpoint;
    const char *tokenizer;
    float temperature;
    float topp;
    unsigned long long seed;
    int steps;
    const char *prompt;
    const char *mode;
    const char *system_prompt;
    int verbose;
} Options;

static const char *USAGE =
    "Usage:   run <model.bin> [options]\n"
    "Example: run model.bin -z tokenizer.bin -n 256 -i \"ROMEO:\"\n"
    "Options:\n"
    "  -t <float>  temperature, >= 0 (0 = greedy argmax), default 1.0\n"
    "  -p <float>  top-p (nucleus) in (0, 1], default 0.9 (1 = off)\n"
    "  -s <int>    random seed, >= 0 (0 = from the clock), default 0\n"
    "  -n <int>    positions to run, prompt included, >= 0 (0 = seq_len; clamped to seq_len), default 256\n"
    "  -i <string> prompt\n"
    "  -z <path>   tokenizer.bin, default tokenizer.bin\n"
    "  -m <mode>   generate|chat, default generate\n"
    "  -y <string> system prompt (chat mode)\n"
    "  -v <0|1>    1: also print tok/s in processor time and the prompt and generated token ids\n"
    "              on stderr\n";

static int parse_float(const char *s, float *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end != '\0' || errno == ERANGE || !isfinite(v)) return -1;
    *out = (float)v;
    return 0;
}

static int parse_int(const char *s, long long lo, long long hi, long long *out) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (end == s || *end != '\0' || errno == ERANGE || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

/* Parse argv into opts. Returns 0, 1 for --help, or -1 with a message. */
static int parse_args(int argc, char **argv, Options *o, Err *err) {
    o->checkpoint = NULL, o->tokenizer = "tokenizer.bin", o->temperature = 1.0f, o->topp = 0.9f;
    o->seed = 0, o->steps = 256, o->prompt = NULL, o->mode = "generate", o->system_prompt = NULL;
    o->verbose = 0;
    if (argc < 2) return fail(err, "no model file given\n%s", USAGE);
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) return 1;
    if (argv[1][0] == '-') return fail(err, "the first argument must be the model file, got '%s'\n%s", argv[1], USAGE);
    o->checkpoint = argv[1];
    for (int i = 2; i < argc; i += 2) {
        const char *flag = argv[i];
        if (!strcmp(flag, "-h") || !strcmp(flag, "--help")) return 1;
        if (flag[0] != '-' || strlen(flag) != 2)
            return fail(err, "unexpected argument '%s': options are a dash and one letter followed by a "
                             "value, e.g. -n 256\n%s", flag, USAGE);
        if (i + 1 >= argc) return fail(err, "option %s needs a value\n%s", flag, USAGE);
        const char *val = argv[i + 1];
        long long iv;
        switch (flag[1]) {
        case 't':
            if (parse_float(val, &o->temperature) || o->temperature < 0.0f)
                return fail(err, "invalid -t '%s': temperature must be a number >= 0 (0 = greedy)", val);
            break;
        case 'p':
            if (parse_float(val, &o->topp) || !(o->topp > 0.0f && o->topp <= 1.0f))
                return fail(err, "invalid -p '%s': top-p must be a number in (0, 1], e.g. 0.9", val);
            break;
        case 's':
            if (val[0] == '-' || parse_int(val, 0, LLONG_MAX, &iv))
                return fail(err, "invalid -s '%s': the seed must be an integer >= 0", val);
            o->seed = (unsigned long long)iv;
            break;
        case 'n':
            if (parse_int(val, 0, INT_MAX, &iv))
                return fail(err, "invalid -n '%s': steps must be an integer >= 0 (0 = the model's seq_len)", val);
            o->steps = (int)iv;
            break;
        case 'i': o->prompt = val; break;
        case 'z': o->tokenizer = val; break;
        case 'y': o->system_prompt = val; break;
        case 'm':
            if (strcmp(val, "generate") && strcmp(val, "chat"))
                return fail(err, "invalid -m '%s': the mode must be generate or chat", val);
            o->mode = val;
            break;
        case 'v':
            if (parse_int(val, 0, 1, &iv)) return fail(err, "invalid -v '%s': use 0 or 1", val);
            o->verbose = (int)iv;
            break;
        default:
            return fail(err, "unknown option '%s'\n%s", flag, USAGE);
        }
    }
    return 0;
}

#endif /* !RUN_LIBRARY || RUN_FUZZ */

#ifndef RUN_LIBRARY

/* Print a piece, skipping lone control bytes (raw byte tokens such as 0x07 would garble a terminal). */
static void print_piece(const char *piece, void *user) {
    (void)user;
    if (!piece || !piece[0]) return;
    if (!piece[1]) {
        unsigned char b = (unsigned char)piece[0];
        if (b < 0x80 && !(isprint(b) || isspace(b))) return;
    }
    fputs(piece, stdout);
    fflush(stdout);
}

static int die(const char *msg) {
    fprintf(stderr, "error: %s\n", msg);
    return 1;
}

/* Read one line from stdin into buf (newline removed). Returns 0, 1 at end of input, -1 if too long. */
static int read_line(const char *label, char *buf, size_t size) {
    printf("%s", label);
    fflush(stdout);
    if (!fgets(buf, (int)size, stdin)) return 1;
    size_t len = strlen(buf);
    if (len > 0 && buf[len - 1] == '\n') {
        buf[--len] = '\0';
    } else if (len == size - 1) {
        int ch;
        while ((ch = getchar()) != '\n' && ch != EOF) {}
        return -1;
    }
    return 0;
}

/* Chat in the Llama 2 chat format: [INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] answer </s> */
static int chat(Transformer *t, const Tokenizer *tk, Sampler *sampler, const char *cli_user,
                const char *cli_system, int steps, Err *err) {
    enum { LINE = 4096 };
    char system_prompt[LINE], user_prompt[LINE];
    char rendered[2 * LINE + 64];
    int *ids = (int *)malloc((sizeof(rendered) + 3) * sizeof(int));
    if (!ids) return fail(err, "out of memory");
    if (steps == 0 || steps > t->config.seq_len) steps = t->config.seq_len;
    int user_turn = 1, n_ids = 0, idx = 0, token = 0, next = 0, pos = 0;
    while (pos < steps) {
        if (user_turn) {
            system_prompt[0] = '\0';
            if (pos == 0) {
                if (cli_system) {
                    if (strlen(cli_system) >= LINE) {
                        free(ids);
                        return fail(err, "system prompt is longer than %d bytes; shorten it", LINE - 1);
                    }
                    strcpy(system_prompt, cli_system);
                } else {
                    int r = read_line("Enter system prompt (optional): ", system_prompt, LINE);
                    if (r > 0) break;
                    if (r < 0) {
                        free(ids);
                        return fail(err, "system prompt is longer than %d bytes; shorten it", LINE - 2);
                    }
                }
            }
            if (pos == 0 && cli_user) {
                if (strlen(cli_user) >= LINE) {
                    free(ids);
                    return fail(err, "prompt is longer than %d bytes; shorten it", LINE - 1);
                }
                strcpy(user_prompt, cli_user);
            } else {
                int r = read_line("User: ", user_prompt, LINE);
                if (r > 0) break;
                if (r < 0) {
                    fprintf(stderr, "(input longer than %d bytes ignored; type a shorter message)\n", LINE - 2);
                    continue;
                }
            }
            if (pos == 0 && system_prompt[0])
                snprintf(rendered, sizeof(rendered), "[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]", system_prompt,
                         user_prompt);
            else
                snprintf(rendered, sizeof(rendered), "[INST] %s [/INST]", user_prompt);
            n_ids = encode(tk, rendered, 1, 0, ids, (int)sizeof(rendered) + 3, err);
            if (n_ids < 0) {
                free(ids);
                return -1;
            }
            if (pos + n_ids >= steps) {
                printf("\n(context is full: %d of %d positions used)\n", pos, steps);
                break;
            }
            user_turn = 0, idx = 0;
            printf("Assistant: ");
        }
        token = idx < n_ids ? ids[idx++] : next;
        /* The answer's EOS is fed to the model too (the format is "... answer </s><s>[INST] ..."),
         * then the user speaks again. */
        if (token == EOS_ID) user_turn = 1;
        float *logits = forward(t, token, pos);
        next = sample(sampler, logits);
        pos++;
        if (idx >= n_ids && next != EOS_ID) print_piece(decode_piece(tk, token, next), NULL);
        if (idx >= n_ids && next == EOS_ID) printf("\n");
    }
    printf("\n");
    free(ids);
    return 0;
}

int main(int argc, char **argv) {
    char msg[2048];
    Err err = {msg, (int)sizeof(msg)};
    Options o;
    int r = parse_args(argc, argv, &o, &err);
    if (r == 1) {
        printf("%s", USAGE);
        return 0;
    }
    if (r) return die(msg);

    Transformer t;
    Tokenizer tk;
    Sampler sampler;
    uint64_t size = 0;
    unsigned char *data = read_file(o.checkpoint, "model file", &size, &err);
    if (!data) return die(msg);
    r = build_transformer(&t, data, size, &err);
    free(data);
    if (r) return die(msg);
    unsigned char *tdata = read_file(o.tokenizer, "tokenizer file", &size, &err);
    if (!tdata) {
        free_transformer(&t);
        snprintf(msg + strlen(msg), sizeof(msg) - strlen(msg), " (pass the tokenizer with -z tokenizer.bin)");
        return die(msg);
    }
    r = parse_tokenizer(&tk, tdata, size, t.config.vocab_size, &err);
    free(tdata);
    if (r) {
        free_transformer(&t);
        return die(msg);
    }
    if (build_sampler(&sampler, t.config.vocab_size, o.temperature, o.topp, o.seed, &err)) {
        free_transformer(&t), free_tokenizer(&tk);
        return die(msg);
    }

    if (!strcmp(o.mode, "generate")) {
        int steps = o.steps == 0 || o.steps > t.config.seq_len ? t.config.seq_len : o.steps;
        size_t plen = o.prompt ? strlen(o.prompt) : 0;
        int *gen = (int *)malloc((size_t)steps * sizeof(int));
        int *prompt_ids = (int *)malloc((plen + 3) * sizeof(int));
        int n_prompt = 0;
        double tps = 0.0, cpu_tps = 0.0;
        int n = -1;
        if (gen && prompt_ids) {
            /* prints the prompt's pieces, then each new piece as it is produced */
            n = generate(&t, &tk, &sampler, o.prompt, steps, 1, print_piece, NULL, gen, steps, prompt_ids,
                         &n_prompt, &tps, &cpu_tps, &err);
        } else {
            fail(&err, "out of memory");
        }
        if (n >= 0) {
            printf("\n");
            fprintf(stderr, "achieved tok/s: %f\n", tps);
            if (o.verbose) {
                fprintf(stderr, "cpu tok/s: %f (positions per second of processor time)\n", cpu_tps);
                fprintf(stderr, "prompt tokens:");
                for (int i = 0; i < n_prompt; i++) fprintf(stderr, " %d", prompt_ids[i]);
                fprintf(stderr, "\ngenerated tokens:");
                for (int i = 0; i < n; i++) fprintf(stderr, " %d", gen[i]);
                fprintf(stderr, "\n");
            }
        }
        free(gen), free(prompt_ids);
        if (n < 0) r = -1;
    } else {
        r = chat(&t, &tk, &sampler, o.prompt, o.system_prompt, o.steps, &err);
    }
    free_sampler(&sampler);
    free_tokenizer(&tk);
    free_transformer(&t);
    if (r) {
        fflush(stdout);
        return die(msg);
    }
    return 0;
}

#endif /* RUN_LIBRARY */
