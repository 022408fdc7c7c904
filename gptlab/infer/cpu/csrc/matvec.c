/* Few-row linear layers for CPU decoding: y (M, N) = x (M, K) @ W (N, K)^T * scale + bias, M small.
 *
 * Decoding multiplies a handful of activation rows by every weight matrix, so the time is the time
 * to stream the weights from memory once. BLAS GEMMs are built for large M: at M = 1 they reach
 * ~2/3 of the machine's read bandwidth, and at M = 2..16 they copy ("pack") the weight before
 * using it, which reads it twice. These kernels read each weight row once, straight into FMAs (AVX2,
 * or AVX-512 where the compiler targets it) against every activation row, with the weights stored as
 * float32, bfloat16 (against bfloat16 activations) or int8 with a float scale per output row
 * (weight-only quantisation: activations stay nearly float32). Rows of W are shared among OpenMP threads
 * (the runtime torch itself loaded) in chunks claimed at run time (see claim).
 *
 * Built at first use by gptlab/cpu_kernels.py with the machine's own compiler and -march=native.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define MB_MAX 4 /* activation rows per register tile */
/* Software prefetch distance in bytes. A tile's weight rows are short streams (768 int8 weights are
 * 12 cache lines), too short for the hardware prefetcher to ramp up on, so each tile prefetches the
 * memory this far beyond what it is reading, at the rate it reads. */
#ifndef PF_DIST
#define PF_DIST 8192
#endif

static inline __attribute__((always_inline)) void prefetch_ahead(const char *p, int lines) {
    for (int i = 0; i < lines; i++) _mm_prefetch(p + PF_DIST + 64 * i, _MM_HINT_T0);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Float tiles use AVX2's 8-float vectors, or on AVX-512 machines 16-float ones. Float32 products of
 * 2+ activation rows are bound by multiply-adds rather than memory there: with AVX2's 8-float
 * vectors and 16 registers (4 activation rows per tile), 8 rows cost 2x one row's time (27M-parameter
 * model's shapes, Xeon); 16-float vectors in AVX-512's 32 registers take 8 activation rows against 3
 * weight rows at once and cost 1.3x. The same tiles serve one row, so a row's outputs have the same
 * bits whatever the number of rows beside it (a speculative step's K + 1 positions are the plain
 * step's). AVX-512 also serves the int8 products (16 int32 lanes, VNNI) and bfloat16 ones (BF16, AMX),
 * and its 32 registers take tiles of 4 weight rows at any batch size. `-mno-avx512f` builds the AVX2
 * code on an AVX-512 machine (GPTLAB_KERNEL_ISA=avx2), so both are tested wherever AVX-512 is. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define GL_AVX512 1
#else
#define GL_AVX512 0
#endif
#define VW 8 /* floats per vector */

/* Float32 vectors: FW floats; tiles of up to MBF_MAX activation rows against up to RF weight rows. */
#if GL_AVX512
#define FW 16
#define MBF_MAX 8
#define RF 3 /* 8 x 3 accumulators and 3 weights: 27 of 32 registers */
typedef __m512 vfloat;
static inline vfloat fzero(void) { return _mm512_setzero_ps(); }
static inline vfloat fload(const float *p) { return _mm512_loadu_ps(p); }
static inline vfloat ffma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
static inline float fsum(vfloat v) { return _mm512_reduce_add_ps(v); }
#else
#define FW 8
#define MBF_MAX MB_MAX
#define RF 4 /* at 1 activation row (range_f32) */
typedef __m256 vfloat;
static inline vfloat fzero(void) { return _mm256_setzero_ps(); }
static inline vfloat fload(const float *p) { return _mm256_loadu_ps(p); }
static inline vfloat ffma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
static inline float fsum(vfloat v) { return hsum(v); }
#endif

/* One tile: MB activation rows (m0..) against R float32 weight rows (n0..). MB and R are compile-time
 * constants at every call site, so the accumulators live in registers (MB * R <= 8 of AVX2's 16,
 * <= 24 of AVX-512's 32). */
static inline __attribute__((always_inline)) void tile_f32(const void *xv, const float *xs, int64_t K,
                                                           const char *W, int64_t n0, int64_t N,
                                                           const float *scale, const float *bias, float *y,
                                                           int64_t m0, int MB, int R) {
    const float *x = (const float *)xv; /* float activations: no per-row scale */
    (void)xs;
    vfloat acc[MBF_MAX][RF];
    const float *rows[RF];
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
        rows[r] = (const float *)W + (n0 + r) * K;
        _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) acc[m][r] = fzero();
    }
    int64_t k = 0;
    for (; k + FW <= K; k += FW) {
        vfloat w[RF];
        prefetch_ahead((const char *)rows[0] + R * 4 * k, (R * 4 * FW + 63) / 64);
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) w[r] = fload(rows[r] + k);
        _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) {
            vfloat xv = fload(x + (m0 + m) * K + k);
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[m][r] = ffma(xv, w[r], acc[m][r]);
        }
    }
    _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) {
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
            float s = fsum(acc[m][r]);
            for (int64_t j = k; j < K; j++) s += x[(m0 + m) * K + j] * rows[r][j];
            int64_t n = n0 + r;
            if (scale) s *= scale[n];
            if (bias) s += bias[n];
            y[(m0 + m) * N + n] = s;
        }
    }
}

