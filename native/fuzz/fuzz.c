/*
 * fuzz.c -- throw thousands of damaged inputs at run.c and check it never crashes.
 *
 * Usage: fuzz [cases] [seed]        (defaults: 5000 cases, seed 1)
 *
 * Built with AddressSanitizer and UndefinedBehaviorSanitizer (see native/Makefile), so any read
 * or write out of bounds, use after free, leak, integer overflow or other undefined behaviour
 * stops the program with a report. An input that run.c rejects with an error message is a pass:
 * that is the job of its checks. A rejection *without* a message is a failure too.
 *
 * The driver includes run.c itself (library mode), so every case runs in-process, without
 * fork/exec: thousands of cases per second. It builds a few small, valid seed inputs (llama2.c
 * version-0 and extended model files, fp32, Q8_0 and Q4_0, tokenizers with and without byte fallback),
 * then each case mutates some of them -- bit flips, byte overwrites, header fields set to edge
 * values, truncation, extension, chunk deletion, NaN/Inf weights, tokenizer length and score
 * edits -- and runs everything the C API offers on the result: open, config, forward, encode,
 * decode, generate with valid and invalid settings. Command lines are fuzzed through the option
 * parser as well. The same seed always gives the same cases.
 */
#define RUN_LIBRARY
#define RUN_FUZZ
#include "../run.c"

#include <float.h>

/* ---- deterministic random numbers (splitmix64) ---- */

static uint64_t rng_state;

static uint64_t next_u64(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint32_t below(uint32_t n) { return n ? (uint32_t)(next_u64() % n) : 0; }
static float uniform(void) { return (float)(next_u64() >> 40) / 16777216.0f; }

/* ---- growable byte buffers ---- */

typedef struct {
    unsigned char *data;
    size_t len, cap;
} Buf;

static void buf_reserve(Buf *b, size_t n) {
    if (n <= b->cap) return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < n) cap *= 2;
    b->data = (unsigned char *)realloc(b->data, cap);
    if (!b->data) {
        fprintf(stderr, "fuzz: out of memory\n");
        exit(2);
    }
    b->cap = cap;
}

static void put(Buf *b, const void *p, size_t n) {
    buf_reserve(b, b->len + n);
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void put_i32(Buf *b, int32_t v) { put(b, &v, 4); }
static void put_f32(Buf *b, float v) { put(b, &v, 4); }
static void put_f64(Buf *b, double v) { put(b, &v, 8); }

static void put_floats(Buf *b, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) put_f32(b, (uniform() * 2.0f - 1.0f) * scale);
}

static void put_ones(Buf *b, size_t n) {
    for (size_t i = 0; i < n; i++) put_f32(b, 1.0f);
}

static void copy_buf(Buf *dst, const Buf *src) {
    dst->len = 0;
    put(dst, src->data, src->len);
}

/* ---- seed inputs ---- */

enum { DIM = 16, HIDDEN = 24, LAYERS = 2, HEADS = 4, KV_HEADS = 2, VOCAB = 300, SEQ = 16 };

/* A matrix of n weights: fp32, Q8_0 (int8 values then one scale per group) or Q4_0 (two 4-bit
 * values per byte, then one scale per group). */
static void put_matrix(Buf *b, size_t n, int type, int gs) {
    if (type == WT_F32) {
        put_floats(b, n, 0.5f);
        return;
    }
    for (size_t i = 0; i < (type == WT_Q4 ? n / 2 : n); i++) {
        unsigned char v = type == WT_Q4 ? (unsigned char)below(256) : (unsigned char)(int8_t)((int)below(255) - 127);
        put(b, &v, 1);
    }
    for (size_t g = 0; g < n / (size_t)gs; g++) put_f32(b, type == WT_Q4 ? -0.1f : 0.01f);
}

