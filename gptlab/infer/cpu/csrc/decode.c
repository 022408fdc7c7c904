/* One whole decoding step of a GPT-2 / GPT-3 model in one call: embeddings, every block (layer norms,
 * attention over the KV cache, dense or locally banded, MLP) and the output projection, for a few rows.
 *
 * Batch-1 decoding of GPT-2 124M reads ~125-500 MB of weights per token in ~50 matrix products; run
 * as torch operators, the ~300 small operations around them (layer norms, views, attention, adds, and
 * an OpenMP fork/join per product) cost 3-5 ms a token, a third of a bfloat16 token. Here one OpenMP
 * region spans the step: the linear layers share their weight rows among the threads (matvec.c's
 * chunks of tiles), attention splits (row, head) pairs, the small elementwise work runs on one thread, and
 * barriers order the phases.
 *
 * Compiled together with matvec.c by gptlab/cpu_kernels.py, which mirrors the structs below.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "matvec.c"

enum { GL_F32 = 0, GL_BF16 = 1, GL_I8 = 2 };

typedef struct {
    const void *w;      /* (n, k) weights: float32, bfloat16 or int8 */
    const float *scale; /* (n,) per-row scale of int8 weights, else NULL */
    const float *bias;  /* (n,) or NULL */
    int64_t n, k, kind;
} gl_lin;

typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    gl_lin qkv, proj, fc, fc_proj;
    int64_t local; /* 1: attends to the last `window` slots only (GPT-3's banded layers) */
} gl_block;

typedef struct {
    int64_t n_layer, n_embd, n_head, d_ff, vocab, n_ctx, window;
    double eps;
    const float *wte, *wpe, *lnf_w, *lnf_b; /* (vocab, C), (n_ctx, C), (C,), (C,) */
    const gl_block *blocks;
    gl_lin head; /* (vocab, C) */
} gl_model;

static void layer_norm(const float *x, float *y, int64_t M, int64_t C, const float *w, const float *b,
                       double eps) {
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * C;
        double sum = 0, sq = 0;
        for (int64_t c = 0; c < C; c++) sum += xr[c];
        double mean = sum / C;
        for (int64_t c = 0; c < C; c++) sq += (xr[c] - mean) * (xr[c] - mean);
        float rstd = (float)(1.0 / sqrt(sq / C + eps)), fmean = (float)mean;
        for (int64_t c = 0; c < C; c++) {
            float v = (xr[c] - fmean) * rstd;
            y[m * C + c] = (w ? v * w[c] : v) + (b ? b[c] : 0.0f);
        }
    }
}

/* e^x for 8 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' expf polynomial (~1 ulp),
 * 2^n built in the exponent bits; x clamped to where e^x is a normal float. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 in two parts: r exact */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* torch's GELU(approximate="tanh"), 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3),
 * computed as x / (1 + e^(-2u)), the same function: libm's tanhf, one value at a time, was a third of
 * an int8 token's MLP time. */
static void gelu_tanh(float *y, int64_t n) {
    const float k = 0.7978845608028654f, c = 0.044715f;
    for (int64_t i = 0; i < n; i += 8) {
        /* The last (n % 8) values through the same vector code, so every value is computed alike
         * wherever the chunk of outputs it falls in ends. */
        float tail[8] = {0};
        int64_t count = n - i < 8 ? n - i : 8;
        float *p = count == 8 ? y + i : memcpy(tail, y + i, sizeof(float) * count);
        __m256 x = _mm256_loadu_ps(p);
        __m256 cube = _mm256_mul_ps(_mm256_mul_ps(x, x), _mm256_mul_ps(_mm256_set1_ps(c), x));
        __m256 u = _mm256_mul_ps(_mm256_set1_ps(-2.0f * k), _mm256_add_ps(cube, x));
        _mm256_storeu_ps(p, _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(u))));
        if (count < 8) memcpy(y + i, tail, sizeof(float) * count);
    }
}