/* One bfloat16 weight as float32, for the tiles' K tails. */
static inline float load1_bf16(const void *w, int64_t k) {
    union { uint32_t u; float f; } c = {.u = (uint32_t)((const uint16_t *)w)[k] << 16};
    return c.f;
}

/* bfloat16 weights multiply bfloat16 activations (rounded to nearest even, as torch's bfloat16
 * matmuls take them; products are exact in float32, sums float32). With AVX-512 BF16, vdpbf16ps
 * multiplies-and-adds pairs of them directly: half the instructions of float FMAs. Elsewhere, a
 * bfloat16 is the top half of a float32, so 2 VW of them read as VW 32-bit lanes hold the even-indexed
 * weights in the lanes' low halves (a 16-bit shift makes them floats) and the odd-indexed ones in the
 * high halves (a mask does): two instructions per 2 VW weights, where widening each half took four
 * (AVX2 batch-8 steps 7% faster); the activations come de-interleaved to match, per block of 2 VW the
 * even-indexed values, then the odd. prepare_bf16 writes the activations in the form the tile reads. */
static inline float round_bf16(float v) {
    union { float f; uint32_t u; } c = {.f = v};
    if ((c.u & 0x7FFFFFFFu) > 0x7F800000u) c.u |= 0x00400000u; /* NaN: stays a (quiet) NaN */
    else c.u += 0x7FFFu + ((c.u >> 16) & 1u);
    c.u &= 0xFFFF0000u;
    return c.f;
}

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#define GL_AMX 1 /* see amx_rows */
#define AMX_MIN_ROWS 2
static int amx_ready(void);
static void amx_pack(const uint16_t *xb, int64_t M, int64_t K);
#else
#define GL_AMX 0
#endif

#ifdef __AVX512BF16__
/* xp: each row of x as bfloat16, in order (then, with `amx` on AMX, the same in pairs: amx_pack). */
static void prepare_bf16(const float *x, int64_t M, int64_t K, void *xp, int amx) {
    uint16_t *xb = xp;
    for (int64_t m = 0; m < M; m++) {
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
            __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + m * K + k + 16), _mm512_loadu_ps(x + m * K + k));
            _mm512_storeu_si512(xb + m * K + k, (__m512i)v);
        }
        for (; k < K; k++) {
            union { float f; uint32_t u; } c = {.f = round_bf16(x[m * K + k])};
            xb[m * K + k] = (uint16_t)(c.u >> 16);
        }
    }
#if GL_AMX
    if (amx && M >= AMX_MIN_ROWS && amx_ready()) amx_pack(xb, M, K); /* what amx_rows reads */
#else
    (void)amx;
#endif
}