/* type: WT_F32, WT_Q8 or WT_Q4; gs: the group size of Q8_0 and Q4_0 */
static void make_model(Buf *b, int ext, int tied, int qk_norm, int type, int gs, int head_rows) {
    const int hs = DIM / HEADS, kv_dim = KV_HEADS * hs;
    b->len = 0;
    if (!ext) {
        int32_t header[7] = {DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, tied ? VOCAB : -VOCAB, SEQ};
        put(b, header, sizeof(header));
    } else {
        put_i32(b, (int32_t)EXT_MAGIC);
        put_i32(b, EXT_VERSION);
        int32_t dims[7] = {DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ};
        put(b, dims, sizeof(dims));
        put_i32(b, tied ? VOCAB : head_rows);
        put_i32(b, (tied ? FLAG_SHARED_CLASSIFIER : 0) | (qk_norm ? FLAG_QK_NORM : 0));
        put_i32(b, type);
        put_i32(b, type == WT_F32 ? 0 : gs);
        put_f32(b, 1e-6f);
        put_f64(b, 500.0);
        put_f32(b, qk_norm ? 30.0f : 0.0f);
        put_i32(b, qk_norm ? 5 : 0);
        while (b->len < EXT_HEADER_BYTES) put(b, "", 1);
    }
    put_matrix(b, (size_t)VOCAB * DIM, type, gs);
    put_ones(b, (size_t)LAYERS * DIM);
    put_matrix(b, (size_t)LAYERS * DIM * DIM, type, gs);
    put_matrix(b, (size_t)LAYERS * kv_dim * DIM, type, gs);
    put_matrix(b, (size_t)LAYERS * kv_dim * DIM, type, gs);
    if (ext && qk_norm) put_ones(b, (size_t)2 * LAYERS * hs);
    put_matrix(b, (size_t)LAYERS * DIM * DIM, type, gs);
    put_ones(b, (size_t)LAYERS * DIM);
    put_matrix(b, (size_t)LAYERS * HIDDEN * DIM, type, gs);
    put_matrix(b, (size_t)LAYERS * DIM * HIDDEN, type, gs);
    put_matrix(b, (size_t)LAYERS * HIDDEN * DIM, type, gs);
    put_ones(b, DIM);
    if (!ext) put_floats(b, (size_t)SEQ * hs, 1.0f); /* freq_cis, unused */
    if (!tied) put_matrix(b, (size_t)(ext ? head_rows : VOCAB) * DIM, type, gs);
}

static void put_piece(Buf *b, float score, const char *s, int len) {
    put_f32(b, score);
    put_i32(b, len);
    put(b, s, (size_t)len);
}

/* VOCAB pieces: <unk>, BOS, EOS, then 256 byte pieces (or random strings), then characters and a
 * few merges, so that BPE merging has work to do. */
static void make_tokenizer(Buf *b, int byte_fallback) {
    static const char *extra[] = {" ", "a", "b", "c", "e", "h", "t", "\n", ":", "\xc3\xa9", "ab", " a", "th",
                                  "the", " the", "he", "abc", "  ", "\xe2\x96\x81", "<s>", "<0x41>"};
    int n_extra = (int)(sizeof(extra) / sizeof(extra[0]));
    char piece[16];
    b->len = 0;
    put_i32(b, 8); /* max_token_length */
    put_piece(b, 0.0f, "<unk>", 5);
    put_piece(b, 0.0f, "\n<s>\n", 5);
    put_piece(b, 0.0f, "\n</s>\n", 6);
    for (int i = 0; i < 256; i++) {
        if (byte_fallback) snprintf(piece, sizeof(piece), "<0x%02X>", i);
        else snprintf(piece, sizeof(piece), "q%d", i);
        put_piece(b, 0.0f, piece, (int)strlen(piece));
    }
    for (int i = 259; i < VOCAB; i++) {
        int k = i - 259;
        if (k < n_extra) {
            put_piece(b, -(float)k, extra[k], (int)strlen(extra[k]));
        } else {
            snprintf(piece, sizeof(piece), "z%d", k);
            put_piece(b, -100.0f - (float)k, piece, (int)strlen(piece));
        }
    }
}

/* ---- mutations ---- */

static const int32_t interesting[] = {0, 1, -1, 2, 3, 4, 7, 8, 16, 255, 256, 257, 1024, 65535, 65536, -65536,
                                      INT32_MAX, INT32_MIN, INT32_MAX - 1, 1 << 20, (1 << 20) + 1, 1 << 22,
                                      (1 << 22) + 1, 1 << 16, (1 << 16) + 1, 300, 299, 301, 128, 259};

static void set_i32(Buf *b, size_t off, int32_t v) {
    if (off + 4 <= b->len) memcpy(b->data + off, &v, 4);
}