static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy(float a, const float *x, float *y, int64_t n) {
    __m256 av = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

static const int64_t ELEM_SIZE[] = {4, 2, 1}; /* bytes per weight of GL_F32, GL_BF16, GL_I8 */

/* This thread's share of y (M, n) = x @ W^T: chunks of weight rows claimed through `ctr` (see claim);
 * with `gelu`, the thread also applies GELU to the outputs it wrote (they are still in its cache).
 * xq, xs: int8 layers' int16 activations and their scales; xp: bfloat16 layers' (prepare_bf16). */
static void linear_part(const gl_lin *L, const float *x, const int16_t *xq, const float *xs, const float *xp,
                        int64_t M, float *y, int tid, int nt, int gelu, int amx, gl_counter *ctr) {
    const char *W = (const char *)L->w;
    int64_t chunk = chunk_rows(L->k, ELEM_SIZE[L->kind]), n0, n1;
    int owner = 0;
    while (claim(ctr, L->n, chunk, tid, nt, &owner, &n0, &n1)) {
        switch (L->kind) {
        case GL_F32: range_f32(x, NULL, M, L->k, W, n0, n1, L->n, L->scale, L->bias, y); break;
        case GL_BF16: range_bf16a(xp, NULL, M, L->k, W, n0, n1, L->n, L->scale, L->bias, y, amx); break;
        default: range_q8(xq, xs, M, L->k, W, n0, n1, L->n, L->scale, L->bias, y); break;
        }
        if (gelu)
            for (int64_t m = 0; m < M; m++) gelu_tanh(y + m * L->n + n0, n1 - n0);
    }
}

/* A linear layer, called by every thread of the region: one thread converts the input (int8 layers
 * take their activations as int16, bfloat16 ones as bfloat16), each computes its chunks of weight
 * rows, and all wait for the output. `ctr`: this product's zeroed counters, one per thread. */
static void linear_all(const gl_lin *L, const float *x, int16_t *xq, float *xs, float *xp, int64_t M, float *y,
                       int tid, int nt, int gelu, int amx, gl_counter *ctr) {
    if (L->kind == GL_I8) {
#pragma omp single
        quantize_rows(x, M, L->k, xq, xs);
    } else if (L->kind == GL_BF16) {
#pragma omp single
        prepare_bf16(x, M, L->k, xp, amx);
    }
    linear_part(L, x, xq, xs, xp, M, y, tid, nt, gelu, amx, ctr);
#pragma omp barrier
}

/* The KV cache holds float32, or float16 for bfloat16 and int8 weights: attention then reads half the
 * bytes (int8 GPT-2 batch-1 steps 1.5-2.5% faster). Values beyond float16's range are stored as its
 * largest finite value (NaN stays NaN), as gptlab's torch path does (model.to_cache). */
#define HALF_MAX 65504.0f
static void store_kv(void *dst, const float *src, int64_t n, int half) {
    if (!half) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    uint16_t *d = dst;
    const __m256 hi = _mm256_set1_ps(HALF_MAX), lo = _mm256_set1_ps(-HALF_MAX);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) { /* max/min return their second operand for a NaN: it passes through */
        __m256 v = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_loadu_ps(src + i)));
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; i++) {
        float v = src[i] > HALF_MAX ? HALF_MAX : src[i] < -HALF_MAX ? -HALF_MAX : src[i];
        d[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
    }
}

static inline float dot_half(const float *a, const uint16_t *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i))), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * _cvtsh_ss(b[i]);
    return s;
}

static inline void axpy_half(float a, const uint16_t *x, float *y, int64_t n) {
    __m256 av = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 xv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i)));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, xv, _mm256_loadu_ps(y + i)));
    }
    for (; i < n; i++) y[i] += a * _cvtsh_ss(x[i]);
}

/* A head's run of keys or values in the next block starts a fresh stream the hardware prefetcher has
 * not seen; ask for it while this block is read. */
static inline void prefetch_block(const char *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(p + i, _MM_HINT_T0);
}

/* Row b, head h: writes the row's new key and value at position `pos` (block table[pos / bs], offset
 * pos % bs). kc, vc: this layer's (num_blocks, n_head, bs, hs) keys and values, float32 or (half) float16. */
static void store_row(const float *qkv, int64_t C, int64_t nh, int64_t hs, int64_t b, int64_t h, char *kc, char *vc,
                      int half, const int64_t *table, int64_t bs, int64_t pos) {
    const float *q = qkv + b * 3 * C + h * hs;
    const int64_t tok = hs * (half ? 2 : 4), stride = nh * bs * tok, head = h * bs * tok;
    store_kv(kc + table[pos / bs] * stride + head + (pos % bs) * tok, q + C, hs, half);
    store_kv(vc + table[pos / bs] * stride + head + (pos % bs) * tok, q + 2 * C, hs, half);
}