static inline __attribute__((always_inline)) void tile_bf16(const void *xv, const float *xs, int64_t K,
                                                            const char *W, int64_t n0, int64_t N,
                                                            const float *scale, const float *bias, float *y,
                                                            int64_t m0, int MB, int R) {
    const uint16_t *x = (const uint16_t *)xv;
    (void)xs, (void)scale;
    __m512 acc[MB_MAX][4];
    const uint16_t *rows[4];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
        rows[r] = (const uint16_t *)W + (n0 + r) * K;
        _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++) acc[m][r] = _mm512_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh w[4];
        prefetch_ahead((const char *)rows[0] + R * 2 * k, (R * 64 + 63) / 64);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) w[r] = (__m512bh)_mm512_loadu_si512(rows[r] + k);
        _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (m0 + m) * K + k);
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, w[r]);
        }
    }
    _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++) {
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            float s = _mm512_reduce_add_ps(acc[m][r]);
            for (int64_t j = k; j < K; j++) s += load1_bf16(x + (m0 + m) * K, j) * load1_bf16(rows[r], j);
            int64_t n = n0 + r;
            if (bias) s += bias[n];
            y[(m0 + m) * N + n] = s;
        }
    }
}
#else
/* The even- and odd-indexed weights of 16 bfloat16 read as 8 32-bit lanes, as floats. */
static inline __m256 even_bf16(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
static inline __m256 odd_bf16(__m256i v) {
    return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
}
/* The even-indexed, then the odd-indexed values of x[0 .. 16). */
static inline void deinterleave(const float *x, float *even, float *odd) {
    __m256 a = _mm256_loadu_ps(x), b = _mm256_loadu_ps(x + 8);
    /* shuffle_ps pairs within 128-bit lanes: a0 a2 b0 b2 | a4 a6 b4 b6; then the 64-bit order 0 2 1 3 */
    _mm256_storeu_ps(even, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8)));
    _mm256_storeu_ps(odd, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8)));
}

/* xp: each row of x rounded to bfloat16 (as floats) and de-interleaved. */
static void prepare_bf16(const float *x, int64_t M, int64_t K, void *xp, int amx) {
    float *xf = xp;
    (void)amx;
    for (int64_t m = 0; m < M; m++) {
        int64_t k = 0;
        for (; k + 2 * VW <= K; k += 2 * VW) {
            float r[2 * VW];
            for (int i = 0; i < 2 * VW; i++) r[i] = round_bf16(x[m * K + k + i]);
            deinterleave(r, xf + m * K + k, xf + m * K + k + VW);
        }
        for (; k < K; k++) xf[m * K + k] = round_bf16(x[m * K + k]); /* the tail stays in order */
    }
}

static inline __attribute__((always_inline)) void tile_bf16(const void *xv, const float *xs, int64_t K,
                                                            const char *W, int64_t n0, int64_t N,
                                                            const float *scale, const float *bias, float *y,
                                                            int64_t m0, int MB, int R) {
    const float *x = (const float *)xv; /* rounded and de-interleaved */
    (void)xs, (void)scale;
    __m256 acc[MB_MAX][4];
    const uint16_t *rows[4];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
        rows[r] = (const uint16_t *)W + (n0 + r) * K;
        _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++) acc[m][r] = _mm256_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 2 * VW <= K; k += 2 * VW) {
        __m256 lo[4], hi[4];
        prefetch_ahead((const char *)rows[0] + R * 2 * k, (R * 4 * VW + 63) / 64);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            __m256i b = _mm256_loadu_si256((const __m256i *)(rows[r] + k));
            lo[r] = even_bf16(b);
            hi[r] = odd_bf16(b);
        }
        _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++) {
            __m256 xe = _mm256_loadu_ps(x + (m0 + m) * K + k), xo = _mm256_loadu_ps(x + (m0 + m) * K + k + VW);
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) acc[m][r] =
                _mm256_fmadd_ps(xo, hi[r], _mm256_fmadd_ps(xe, lo[r], acc[m][r]));
        }
    }
    _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++) {
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            float s = hsum(acc[m][r]);
            for (int64_t j = k; j < K; j++) s += x[(m0 + m) * K + j] * load1_bf16(rows[r], j);
            int64_t n = n0 + r;
            if (bias) s += bias[n];
            y[(m0 + m) * N + n] = s;
        }
    }
}
#endif