static void mutate(Buf *b, int header_bytes) {
    int rounds = 1 + (int)below(3);
    for (int r = 0; r < rounds; r++) {
        size_t len = b->len;
        switch (below(9)) {
        case 0: /* flip a few bits */
            for (int i = 0, n = 1 + (int)below(8); i < n && len; i++) b->data[below((uint32_t)len)] ^= (unsigned char)(1u << below(8));
            break;
        case 1: /* overwrite a few bytes */
            for (int i = 0, n = 1 + (int)below(8); i < n && len; i++) b->data[below((uint32_t)len)] = (unsigned char)next_u64();
            break;
        case 2: /* a header field gets an edge value, or its old value plus a small step */
        case 3: {
            size_t off = 4 * below((uint32_t)(header_bytes / 4));
            int32_t old = 0;
            if (off + 4 <= len) memcpy(&old, b->data + off, 4);
            int32_t v = below(2) ? interesting[below(sizeof(interesting) / sizeof(interesting[0]))]
                                 : (int32_t)((uint32_t)old + (uint32_t)((int)below(9) - 4));
            set_i32(b, off, v);
            break;
        }
        case 4: /* truncate */
            b->len = below((uint32_t)len + 1);
            break;
        case 5: { /* extend with random bytes */
            size_t n = 1 + below(64);
            for (size_t i = 0; i < n; i++) {
                unsigned char ch = (unsigned char)next_u64();
                put(b, &ch, 1);
            }
            break;
        }
        case 6: /* delete a chunk */
            if (len > 1) {
                size_t at = below((uint32_t)len), n = 1 + below((uint32_t)(len - at));
                memmove(b->data + at, b->data + at + n, len - at - n);
                b->len = len - n;
            }
            break;
        case 7: /* a weight becomes NaN, infinite or huge (the file stays well-formed) */
            if (len > (size_t)header_bytes + 8) {
                static const float specials[] = {NAN, INFINITY, -INFINITY, FLT_MAX, -FLT_MAX, 1e30f, FLT_MIN, 0.0f};
                size_t off = (size_t)header_bytes + 4 * below((uint32_t)((len - (size_t)header_bytes) / 4));
                if (off + 4 <= len) memcpy(b->data + off, &specials[below(8)], 4);
            }
            break;
        default: /* leave it (another input is mutated instead) */
            break;
        }
    }
}

/* Edit a tokenizer's structure: a piece length or score set to an edge value. */
static void mutate_tokenizer_fields(Buf *b) {
    size_t off = 4;
    int target = (int)below(VOCAB + 10), i = 0;
    while (off + 8 <= b->len && i < target) {
        int32_t len;
        memcpy(&len, b->data + off + 4, 4);
        if (len < 0 || (size_t)len > b->len) return;
        off += 8 + (size_t)len;
        i++;
    }
    if (off + 8 > b->len) return;
    if (below(2)) set_i32(b, off + 4, interesting[below(sizeof(interesting) / sizeof(interesting[0]))]);
    else {
        static const float scores[] = {NAN, INFINITY, -INFINITY, 1e30f, -1e30f};
        memcpy(b->data + off, &scores[below(5)], 4);
    }
}

static void random_prompt(char *out, size_t cap, const Buf *tok) {
    size_t n = below((uint32_t)(cap - 1));
    int style = (int)below(3);
    for (size_t i = 0; i < n; i++) {
        if (style == 0) out[i] = (char)(1 + below(255)); /* any bytes, invalid UTF-8 included */
        else if (style == 1) out[i] = " abcethe\n:"[below(10)];
        else out[i] = (char)(0x80 + below(0x40)) | (below(2) ? 0x40 : 0);
    }
    out[n] = '\0';
    (void)tok;
}

/* ---- checks ---- */

static long failures_without_message = 0;

static void check_message(int failed, const char *err, const char *what) {
    if (failed && err[0] == '\0') {
        fprintf(stderr, "fuzz: %s failed without an error message\n", what);
        failures_without_message++;
    }
}

static void on_piece(const char *piece, void *user) {
    size_t *total = (size_t *)user;
    *total += strlen(piece); /* reads the whole piece: ASan checks it is a valid string */
}