/* o[0, 64) += sum over positions s in [s0, end) of scores[s - lo] / sum * v_s[0, 64), v_s at v + (s - s0) *
 * tok: axpy's arithmetic, in order, with the sums in registers while the positions of a block go by
 * rather than stored and reloaded at every position (a 27M model's batch-1 attention at 240 positions
 * spent most of its time on those stores). */
static inline void weigh_values64(const float *scores, float sum, const char *v, int64_t tok, int64_t s0, int64_t end,
                                  int64_t lo, int half, float *o) {
    __m256 acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm256_loadu_ps(o + 8 * i);
    for (int64_t s = s0; s < end; s++, v += tok) {
        __m256 a = _mm256_set1_ps(scores[s - lo] / sum);
        if (half)
            for (int i = 0; i < 8; i++)
                acc[i] = _mm256_fmadd_ps(a, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)v + i)), acc[i]);
        else
            for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(a, _mm256_loadu_ps((const float *)v + 8 * i), acc[i]);
    }
    for (int i = 0; i < 8; i++) _mm256_storeu_ps(o + 8 * i, acc[i]);
}

/* q . k_p for the 8 keys k_p at k + p * tok (float32, or half: float16), hs a multiple of 8: 8
 * independent sums where one dot product at a time waits on its chain of hs / 8 multiply-adds. */
static inline __attribute__((always_inline)) __m256 dots8(const float *q, const char *k, int64_t tok, int64_t hs,
                                                          int half) {
    __m256 acc[8];
    for (int p = 0; p < 8; p++) acc[p] = _mm256_setzero_ps();
    for (int64_t i = 0; i < hs; i += 8) {
        __m256 qv = _mm256_loadu_ps(q + i);
        for (int p = 0; p < 8; p++) {
            const char *kp = k + p * tok;
            __m256 kv = half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)kp + i)))
                             : _mm256_loadu_ps((const float *)kp + i);
            acc[p] = _mm256_fmadd_ps(qv, kv, acc[p]);
        }
    }
    /* hadd pairs lanes within 128-bit halves: after two rounds, lane p of one half holds a partial sum
     * of key p (keys 0-3 from the first, 4-7 from the second); the two halves' lanes add up */
    __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

/* scores[s - lo] = q . k_s * scale for the keys s .. end - 1 of one block, the first at k, the next tok
 * bytes on; *mx: the largest so far. Groups of 8 keys from the first, the rest one at a time. */
static inline void score_keys(const float *q, const char *k, int64_t tok, int64_t hs, int half, int64_t s,
                              int64_t end, int64_t lo, float scale, float *scores, float *mx) {
    if (hs % 8 == 0)
        for (; s + 8 <= end; s += 8, k += 8 * tok) {
            __m256 v = _mm256_mul_ps(half ? dots8(q, k, tok, hs, 1) : dots8(q, k, tok, hs, 0), _mm256_set1_ps(scale));
            _mm256_storeu_ps(scores + s - lo, v);
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            *mx = _mm_cvtss_f32(m4) > *mx ? _mm_cvtss_f32(m4) : *mx;
        }
    for (; s < end; s++, k += tok) {
        float v = (half ? dot_half(q, (const uint16_t *)k, hs) : dot(q, (const float *)k, hs)) * scale;
        scores[s - lo] = v;
        *mx = v > *mx ? v : *mx;
    }
}

/* e^(scores - mx) in place over n scores; returns their sum. */
static float softmax_weights(float *scores, int64_t n, float mx) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(scores + i, exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + i), _mm256_set1_ps(mx))));
    for (; i < n; i++) scores[i] = expf(scores[i] - mx);
    __m256 sum8 = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) sum8 = _mm256_add_ps(sum8, _mm256_loadu_ps(scores + i));
    float sum = hsum(sum8);
    for (; i < n; i++) sum += scores[i];
    return sum;
}

/* Rows of one sequence at consecutive positions (the K + 1 a speculative step verifies) attend together,
 * up to RUN_MAX of them: each block of cached keys and values is read once for all of them and is in L1
 * for every row after the first, where row by row each re-read the sequence's whole cache. */
#define RUN_MAX 16

/* Attention of head h for the R rows b0 .. b0 + R - 1 of one sequence (block table `table`), row r at
 * position pos[r] = pos[0] + r over its positions [lo[r], pos[r]] of the paged cache. Blocks outside,
 * rows inside: each row's arithmetic is what it would be alone, so its output has the same bits beside
 * any rows. Every row's key and value are stored first (`store_row`), so the rows see each other's.
 * scores: R * span floats. kc, vc: this layer's caches, float32 or (half) float16. */
