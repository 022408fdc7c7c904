/* Few-row linear layers for CPU decoding: y (M, N) = x (M, K) @ W (N, K)^T * scale + bias, M small.
 *
 * Decoding multiplies a handful of activation rows by every weight matrix, so the time is the time
 * to stream the weights from memory once. BLAS GEMMs are built for large M: at M = 1 they reach
 * ~2/3 of the machine's read bandwidth, and at M = 2..16 they copy ("pack") the weight before
 * using it, which reads it twice. These kernels read each weight row once, straight into AVX2 FMAs
 * against every activation row, with the weights stored as float32, bfloat16 (converted by a
 * 16-bit shift) or int8 with a float scale per output row (weight-only quantisation: activations
 * stay float32). Rows of W are split across OpenMP threads (the runtime torch itself loaded).
 *
 * Built at first use by gptlab/cpu_kernels.py with the machine's own compiler and -march=native.
 */
#include <immintrin.h>
#include <stdint.h>

#define MB_MAX 4 /* activation rows per register tile */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 consecutive weights as float32, and the scalar version for the K % 8 tail. */
static inline __m256 load8_f32(const void *w, int64_t k) { return _mm256_loadu_ps((const float *)w + k); }
static inline __m256 load8_bf16(const void *w, int64_t k) {
    __m128i v = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
static inline __m256 load8_i8(const void *w, int64_t k) {
    __m128i v = _mm_loadl_epi64((const __m128i *)((const int8_t *)w + k));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}
static inline float load1_f32(const void *w, int64_t k) { return ((const float *)w)[k]; }
static inline float load1_bf16(const void *w, int64_t k) {
    union { uint32_t u; float f; } c = {.u = (uint32_t)((const uint16_t *)w)[k] << 16};
    return c.f;
}
static inline float load1_i8(const void *w, int64_t k) { return (float)((const int8_t *)w)[k]; }

/* One tile: MB activation rows (m0..) against R weight rows (n0..). MB and R are compile-time
 * constants at every call site, so the accumulators live in registers (MB * R <= 8 of the 16). */
#define DEFINE_TILE(T, ELEM)                                                                            \
    static inline void tile_##T(const float *x, int64_t K, const char *W, int64_t n0, int64_t N,        \
                                const float *scale, const float *bias, float *y, int64_t m0, int MB,    \
                                int R) {                                                                \
        __m256 acc[MB_MAX][4];                                                                          \
        const char *rows[4];                                                                            \
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                                           \
            rows[r] = W + (n0 + r) * K * (int64_t)(ELEM);                                               \
            _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++) acc[m][r] = _mm256_setzero_ps();       \
        }                                                                                               \
        int64_t k = 0;                                                                                  \
        for (; k + 8 <= K; k += 8) {                                                                    \
            __m256 w[4];                                                                                \
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) w[r] = load8_##T(rows[r], k);           \
            _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++) {                                      \
                __m256 xv = _mm256_loadu_ps(x + (m0 + m) * K + k);                                      \
                _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) acc[m][r] =                         \
                    _mm256_fmadd_ps(xv, w[r], acc[m][r]);                                               \
            }                                                                                           \
        }                                                                                               \
        _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++) {                                          \
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                                       \
                float s = hsum(acc[m][r]);                                                              \
                for (int64_t j = k; j < K; j++) s += x[(m0 + m) * K + j] * load1_##T(rows[r], j);       \
                int64_t n = n0 + r;                                                                     \
                if (scale) s *= scale[n];                                                               \
                if (bias) s += bias[n];                                                                 \
                y[(m0 + m) * N + n] = s;                                                                \
            }                                                                                           \
        }                                                                                               \
    }

DEFINE_TILE(f32, 4)
DEFINE_TILE(bf16, 2)
DEFINE_TILE(i8, 1)

/* Every activation row against weight rows [n0, n1): R rows at a time, so each weight row is read
 * from memory once and then reused, from L1, by the next groups of MB_MAX activation rows. */
#define DEFINE_RANGE(T)                                                                                 \
    static void range_##T(const float *x, int64_t M, int64_t K, const char *W, int64_t n0, int64_t n1,  \
                          int64_t N, const float *scale, const float *bias, float *y) {                 \
        int64_t n = n0;                                                                                 \
        for (; n + 4 <= n1 && M == 1; n += 4) tile_##T(x, K, W, n, N, scale, bias, y, 0, 1, 4);         \
        for (; n + 2 <= n1; n += 2) {                                                                   \
            int64_t m = 0;                                                                              \
            for (; m + 4 <= M; m += 4) tile_##T(x, K, W, n, N, scale, bias, y, m, 4, 2);                \
            switch (M - m) {                                                                            \
            case 3: tile_##T(x, K, W, n, N, scale, bias, y, m, 3, 2); break;                            \
            case 2: tile_##T(x, K, W, n, N, scale, bias, y, m, 2, 2); break;                            \
            case 1: tile_##T(x, K, W, n, N, scale, bias, y, m, 1, 2); break;                            \
            }                                                                                           \
        }                                                                                               \
        for (; n < n1; n++) {                                                                           \
            int64_t m = 0;                                                                              \
            for (; m + 4 <= M; m += 4) tile_##T(x, K, W, n, N, scale, bias, y, m, 4, 1);                \
            for (; m < M; m++) tile_##T(x, K, W, n, N, scale, bias, y, m, 1, 1);                        \
        }                                                                                               \
    }

DEFINE_RANGE(f32)
DEFINE_RANGE(bf16)
DEFINE_RANGE(i8)

/* Split N into `threads` contiguous, 4-aligned ranges (whole tiles, and every thread streams its
 * own part of W). */
#define DEFINE_ENTRY(T)                                                                                 \
    void gl_linear_##T(const float *x, int64_t M, int64_t K, const void *W, int64_t N,                  \
                       const float *scale, const float *bias, float *y, int threads) {                  \
        if (threads < 1) threads = 1;                                                                   \
        int64_t chunk = ((N + threads - 1) / threads + 3) / 4 * 4;                                      \
        _Pragma("omp parallel for num_threads(threads) schedule(static, 1)")                           \
        for (int t = 0; t < threads; t++) {                                                             \
            int64_t n0 = t * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;                               \
            if (n0 < n1) range_##T(x, M, K, (const char *)W, n0, n1, N, scale, bias, y);                \
        }                                                                                               \
    }

DEFINE_ENTRY(f32)
DEFINE_ENTRY(bf16)
DEFINE_ENTRY(i8)

/* Lets the loader check the ABI it compiled against. */
int gl_abi_version(void) { return 1; }