static void exercise(tt_engine *e) {
    char err[256];
    int cfg[7];
    if (tt_config(e, cfg) != 0) {
        fprintf(stderr, "fuzz: tt_config failed on an open engine\n");
        failures_without_message++;
        return;
    }
    int vocab = cfg[5], seq = cfg[6];
    int toks[SEQ + 4];
    int n = 1 + (int)below(seq < SEQ ? (uint32_t)seq : SEQ);
    for (int i = 0; i < n; i++) toks[i] = below(20) ? (int)below((uint32_t)vocab) : (int)next_u64();
    float *logits = (float *)malloc((size_t)n * (size_t)vocab * sizeof(float));
    err[0] = '\0';
    int r = tt_forward_all(e, toks, n, logits, err, sizeof(err));
    check_message(r != 0, err, "tt_forward_all");
    free(logits);

    char prompt[160];
    random_prompt(prompt, sizeof(prompt), NULL);
    int ids[sizeof(prompt) + 3];
    int cap = below(4) ? (int)sizeof(ids) / (int)sizeof(int) : (int)below(8); /* sometimes too small */
    err[0] = '\0';
    r = tt_encode(e, prompt, (int)below(2), (int)below(2), ids, cap, err, sizeof(err));
    check_message(r < 0, err, "tt_encode");
    for (int i = 0; i < r; i++)
        if (ids[i] < 0 || ids[i] >= vocab) {
            fprintf(stderr, "fuzz: tt_encode produced id %d outside the vocabulary (%d)\n", ids[i], vocab);
            failures_without_message++;
        }
    for (int i = 0; i < 4; i++) {
        const char *piece = tt_decode_piece(e, (int)below((uint32_t)vocab + 2) - 1, (int)below((uint32_t)vocab + 4) - 2);
        if (!piece) {
            fprintf(stderr, "fuzz: tt_decode_piece returned NULL\n");
            failures_without_message++;
        } else {
            (void)strlen(piece);
        }
    }

    static const float temps[] = {0.0f, 0.5f, 1.0f, 2.0f, 1e-30f, -1.0f, NAN, INFINITY};
    static const float topps[] = {0.9f, 1.0f, 0.5f, 1e-6f, 0.0f, 1.5f, NAN};
    int steps = below(8) ? (int)below(SEQ + 2) : -(int)below(3);
    if (steps == 0 && seq > SEQ) steps = SEQ; /* 0 would run the whole (possibly huge) context */
    int out[SEQ + 4];
    size_t text = 0;
    double tps = 0.0;
    err[0] = '\0';
    r = tt_generate(e, below(3) ? prompt : NULL, steps, temps[below(8)], topps[below(7)], 1 + next_u64() % 5,
                    below(4) ? on_piece : NULL, &text, below(4) ? out : NULL, (int)below(SEQ + 4), &tps, err,
                    sizeof(err));
    check_message(r < 0, err, "tt_generate");
}

static void fuzz_cli(void) {
    static const char *words[] = {"-t", "-p", "-s", "-n", "-i", "-z", "-m", "-y", "-v", "-x", "-h", "--help",
                                  "-", "", "0", "1", "-1", "0.9", "1.5", "nan", "inf", "1e99", "abc", "chat",
                                  "generate", "99999999999999999999", "-0", "0x10", "model.bin", " 3", "3 "};
    char *argv[12];
    int argc = 1 + (int)below(11);
    argv[0] = (char *)"run";
    for (int i = 1; i < argc; i++) argv[i] = (char *)words[below(sizeof(words) / sizeof(words[0]))];
    Options o;
    char msg[2048];
    Err err = {msg, (int)sizeof(msg)};
    msg[0] = '\0';
    int r = parse_args(argc, argv, &o, &err);
    check_message(r < 0, msg, "parse_args");
    if (r == 0 && (!(o.temperature >= 0.0f) || !(o.topp > 0.0f && o.topp <= 1.0f) || o.steps < 0)) {
        fprintf(stderr, "fuzz: parse_args accepted out-of-range values\n");
        failures_without_message++;
    }
}