/* The positions [*s, *end) of block j (of bs) that a row attending to [lo, pos] sees; empty if *s >= *end. */
static inline void block_span(int64_t j, int64_t bs, int64_t lo, int64_t pos, int64_t *s, int64_t *end) {
    *s = lo > j * bs ? lo : j * bs;
    *end = (j + 1) * bs < pos + 1 ? (j + 1) * bs : pos + 1;
}

static void attend_run(const float *qkv, int64_t C, int64_t nh, int64_t hs, int64_t b0, int64_t R, int64_t h,
                       const char *kc, const char *vc, int half, const int64_t *table, int64_t bs, const int64_t *pos,
                       const int64_t *lo, float *scores, int64_t span, float *out) {
    /* Walked block by block: a division per position costs as much as its dot product. */
    const int64_t tok = hs * (half ? 2 : 4), stride = nh * bs * tok, head = h * bs * tok;
    const int64_t first = lo[0] / bs, last = pos[R - 1] / bs;
    const float scale = 1.0f / sqrtf((float)hs);
    float mx[RUN_MAX], sum[RUN_MAX];
    for (int64_t r = 0; r < R; r++) mx[r] = -INFINITY;
    for (int64_t j = first; j <= last; j++) {
        const char *k = kc + table[j] * stride + head;
        if (j < last) prefetch_block(kc + table[j + 1] * stride + head, bs * tok);
        for (int64_t r = 0; r < R; r++) {
            int64_t s, end;
            block_span(j, bs, lo[r], pos[r], &s, &end);
            if (s < end)
                score_keys(qkv + (b0 + r) * 3 * C + h * hs, k + (s - j * bs) * tok, tok, hs, half, s, end, lo[r],
                           scale, scores + r * span, mx + r);
        }
    }
    for (int64_t r = 0; r < R; r++) {
        sum[r] = softmax_weights(scores + r * span, pos[r] + 1 - lo[r], mx[r]);
        memset(out + (b0 + r) * C + h * hs, 0, hs * sizeof(float));
    }
    for (int64_t j = first; j <= last; j++) {
        const char *v = vc + table[j] * stride + head;
        if (j < last) prefetch_block(vc + table[j + 1] * stride + head, bs * tok);
        for (int64_t r = 0; r < R; r++) {
            int64_t s0, end;
            block_span(j, bs, lo[r], pos[r], &s0, &end);
            if (s0 >= end) continue;
            const float *w = scores + r * span;
            float *o = out + (b0 + r) * C + h * hs;
            const char *vs = v + (s0 - j * bs) * tok;
            if (hs % 64 == 0) {
                for (int64_t c = 0; c < hs; c += 64)
                    weigh_values64(w, sum[r], vs + c * (half ? 2 : 4), tok, s0, end, lo[r], half, o + c);
                continue;
            }
            for (int64_t s = s0; s < end; s++, vs += tok) {
                if (half)
                    axpy_half(w[s - lo[r]] / sum[r], (const uint16_t *)vs, o, hs);
                else
                    axpy(w[s - lo[r]] / sum[r], (const float *)vs, o, hs);
            }
        }
    }
}

/* Rows from m on that join row m's run: they share its block table and step one position, up to RUN_MAX. */
static int64_t run_length(int64_t m, int64_t M, const int64_t *pos, const int64_t *tables, int64_t max_blocks,
                          int64_t bs) {
    int64_t r = 1;
    while (m + r < M && r < RUN_MAX && pos[m + r] == pos[m + r - 1] + 1 &&
           !memcmp(tables + (m + r) * max_blocks, tables + m * max_blocks, sizeof(int64_t) * (pos[m + r] / bs + 1)))
        r++;
    return r;
}

/* Groups of rows that attend together (attend_run), as (first row, rows) pairs; returns how many.
 * Runs (run_length) are split into near-equal parts so that there are at least two (group, head)
 * items per thread. */
static int64_t group_rows(int64_t M, const int64_t *pos, const int64_t *tables, int64_t max_blocks, int64_t bs,
                          int64_t nh, int threads, int64_t *groups) {
    int64_t runs = 0, out = 0;
    for (int64_t m = 0; m < M; runs++) m += run_length(m, M, pos, tables, max_blocks, bs);
    const int64_t pieces = (2 * threads + runs * nh - 1) / (runs * nh);
    for (int64_t m = 0; m < M;) {
        const int64_t rows = run_length(m, M, pos, tables, max_blocks, bs), parts = pieces < rows ? pieces : rows;
        for (int64_t p = 0; p < parts; p++, out++)
            groups[2 * out] = m + rows * p / parts, groups[2 * out + 1] = rows * (p + 1) / parts - rows * p / parts;
        m += rows;
    }
    return out;
}