/* Every activation row against weight rows [n0, n1): R rows at a time, so each weight row is read
 * from memory once and then reused, from L1, by the next groups of MB_MAX activation rows. Tiles of
 * 4 weight rows take AVX2's 16 registers at one activation row only; WIDE: at any (AVX-512's 32). */
#define TILES_OF_ROWS(T, n, R)                                                                          \
    do {                                                                                                \
        int64_t m = 0;                                                                                  \
        for (; m + MB_MAX <= M; m += MB_MAX) tile_##T(x, xs, K, W, n, N, scale, bias, y, m, MB_MAX, R); \
        switch (M - m) {                                                                                \
        case 3: tile_##T(x, xs, K, W, n, N, scale, bias, y, m, 3, R); break;                            \
        case 2: tile_##T(x, xs, K, W, n, N, scale, bias, y, m, 2, R); break;                            \
        case 1: tile_##T(x, xs, K, W, n, N, scale, bias, y, m, 1, R); break;                            \
        }                                                                                               \
    } while (0)

#define DEFINE_RANGE(T, WIDE)                                                                           \
    static void range_##T(const void *x, const float *xs, int64_t M, int64_t K, const char *W,          \
                          int64_t n0, int64_t n1, int64_t N, const float *scale, const float *bias,     \
                          float *y) {                                                                   \
        int64_t n = n0;                                                                                 \
        for (; n + 4 <= n1 && ((WIDE) || M == 1); n += 4) TILES_OF_ROWS(T, n, 4);                      \
        for (; n + 2 <= n1; n += 2) TILES_OF_ROWS(T, n, 2);                                             \
        for (; n < n1; n++) TILES_OF_ROWS(T, n, 1);                                                     \
    }

#if GL_AVX512
/* Every activation row against weight rows [n0, n1), RF at a time, in groups of 8 activation rows. */
static void range_f32(const void *x, const float *xs, int64_t M, int64_t K, const char *W, int64_t n0,
                      int64_t n1, int64_t N, const float *scale, const float *bias, float *y) {
#define F32_TILES(R)                                                                                    \
    do {                                                                                                \
        int64_t m = 0;                                                                                  \
        for (; m + MBF_MAX <= M; m += MBF_MAX) tile_f32(x, xs, K, W, n, N, scale, bias, y, m, MBF_MAX, R); \
        switch (M - m) {                                                                                \
        case 7: tile_f32(x, xs, K, W, n, N, scale, bias, y, m, 7, R); break;                            \
        case 6: tile_f32(x, xs, K, W, n, N, scale, bias, y, m, 6, R); break;                            \
        case 5: tile_f32(x, xs, K, W, n, N, scale, bias, y, m, 5, R); break;                            \
        case 4: tile_f32(x, xs, K, W, n, N, scale, bias, y, m, 4, R); break;                            \
        case 3: tile_f32(x, xs, K, W, n, N, scale, bias, y, m, 3, R); break;                            \
        case 2: tile_f32(x, xs, K, W, n, N, scale, bias, y, m, 2, R); break;                            \
        case 1: tile_f32(x, xs, K, W, n, N, scale, bias, y, m, 1, R); break;                            \
        }                                                                                               \
    } while (0)
    int64_t n = n0;
    for (; n + RF <= n1; n += RF) F32_TILES(RF);
    for (; n + 2 <= n1; n += 2) F32_TILES(2);
    for (; n < n1; n++) F32_TILES(1);
#undef F32_TILES
}
#else
DEFINE_RANGE(f32, 0) /* AVX2's 16 registers: 4-weight-row tiles at 1 activation row only */
#endif
DEFINE_RANGE(bf16, GL_AVX512)