int main(int argc, char **argv) {
    long cases = argc > 1 ? atol(argv[1]) : 5000;
    rng_state = argc > 2 ? strtoull(argv[2], NULL, 10) : 1;
    if (cases <= 0) {
        fprintf(stderr, "usage: fuzz [cases > 0] [seed]\n");
        return 2;
    }
    max_state_bytes = 8u << 20; /* keep mutated seq_len values from allocating gigabytes */

    enum { N_MODELS = 7, N_TOKS = 2 };
    Buf models[N_MODELS] = {{0}}, toks[N_TOKS] = {{0}};
    int header_bytes[N_MODELS] = {V0_HEADER_BYTES, V0_HEADER_BYTES, EXT_HEADER_BYTES, EXT_HEADER_BYTES,
                                  EXT_HEADER_BYTES, EXT_HEADER_BYTES, EXT_HEADER_BYTES};
    make_model(&models[0], 0, 1, 0, WT_F32, 0, VOCAB); /* llama2.c v0, tied */
    make_model(&models[1], 0, 0, 0, WT_F32, 0, VOCAB); /* llama2.c v0, untied */
    make_model(&models[2], 1, 0, 1, WT_F32, 0, 320);   /* ext fp32: QK-norm, softcap, window, padded head */
    make_model(&models[3], 1, 1, 0, WT_Q8, 4, VOCAB);  /* ext Q8_0 (group size 4), tied */
    make_model(&models[4], 1, 0, 1, WT_Q8, 8, 384);    /* ext Q8_0 (group size 8), everything */
    make_model(&models[5], 1, 1, 0, WT_F32, 0, VOCAB); /* ext fp32, tied */
    make_model(&models[6], 1, 0, 1, WT_Q4, 8, 320);    /* ext Q4_0 (group size 8), everything */
    make_tokenizer(&toks[0], 1);
    make_tokenizer(&toks[1], 0);

    /* Every seed must load: otherwise the fuzzer would only test the first check. */
    for (int m = 0; m < N_MODELS; m++) {
        char err[256];
        tt_engine *e = tt_open_memory(models[m].data, models[m].len, toks[m % N_TOKS].data, toks[m % N_TOKS].len,
                                      err, sizeof(err));
        if (!e) {
            fprintf(stderr, "fuzz: seed model %d does not load: %s\n", m, err);
            return 1;
        }
        exercise(e);
        tt_close(e);
    }

    Buf model = {0}, tok = {0};
    long opened = 0, rejected = 0;
    for (long c = 0; c < cases; c++) {
        int m = (int)below(N_MODELS), t = (int)below(N_TOKS);
        copy_buf(&model, &models[m]);
        copy_buf(&tok, &toks[t]);
        switch (below(4)) {
        case 0: mutate(&model, header_bytes[m]); break;
        case 1: mutate(&tok, 4); if (below(2)) mutate_tokenizer_fields(&tok); break;
        case 2: mutate(&model, header_bytes[m]); mutate(&tok, 4); break;
        default: if (below(2)) mutate_tokenizer_fields(&tok); break; /* valid model: prompts and settings */
        }
        char err[256];
        err[0] = '\0';
        /* Exact-size copies, so ASan catches any read past the end of the input. */
        unsigned char *mcopy = (unsigned char *)malloc(model.len ? model.len : 1);
        unsigned char *tcopy = (unsigned char *)malloc(tok.len ? tok.len : 1);
        memcpy(mcopy, model.data, model.len);
        memcpy(tcopy, tok.data, tok.len);
        tt_engine *e = tt_open_memory(mcopy, model.len, below(10) ? tcopy : NULL, tok.len, err, sizeof(err));
        free(mcopy), free(tcopy);
        if (!e) {
            rejected++;
            check_message(1, err, "tt_open_memory");
        } else {
            opened++;
            exercise(e);
            tt_close(e);
        }
        if (c % 8 == 0) fuzz_cli();
    }

    /* The file-reading path: a missing file, an empty file and one real model. */
    {
        char err[256], path[64];
        snprintf(path, sizeof(path), "fuzz_tmp_%ld.bin", (long)(rng_state % 100000));
        tt_engine *e = tt_open("/nonexistent/model.bin", NULL, err, sizeof(err));
        check_message(e == NULL, err, "tt_open (missing file)");
        if (e) tt_close(e);
        FILE *f = fopen(path, "wb");
        if (f) {
            fclose(f);
            e = tt_open(path, NULL, err, sizeof(err));
            check_message(e == NULL, err, "tt_open (empty file)");
            if (e) tt_close(e);
            f = fopen(path, "wb");
            fwrite(models[0].data, 1, models[0].len, f);
            fclose(f);
            e = tt_open(path, path, err, sizeof(err)); /* the model as tokenizer: must be refused */
            check_message(e == NULL, err, "tt_open (model as tokenizer)");
            if (e) tt_close(e);
            remove(path);
        }
    }

    for (int i = 0; i < N_MODELS; i++) free(models[i].data);
    for (int i = 0; i < N_TOKS; i++) free(toks[i].data);
    free(model.data), free(tok.data);
    printf("fuzz: %ld cases (%ld opened and exercised, %ld rejected with a message), 0 crashes, "
           "%ld failures without a message\n", cases, opened, rejected, failures_without_message);
    return failures_without_message ? 1 : 0;
}