/* Row m: token idx[m] at position pos[m]; its key and value go to the paged cache through its block
 * table tables[m] (max_blocks entries), and it attends to its positions up to and including pos[m]
 * (the last `window` of them in banded layers). Caches (n_layer, num_blocks, n_head, block_size, hs),
 * float32 or (kv_half) float16. logits: (M, vocab). `exact`: every row's logits have the bits it gets
 * alone (a speculative step's verified positions are plain decoding's): bfloat16 layers then keep off
 * AMX, whose tiles round a row's sums otherwise than the vector tiles of a single row.
 * Returns 0, or 1 (a token id out of range), 2 (a position beyond the context), 3 (a block beyond the
 * pool or the block table), 4 (out of memory); nothing is written then. */
int gl_decode_step(const gl_model *md, int64_t M, const int64_t *idx, const int64_t *pos, const int64_t *tables,
                   int64_t max_blocks, void *kcache, void *vcache, int64_t num_blocks, int64_t block_size,
                   int kv_half, float *logits, int threads, int exact) {
    const int64_t C = md->n_embd, nh = md->n_head, hs = C / nh, F = md->d_ff;
    const int amx = !exact;
    if (block_size < 1) return 3;
    for (int64_t m = 0; m < M; m++) {
        if (idx[m] < 0 || idx[m] >= md->vocab) return 1;
        if (pos[m] < 0 || pos[m] >= md->n_ctx) return 2;
        if (pos[m] / block_size >= max_blocks) return 3;
        for (int64_t j = 0; j <= pos[m] / block_size; j++)
            if (tables[m * max_blocks + j] < 0 || tables[m * max_blocks + j] >= num_blocks) return 3;
    }
    if (threads < 1) threads = 1;
    int64_t wide = F > 3 * C ? F : 3 * C, span = md->n_ctx;
    float *x = malloc(sizeof(float) * (M * (3 * C + wide + 1) + threads * RUN_MAX * span));
    int16_t *xq = malloc(sizeof(int16_t) * M * (F > C ? F : C));
    float *xp = malloc(sizeof(float) * ((M + 8) * (F > C ? F : C) + 16)); /* see gl_linear_bf16 */
    int64_t products = 4 * md->n_layer + 1; /* each with its own counters */
    gl_counter *ctr = aligned_alloc(64, sizeof(gl_counter) * threads * products);
    int64_t *groups = malloc(sizeof(int64_t) * 2 * M);
    if (!x || !xq || !xp || !ctr || !groups) {
        free(x);
        free(xq);
        free(xp);
        free(ctr);
        free(groups);
        return 4;
    }
    const int64_t n_groups = group_rows(M, pos, tables, max_blocks, block_size, nh, threads, groups);
    memset(ctr, 0, sizeof(gl_counter) * threads * products);
    float *h = x + M * C, *big = h + M * C, *att = big + M * wide, *xs = att + M * C, *scores = xs + M;
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < C; c++) x[m * C + c] = md->wte[idx[m] * C + c] + md->wpe[pos[m] * C + c];
    const int64_t layer_bytes = num_blocks * nh * block_size * hs * (kv_half ? 2 : 4);