/* AMX (Sapphire Rapids and later): one tdpbf16ps multiplies a 16 x 32 block of bfloat16 weights by
 * 32 x 16 activations, 8192 products, where vdpbf16ps does 32; one thread reaches ~200 GMAC/s against
 * ~50 (Xeon, in cache). Reading W sixteen rows at a time streams less well than the vector tiles do
 * (24-26 GB/s against 35 on a 230 MB matrix), so one activation row stays on those; with 2+, blocks of 16 weight rows run on AMX tiles: C (16 weight rows x 16
 * activation rows, float32) += A (16 weight rows x 32 k, loaded straight from W) . B (the activations,
 * 16 pairs of k x 16 rows, as prepare_bf16 lays them out after the bfloat16 rows; rows beyond M are
 * zero). Linux hands AMX state to a process that asks (arch_prctl); where it refuses, or the CPU or
 * compiler lacks AMX, the vector tiles do all the rows. */
#if GL_AMX
/* The next block of 16 rows is prefetched into L2 while this one runs (into L1, or 2 or 4 blocks
 * ahead, measured slower: batch-8 bfloat16 steps 14.9 ms into L1, 12.9 into L2). */
#ifndef AMX_PF_BLOCKS
#define AMX_PF_BLOCKS 1
#endif
#ifndef AMX_PF_HINT
#define AMX_PF_HINT _MM_HINT_T1
#endif
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) amx_config;

static int amx_ready(void) {
    static int state; /* 0: not asked yet, 1: granted, -1: refused */
    int s = __atomic_load_n(&state, __ATOMIC_RELAXED);
    if (s == 0) {
        s = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
        __atomic_store_n(&state, s, __ATOMIC_RELAXED);
    }
    return s > 0;
}

/* Where the pairs start in the workspace: after the (M, K) bfloat16 rows, 64-byte aligned. */
static inline uint32_t *amx_pairs(const uint16_t *xb, int64_t M, int64_t K) {
    return (uint32_t *)(xb + ((M * K + 31) & ~(int64_t)31));
}

/* Per group of 16 activation rows and block of 32 k: 16 (pair of k) x 16 (row) pairs of bfloat16. */
static void amx_pack(const uint16_t *xb, int64_t M, int64_t K) {
    uint32_t *xt = amx_pairs(xb, M, K);
    int64_t blocks = K / 32;
    for (int64_t g = 0; g * 16 < M; g++) {
        uint32_t *out = xt + g * blocks * 256;
        memset(out, 0, sizeof(uint32_t) * blocks * 256);
        for (int64_t m = g * 16; m < M && m < g * 16 + 16; m++)
            for (int64_t k = 0; k < blocks * 32; k += 2)
                out[(k / 32) * 256 + (k % 32) / 2 * 16 + (m - g * 16)] =
                    xb[m * K + k] | (uint32_t)xb[m * K + k + 1] << 16;
    }
}

/* Rows [n0, n0 + 16 * whole blocks) of y; returns the first row left for the vector tiles. */
static int64_t amx_rows(const uint16_t *xb, int64_t M, int64_t K, const uint16_t *W, int64_t n0, int64_t n1,
                        int64_t N, const float *bias, float *y) {
    const uint32_t *xt = amx_pairs(xb, M, K);
    int64_t blocks = K / 32, n = n0;
    amx_config cfg = {.palette = 1};
    for (int t = 0; t < 3; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg); /* every call: torch's own AMX code may have set another on this thread */
    float c[16][16];
    for (; n + 16 <= n1; n += 16) {
        const uint16_t *a = W + n * K;
        for (int64_t g = 0; g * 16 < M; g++) {
            _tile_zero(0);
            for (int64_t b = 0; b < blocks; b++) {
                if (g == 0) /* the next block of rows, one line per row and k-block: all of it by the end */
                    for (int i = 0; i < 16; i++) _mm_prefetch((const char *)(a + AMX_PF_BLOCKS * 16 * K) + b * 1024 + i * 64, AMX_PF_HINT);
                _tile_loadd(1, a + b * 32, K * 2);
                _tile_loadd(2, xt + (g * blocks + b) * 256, 64);
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, c, 64);
            for (int64_t m = g * 16; m < M && m < g * 16 + 16; m++)
                for (int i = 0; i < 16; i++) {
                    float s = c[i][m - g * 16];
                    for (int64_t j = blocks * 32; j < K; j++) s += load1_bf16(xb + m * K, j) * load1_bf16(a + i * K, j);
                    y[m * N + n + i] = bias ? s + bias[n + i] : s;
                }
        }
    }
    _tile_release();
    return n;
}

#endif

/* bfloat16 weight rows [n0, n1): with `amx` (and prepare_bf16's pairs), whole blocks of 16 on AMX
 * tiles, whose sums round otherwise than the vector tiles one row takes; the rest on those. */
static void range_bf16a(const void *x, const float *xs, int64_t M, int64_t K, const char *W, int64_t n0,
                        int64_t n1, int64_t N, const float *scale, const float *bias, float *y, int amx) {
#if GL_AMX
    if (amx && M >= AMX_MIN_ROWS && amx_ready()) n0 = amx_rows(x, M, K, (const uint16_t *)W, n0, n1, N, bias, y);
#else
    (void)amx;
#endif
    range_bf16(x, xs, M, K, W, n0, n1, N, scale, bias, y);
}

static void range_bf16x(const void *x, const float *xs, int64_t M, int64_t K, const char *W, int64_t n0,
                        int64_t n1, int64_t N, const float *scale, const float *bias, float *y) {
    range_bf16a(x, xs, M, K, W, n0, n1, N, scale, bias, y, 1);
}

/* Rows [n0, n1) of N for thread t of nt: contiguous ranges of whole chunks (every thread streams its
 * own part of W), so chunks start at multiples of `chunk` for any thread count, and so do the tiles and
 * AMX blocks in them: each output is computed alike whatever the threads. */
static inline void split_rows(int64_t N, int t, int nt, int64_t chunk, int64_t *n0, int64_t *n1) {
    int64_t per = ((N + nt - 1) / nt + chunk - 1) / chunk * chunk;
    *n0 = t * per < N ? t * per : N;
    *n1 = *n0 + per < N ? *n0 + per : N;
}

/* Work sharing within one product. Equal halves of the rows do not take equal times: one thread
 * stalls on memory longer, or starts later, and the other then waits at the barrier while only one
 * core streams (measured here: one of two threads idle 11-19 us at every product of a GPT-2 block and
 * ~290 us at the output projection, a sixth of an int8 token). So each thread takes its range in
 * chunks, claimed through a counter, and when its own range is done it claims the remaining chunks of
 * the others' ranges, front to back. A thread's own chunks come in order, one stream as before. */
#ifndef CHUNK_BYTES
#define CHUNK_BYTES 16384
#endif
typedef struct {
    int64_t next;
    char pad[56];
} __attribute__((aligned(64))) gl_counter; /* one cache line: counters are not shared by accident */

/* Rows per chunk: at least CHUNK_BYTES of weights, whole 4-row tiles (bfloat16 with AMX: 16-row ones). */
static inline int64_t chunk_rows(int64_t K, int64_t elem) {
    int64_t rows = (CHUNK_BYTES + K * elem - 1) / (K * elem), unit = GL_AMX && elem == 2 ? 16 : 4;
    return (rows + unit - 1) / unit * unit;
}

/* The next chunk [*c0, *c1) of rows for thread t: from its own range first, then from the others'
 * (*owner counts the ranges it has finished). 0 when no rows are left. */
static inline int claim(gl_counter *ctr, int64_t N, int64_t chunk, int t, int nt, int *owner, int64_t *c0,
                        int64_t *c1) {
    for (; *owner < nt; (*owner)++) {
        int o = (t + *owner) % nt;
        int64_t n0, n1;
        split_rows(N, o, nt, chunk, &n0, &n1);
        int64_t start = n0 + chunk * __atomic_fetch_add(&ctr[o].next, 1, __ATOMIC_RELAXED);
        if (start < n1) {
            *c0 = start;
            *c1 = start + chunk < n1 ? start + chunk : n1;
            return 1;
        }
    }
    return 0;
}