#pragma omp parallel num_threads(threads)
    {
        int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        /* Subnormal floats as zero (FTZ and DAZ) for the step, restored after: softmax weights of keys
         * far below a row's best score (e^-87 and less, common where a speculative step verifies tokens
         * the model finds absurd) reach the value sums as subnormals, and every multiply-add that meets
         * one takes a microcode assist of ~100 cycles. They contribute nothing a float32 sum keeps. */
        const unsigned int csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040);
        for (int64_t l = 0; l < md->n_layer; l++) {
            const gl_block *bl = md->blocks + l;
#pragma omp single
            layer_norm(x, h, M, C, bl->ln1_w, bl->ln1_b, md->eps);
            linear_all(&bl->qkv, h, xq, xs, xp, M, big, tid, nt, 0, amx, ctr + (4 * l) * threads);
#pragma omp for schedule(static)
            for (int64_t bh = 0; bh < M * nh; bh++)
                store_row(big, C, nh, hs, bh / nh, bh % nh, (char *)kcache + l * layer_bytes,
                          (char *)vcache + l * layer_bytes, kv_half, tables + (bh / nh) * max_blocks, block_size,
                          pos[bh / nh]);
#pragma omp for schedule(static)
            for (int64_t gh = 0; gh < n_groups * nh; gh++) {
                const int64_t b0 = groups[2 * (gh / nh)], R = groups[2 * (gh / nh) + 1];
                int64_t lo[RUN_MAX];
                for (int64_t r = 0; r < R; r++)
                    lo[r] = bl->local && pos[b0 + r] + 1 > md->window ? pos[b0 + r] + 1 - md->window : 0;
                attend_run(big, C, nh, hs, b0, R, gh % nh, (char *)kcache + l * layer_bytes,
                           (char *)vcache + l * layer_bytes, kv_half, tables + b0 * max_blocks, block_size, pos + b0,
                           lo, scores + tid * RUN_MAX * span, span, att);
            }
            linear_all(&bl->proj, att, xq, xs, xp, M, h, tid, nt, 0, amx, ctr + (4 * l + 1) * threads);
#pragma omp single
            {
                for (int64_t i = 0; i < M * C; i++) x[i] += h[i];
                layer_norm(x, h, M, C, bl->ln2_w, bl->ln2_b, md->eps);
            }
            linear_all(&bl->fc, h, xq, xs, xp, M, big, tid, nt, 1, amx, ctr + (4 * l + 2) * threads);
            linear_all(&bl->fc_proj, big, xq, xs, xp, M, att, tid, nt, 0, amx, ctr + (4 * l + 3) * threads);
#pragma omp single
            for (int64_t i = 0; i < M * C; i++) x[i] += att[i];
        }
#pragma omp single
        layer_norm(x, h, M, C, md->lnf_w, md->lnf_b, md->eps);
        linear_all(&md->head, h, xq, xs, xp, M, logits, tid, nt, 0, amx, ctr + 4 * md->n_layer * threads);
        _mm_setcsr(csr);
    }
    free(x);
    free(xq);
    free(xp);
    free(ctr);
    free(groups);
    return 0;
}

/* `steps` greedy decoding steps of M rows, one per sequence, each step feeding every row the argmax of
 * its previous logits: a draft model's proposals without a return to Python between tokens (there, a
 * small draft model's step costs less than the Python around it). Row m feeds idx[m] at pos[m] first,
 * then one position further each step; its table must reach the last one. out[m * steps + t]: the
 * row's argmax after step t (the first maximum, NaN counting as the maximum, as numpy's), or -1 where
 * the maximum is not finite (the row's logits cannot be sampled; later steps feed it token 0, and
 * what they give means nothing). logits: (M, vocab) workspace, the last step's on return.
 * Returns gl_decode_step's codes (steps before a failing one have written the cache). */
int gl_greedy_steps(const gl_model *md, int64_t M, const int64_t *idx, const int64_t *pos, const int64_t *tables,
                    int64_t max_blocks, void *kcache, void *vcache, int64_t num_blocks, int64_t block_size,
                    int kv_half, float *logits, int threads, int64_t steps, int64_t *out) {
    int64_t *cur = malloc(sizeof(int64_t) * 2 * M);
    if (!cur) return 4;
    int64_t *at = cur + M;
    memcpy(cur, idx, sizeof(int64_t) * M);
    memcpy(at, pos, sizeof(int64_t) * M);
    const int64_t V = md->vocab;
    for (int64_t t = 0; t < steps; t++) {
        int err = gl_decode_step(md, M, cur, at, tables, max_blocks, kcache, vcache, num_blocks, block_size, kv_half,
                                 logits, threads, 0);
        if (err) {
            free(cur);
            return err;
        }
        for (int64_t m = 0; m < M; m++) {
            const float *row = logits + m * V;
            int64_t best = 0;
            float top = row[0];
            if (!isnan(top))
                for (int64_t i = 1; i < V; i++) {
                    if (isnan(row[i])) {
                        best = i, top = row[i];
                        break;
                    }
                    if (row[i] > top) best = i, top = row[i];
                }
            out[m * steps + t] = isfinite(top) ? best : -1;
            cur[m] = isfinite(top) ? best : 0;
            at[m]++;
        }
    }
    free(cur);
    return 0;
}