/* The body of every entry point, whose arguments it reads. */
#define PARALLEL_OVER_ROWS(T, ELEM, X, XS)                                                              \
    do {                                                                                                \
        if (threads < 1) threads = 1;                                                                   \
        if (threads > 256) threads = 256;                                                               \
        gl_counter ctr[threads];                                                                        \
        memset(ctr, 0, sizeof(gl_counter) * threads);                                                   \
        int64_t chunk = chunk_rows(K, ELEM);                                                            \
        _Pragma("omp parallel num_threads(threads)") {                                                  \
            int t = omp_get_thread_num(), nt = omp_get_num_threads(), owner = 0;                        \
            int64_t c0, c1;                                                                             \
            while (claim(ctr, N, chunk, t, nt, &owner, &c0, &c1))                                       \
                range_##T(X, XS, M, K, (const char *)W, c0, c1, N, scale, bias, y);                     \
        }                                                                                               \
    } while (0)

#define DEFINE_ENTRY(T, ELEM)                                                                           \
    void gl_linear_##T(const float *x, int64_t M, int64_t K, const void *W, int64_t N,                  \
                       const float *scale, const float *bias, float *y, int threads) {                  \
        PARALLEL_OVER_ROWS(T, ELEM, x, NULL);                                                           \
    }

DEFINE_ENTRY(f32, 4)

/* xp: caller-provided workspace of (M + 8) * K + 16 floats for the activations in the tiles' form
 * (prepare_bf16). */
void gl_linear_bf16(const float *x, int64_t M, int64_t K, const void *W, int64_t N, const float *scale,
                    const float *bias, float *y, float *xp, int threads) {
    prepare_bf16(x, M, K, xp, 1);
    PARALLEL_OVER_ROWS(bf16x, 2, xp, NULL);
}

/* int8 weights: integer dot products. Each activation row is first rounded to int16 with its own
 * scale (13 bits of magnitude: a relative error of ~1e-4, far below the int8 weights' ~4e-3, so this
 * stays weight-only quantisation in effect). Then QW weights at a time: sign-extend to int16 and
 * multiply-add pairs into int32 (vpmaddwd, or AVX-512 VNNI's vpdpwssd, which also adds), a third of
 * the instructions per weight of converting int8 to float. |x| <= 8191 and |w| <= 127 keep a pair
 * below 2^21; every QCHUNK weights the int32 lanes (each < 2^27) are summed exactly (< 2^30) and
 * moved into float, so nothing overflows for any K and the result does not depend on the width. */
#define XQ_MAX 8191.0f
#define QCHUNK 1024

#if GL_AVX512
#define QW 32
typedef __m512i vint;
static inline vint qzero(void) { return _mm512_setzero_si512(); }
static inline vint qload_w(const int8_t *p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p)); }
static inline vint qload_x(const int16_t *p) { return _mm512_loadu_si512(p); }
static inline int32_t qhsum(vint v) { return _mm512_reduce_add_epi32(v); }
#ifdef __AVX512VNNI__
static inline vint qdot(vint acc, vint x, vint w) { return _mm512_dpwssd_epi32(acc, x, w); }
#else
static inline vint qdot(vint acc, vint x, vint w) { return _mm512_add_epi32(acc, _mm512_madd_epi16(x, w)); }
#endif
#else
#define QW 16
typedef __m256i vint;
static inline vint qzero(void) { return _mm256_setzero_si256(); }
static inline vint qload_w(const int8_t *p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)); }
static inline vint qload_x(const int16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline int32_t qhsum(vint v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}
static inline vint qdot(vint acc, vint x, vint w) { return _mm256_add_epi32(acc, _mm256_madd_epi16(x, w)); }
#endif

static inline __attribute__((always_inline)) void tile_q8(const void *xv, const float *xs, int64_t K,
                                                          const char *W, int64_t n0, int64_t N,
                                                          const float *scale, const float *bias, float *y,
                                                          int64_t m0, int MB, int R) {
    const int16_t *xq = (const int16_t *)xv; /* activations as int16, row m scaled by xs[m] */
    float acc[MB_MAX][4];
    const int8_t *rows[4];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
        rows[r] = (const int8_t *)W + (n0 + r) * K;
        _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++) acc[m][r] = 0.0f;
    }
    int64_t k = 0;
    while (k + QW <= K) {
        int64_t stop = k + QCHUNK < K ? k + QCHUNK : K;
        vint isum[MB_MAX][4];
        _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++)
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) isum[m][r] = qzero();
        for (; k + QW <= stop; k += QW) {
            vint w[4];
            prefetch_ahead((const char *)rows[0] + R * k, (R * QW + 63) / 64);
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) w[r] = qload_w(rows[r] + k);
            _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++) {
                vint xv = qload_x(xq + (m0 + m) * K + k);
                _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) isum[m][r] = qdot(isum[m][r], xv, w[r]);
            }
        }
        _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++)
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) acc[m][r] += (float)qhsum(isum[m][r]);
    }
    _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++) {
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            float s = acc[m][r];
            for (int64_t j = k; j < K; j++) s += (float)xq[(m0 + m) * K + j] * (float)rows[r][j];
            int64_t n = n0 + r;
            s *= xs[m0 + m] * scale[n];
            if (bias) s += bias[n];
            y[(m0 + m) * N + n] = s;
        }
    }
}

DEFINE_RANGE(q8, GL_AVX512)

/* Each row of x (M, K) as int16 in xq, scaled by xs[m] (|xq| <= XQ_MAX). */
static void quantize_rows(const float *x, int64_t M, int64_t K, int16_t *xq, float *xs) {
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        __m256 amax8 = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + k)));
        __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
        a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
        a4 = _mm_max_ss(a4, _mm_movehdup_ps(a4));
        float amax = _mm_cvtss_f32(a4);
        for (; k < K; k++) amax = fabsf(xr[k]) > amax ? fabsf(xr[k]) : amax;
        float s = amax > 0 ? amax / XQ_MAX : 1.0f;
        xs[m] = s;
        __m256 inv = _mm256_set1_ps(1.0f / s);
        for (k = 0; k + 16 <= K; k += 16) { /* round to nearest even, as lrintf; |v| <= 8191 packs exactly */
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k), inv));
            __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8), inv));
            __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
            _mm256_storeu_si256((__m256i *)(xq + m * K + k), p);
        }
        for (; k < K; k++) xq[m * K + k] = (int16_t)__builtin_lrintf(xr[k] * (1.0f / s));
    }
}

/* xq: caller-provided (M, K) int16 workspace. */
void gl_linear_i8(const float *x, int64_t M, int64_t K, const void *W, int64_t N, const float *scale,
                  const float *bias, float *y, int16_t *xq, int threads) {
    float xs[MB_MAX * 64];
    if (M > MB_MAX * 64) return; /* the Python side never sends more than a few rows */
    quantize_rows(x, M, K, xq, xs);
    PARALLEL_OVER_ROWS(q8, 1, xq, xs);
}

/* Whether the kernels were built for AVX-512 (checked by tests). */
int gl_avx512(void) { return GL_AVX512; }

/* The sum of n floats, read by `threads` threads in contiguous parts: how fast this machine streams
 * memory into cores (benchmarks/decode.py bounds batch-1 decoding by it). */
double gl_read_sum(const float *p, int64_t n, int threads) {
    double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t per = (n / nt + 15) / 16 * 16, i0 = t * per < n ? t * per : n, i1 = i0 + per < n ? i0 + per : n;
        __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps(), c = _mm256_setzero_ps(), d = _mm256_setzero_ps();
        int64_t i = i0;
        for (; i + 32 <= i1; i += 32) {
            prefetch_ahead((const char *)(p + i), 2); /* as the kernels read */
            a = _mm256_add_ps(a, _mm256_loadu_ps(p + i));
            b = _mm256_add_ps(b, _mm256_loadu_ps(p + i + 8));
            c = _mm256_add_ps(c, _mm256_loadu_ps(p + i + 16));
            d = _mm256_add_ps(d, _mm256_loadu_ps(p + i + 24));
        }
        double s = hsum(_mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
        for (; i < i1; i++) s += p[i];
        total += s;
    }
    return total;
}

/* Whether bfloat16 products of 2+ rows run on AMX tiles here (built for AMX, and Linux granted it). */
int gl_amx(void) {
#if GL_AMX
    return amx_ready();
#else
    return 0;
#endif
}

/* Lets the loader check the ABI it compiled against. */
int gl_abi_version(void) { return 8; }
