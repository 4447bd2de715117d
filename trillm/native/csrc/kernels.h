/* Vector primitives and the interfaces shared by the kernel files.
 *
 * The kernels are written once against the few operations below. trillm/native/build.py compiles all of
 * csrc/ once per instruction-set level, and the flags of the level decide what these primitives are:
 * AVX-512 (16 floats a vector), AVX2 with FMA and F16C (8), or plain C (1). Decoders follow the block
 * layouts of llama.cpp's ggml-quants.c.
 */
#ifndef TRILLM_KERNELS_H
#define TRILLM_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* What the entry points return; trillm/native/build.py: ERRORS says each in words. */
enum { OK = 0, ERROR_TYPE = -1, ERROR_INDEX = -2, ERROR_SHAPE = -3, ERROR_MEMORY = -4 };

/* Tokens one pass over the weights serves; longer inputs are taken in passes of this many. */
#define MAX_TOKENS 8

/* A prompt kernel's panel (ggml.c): PANEL_VECTORS vectors of VLEN rows each, its weights repacked together. */
#define PANEL_VECTORS 2
#define PANEL_ROWS (PANEL_VECTORS * VLEN)

/* CALL(n) for the run-time token count `tokens` (1..MAX_TOKENS), n a constant in each call, so that the
 * kernel CALL names keeps its accumulators in registers. */
#define WITH_CONSTANT_TOKENS(tokens, CALL)                                                                \
    switch (tokens) {                                                                                     \
    case 1: CALL(1); break;                                                                               \
    case 2: CALL(2); break;                                                                               \
    case 3: CALL(3); break;                                                                               \
    case 4: CALL(4); break;                                                                               \
    case 5: CALL(5); break;                                                                               \
    case 6: CALL(6); break;                                                                               \
    case 7: CALL(7); break;                                                                               \
    case 8: CALL(8); break;                                                                               \
    }

/* How far ahead of the bytes in hand a row kernel asks for its row's next ones: a decode step streams every
 * weight once, and on their own the hardware prefetchers fetched them late, the more so for the small
 * matrices of small models (measured, Zen 4: MXFP4 experts, one thread 11-12 GB/s without, 14 with, two
 * threads 21 and 22-26; SmolLM2's four Q4_1 matmuls a layer, 2 threads, 198 us without, 130-160 with). */
#define ROW_PREFETCH_BYTES 2048

/* ggml_type numbers, as GGUF files store them. */
enum {
    TYPE_F32 = 0, TYPE_F16 = 1, TYPE_Q4_0 = 2, TYPE_Q4_1 = 3, TYPE_Q5_0 = 6, TYPE_Q5_1 = 7, TYPE_Q8_0 = 8,
    TYPE_Q4_K = 12, TYPE_Q5_K = 13, TYPE_Q6_K = 14, TYPE_BF16 = 30,
};

/* 256 activations quantized to int8 as llama.cpp's block_q8_K: x ~ d * q, and sums[j] = q[16j] + ... +
 * q[16j + 15] (ggml.c: quantize_q8_k). Aligned to cache lines, so that no vector of q straddles two. */
#define QK_K 256
struct __attribute__((aligned(64))) q8_k_block {
    int8_t q[QK_K];
    int16_t sums[QK_K / 16];
    float d;
};

/* 32 activations quantized to int8 as llama.cpp's block_q8_1 (for Q8_0, Q4_0 and Q4_1 weights): x ~ d * q,
 * and d_sum = d * (q[0] + ... + q[31]) (ggml.c: quantize_q8_32). */
struct __attribute__((aligned(32))) q8_32_block {
    int8_t q[32];
    float d, d_sum;
};

/* One pass of y = x W^T over at most MAX_TOKENS tokens: y[t * y_stride + r] = sum_c W[r, c] x[t * cols + c]. */
struct matmul_job {
    const uint8_t *w;  /* row r starts at w + r * row_bytes */
    int64_t row_bytes, cols;
    const float *x;    /* (tokens, cols) */
    const struct q8_k_block *x8; /* or x quantized, (tokens, cols / QK_K), for the Q6_K int8 kernel */
    const struct q8_32_block *x32; /* or (tokens, cols / 32), for the other int8 kernels */
    int tokens;
    float *y;
    int64_t y_stride;
};

/* Rows r0..r1 of a matmul job. */
typedef void matmul_rows_fn(const struct matmul_job *job, int64_t r0, int64_t r1);
/* Rows r0..r1 (r0 a multiple of PANEL_ROWS) of a job of any number of tokens; OK or ERROR_MEMORY. */
typedef int matmul_prompt_fn(const struct matmul_job *job, int64_t r0, int64_t r1);
/* One stored row decoded to cols floats. */
typedef void decode_row_fn(const uint8_t *row, int64_t cols, float *restrict out);

struct row_kernels {
    matmul_rows_fn *matmul_rows;
    decode_row_fn *decode_row;
    matmul_rows_fn *matmul_rows_int8; /* NULL for types without an int8 kernel */
    int int8_block; /* its activations: per QK_K (job->x8) or per 32 (job->x32) */
    matmul_prompt_fn *int8_prompt_rows; /* or NULL: an int8 kernel for prompts (more than MAX_TOKENS tokens) */
};

/* Fill k for this type and return 1, or return 0 if the file does not handle the type. */
int dense_kernels(int type, struct row_kernels *k);
int ggml_kernels(int type, struct row_kernels *k);
void quantize_q8_k(const float *x, struct q8_k_block *out);
void quantize_q8_32(const float *x, struct q8_32_block *out);

/* The entry points a decode plan (plan.c) runs as its steps; each is described where it is defined. */
int trillm_matmul(int type, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t cols, const float *x,
                  int64_t tokens, float *y);
int trillm_matmul_int8(int type, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t cols, const float *x,
                       int64_t tokens, float *y);
int trillm_decode_rows(int type, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t cols, const int64_t *ids,
                       int64_t n, float *out);
int trillm_release_rows(const uint8_t *w, int64_t row_bytes, int64_t rows, const int64_t *ids, int64_t n);
int trillm_ternary_matmul(const uint8_t *tiles, int64_t rows, int64_t cols, const float *w_scale, int64_t scale_count,
                          const float *x, int64_t tokens, float *y);
void trillm_rms_norm(const float *x, const float *weight, int64_t rows, int64_t dim, float eps, float *out);
void trillm_squared_relu_glu(const float *gate_up, int64_t tokens, int64_t dim, float *out);
void trillm_swiglu(const float *gate_up, int64_t tokens, int64_t dim, float *out);
void trillm_clamped_swiglu(const float *gate_up, int64_t rows, int64_t dim, float alpha, float limit, float *out);
void trillm_add(const float *a, const float *b, int64_t n, float *out);
int trillm_mxfp4_experts(int interleaved, int activations, const uint8_t *qs, int64_t qs_block, int64_t qs_row,
                         int64_t qs_expert, const uint8_t *scales, int64_t scale_block, int64_t scale_row,
                         int64_t scale_expert, int64_t experts, int64_t rows, int64_t cols, const float *bias,
                         const int64_t (*groups)[2], int64_t n_groups, const float *x, int64_t tokens, float *y);
int trillm_route_to_experts(const float *x, const float *logits, int64_t tokens, int64_t dim, int64_t experts,
                            int64_t k, float *rows, int64_t *token_of_row, float *weight_of_row, int64_t *groups,
                            int64_t *n_groups);
void trillm_combine_experts(const float *y, const float *weight_of_row, const int64_t *token_of_row, int64_t n,
                            int64_t dim, int64_t tokens, float *out);
void trillm_interleave(const float *a, const float *b, int64_t n, float *out);
void trillm_copy(const float *a, int64_t n, float *out);
int trillm_attention_one_token(const float *qkv, const float *cos, const float *sin, float *keys, float *values,
                               const float *sinks, int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim,
                               int64_t slot, int64_t length, int64_t kv_batch_stride, int64_t kv_head_stride,
                               float scale, float *out);

/* pool.c: run(arg, chunk, chunks) for every chunk of a job, spread over `threads` threads, the caller
 * included. With linger the workers spin a while afterwards, waiting for the next job; without, they
 * sleep at once (so they do not compete with torch's threads for the cores). */
typedef void chunk_fn(void *arg, int chunk, int chunks);
void run_parallel(chunk_fn *run, void *arg, int threads, int linger);
int pool_threads(void);

/* ---- Scalars ----------------------------------------------------------------------------------- */

static ALWAYS_INLINE float fp16_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    /* The bits moved into place (no ldexpf: a libm call per scale made the portable kernels 8x slower). */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24, exact in float32 */
        float magnitude = (float)mantissa * 0x1p-24f;
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 31)
        bits = sign | 0x7f800000 | mantissa << 13; /* infinity or NaN */
    else
        bits = sign | (exponent + 127 - 15) << 23 | mantissa << 13;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

static ALWAYS_INLINE float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16; /* bfloat16 is the top half of a float32 */
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* The fp16 scale stored at p (blocks are packed, so p may be unaligned). */
static ALWAYS_INLINE float fp16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
    return fp16_to_float(h);
}

/* Ask for the `bytes` bytes ROW_PREFETCH_BYTES past p: the part of a row a kernel reaches next. */
static ALWAYS_INLINE void prefetch_row_ahead(const uint8_t *p, const int bytes) {
    for (int offset = 0; offset < bytes; offset += 64)
        __builtin_prefetch(p + ROW_PREFETCH_BYTES + offset);
}

static ALWAYS_INLINE uint32_t u32_at(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* ---- Vectors: vf holds VLEN floats, vi VLEN int32 ------------------------------------------------ */

#if defined(__AVX512F__)
#define VLEN 16
typedef __m512 vf;
typedef __m512i vi;
static ALWAYS_INLINE vf vf_zero(void) { return _mm512_setzero_ps(); }
static ALWAYS_INLINE vf vf_set(float a) { return _mm512_set1_ps(a); }
static ALWAYS_INLINE vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
static ALWAYS_INLINE void vf_store(float *p, vf a) { _mm512_storeu_ps(p, a); }
static ALWAYS_INLINE vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static ALWAYS_INLINE vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static ALWAYS_INLINE vf vf_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static ALWAYS_INLINE float vf_sum(vf a) { return _mm512_reduce_add_ps(a); }
static ALWAYS_INLINE vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
static ALWAYS_INLINE vf vf_min(vf a, vf b) { return _mm512_min_ps(a, b); }
static ALWAYS_INLINE float vf_max_all(vf a) { return _mm512_reduce_max_ps(a); }
static ALWAYS_INLINE vf vf_round(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static ALWAYS_INLINE vf vf_pow2(vf n) { /* 2^n for whole n in -126..127 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
static ALWAYS_INLINE vf vf_f16(const uint8_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static ALWAYS_INLINE vf vf_bf16(const uint8_t *p) {
    __m512i halves = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(halves, 16));
}
static ALWAYS_INLINE vf vi_float(vi a) { return _mm512_cvtepi32_ps(a); }
static ALWAYS_INLINE vi vi_set(int32_t a) { return _mm512_set1_epi32(a); }
static ALWAYS_INLINE vi vi_u8(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static ALWAYS_INLINE vi vi_i8(const uint8_t *p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static ALWAYS_INLINE vi vi_and(vi a, vi b) { return _mm512_and_si512(a, b); }
static ALWAYS_INLINE vi vi_or(vi a, vi b) { return _mm512_or_si512(a, b); }
static ALWAYS_INLINE vi vi_add(vi a, vi b) { return _mm512_add_epi32(a, b); }
static ALWAYS_INLINE vi vi_sub(vi a, vi b) { return _mm512_sub_epi32(a, b); }
static ALWAYS_INLINE vi vi_shr(vi a, unsigned n) { return _mm512_srli_epi32(a, n); }
static ALWAYS_INLINE vi vi_shl(vi a, unsigned n) { return _mm512_slli_epi32(a, n); }
/* Lane i holds bit i of bits (0 or 1). */
static ALWAYS_INLINE vi vi_bits(uint32_t bits) { return _mm512_maskz_set1_epi32((__mmask16)bits, 1); }
static ALWAYS_INLINE vf vf_abs(vf a) { return _mm512_abs_ps(a); }
static ALWAYS_INLINE vi vi_from_vf(vf a) { return _mm512_cvtps_epi32(a); } /* rounded to nearest even */
static ALWAYS_INLINE int32_t vi_sum(vi a) { return _mm512_reduce_add_epi32(a); }
static ALWAYS_INLINE void vi_store_i8(int8_t *p, vi a) { _mm_storeu_si128((__m128i *)p, _mm512_cvtepi32_epi8(a)); }
/* Lanes q * scale + offset, for the code q in the low 4 (or 5) bits of each lane: a lookup in a table of
 * the block's 16 (32) values, one instruction where converting and scaling each lane takes two. */
static ALWAYS_INLINE vf vf_codes16(vi q, float scale, float offset) {
    vf values = vf_fma(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), vf_set(scale), vf_set(offset));
    return _mm512_permutexvar_ps(q, values);
}
static ALWAYS_INLINE vf vf_codes32(vi q, float scale, float offset) {
    vf low = vf_fma(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), vf_set(scale), vf_set(offset));
    vf high = vf_fma(_mm512_setr_ps(16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31), vf_set(scale),
                     vf_set(offset));
    return _mm512_permutex2var_ps(low, q, high);
}
/* FP4 E2M1 (MXFP4's elements): the block's 16 values times its scale, then one lookup per lane by the code
 * in the lane's low 4 bits (the bits above are ignored). */
typedef vf fp4_table;
static ALWAYS_INLINE fp4_table fp4_scaled(float scale) {
    return _mm512_mul_ps(_mm512_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, -0.0f, -0.5f, -1.0f, -1.5f,
                                        -2.0f, -3.0f, -4.0f, -6.0f),
                         vf_set(scale));
}
static ALWAYS_INLINE vf fp4_lookup(fp4_table table, vi q) { return _mm512_permutexvar_ps(q, table); }
/* Vector i of a 16-byte block's 32 codes, in the lane order of MXFP4_LANE_BYTE: the block's four 32-bit words
 * in every group of four lanes, each group shifted to its own nibble. Broadcasting and shifting keeps the
 * shuffle unit (the bottleneck: one lookup per 16 weights) free of byte-to-lane conversions. */
static ALWAYS_INLINE vi fp4_codes(const uint8_t *block, int i) {
    vi words = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)block));
    return _mm512_srlv_epi32(words, _mm512_add_epi32(_mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12),
                                                     vi_set(16 * i)));
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define VLEN 8
typedef __m256 vf;
typedef __m256i vi;
static ALWAYS_INLINE vf vf_zero(void) { return _mm256_setzero_ps(); }
static ALWAYS_INLINE vf vf_set(float a) { return _mm256_set1_ps(a); }
static ALWAYS_INLINE vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
static ALWAYS_INLINE void vf_store(float *p, vf a) { _mm256_storeu_ps(p, a); }
static ALWAYS_INLINE vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static ALWAYS_INLINE vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static ALWAYS_INLINE vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static ALWAYS_INLINE float vf_sum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static ALWAYS_INLINE vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
static ALWAYS_INLINE vf vf_min(vf a, vf b) { return _mm256_min_ps(a, b); }
static ALWAYS_INLINE float vf_max_all(vf a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
static ALWAYS_INLINE vf vf_round(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static ALWAYS_INLINE vf vf_pow2(vf n) { /* 2^n for whole n in -126..127 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
static ALWAYS_INLINE vf vf_f16(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static ALWAYS_INLINE vf vf_bf16(const uint8_t *p) {
    __m256i halves = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(halves, 16));
}
static ALWAYS_INLINE vf vi_float(vi a) { return _mm256_cvtepi32_ps(a); }
static ALWAYS_INLINE vi vi_set(int32_t a) { return _mm256_set1_epi32(a); }
static ALWAYS_INLINE vi vi_u8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static ALWAYS_INLINE vi vi_i8(const uint8_t *p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static ALWAYS_INLINE vi vi_and(vi a, vi b) { return _mm256_and_si256(a, b); }
static ALWAYS_INLINE vi vi_or(vi a, vi b) { return _mm256_or_si256(a, b); }
static ALWAYS_INLINE vi vi_add(vi a, vi b) { return _mm256_add_epi32(a, b); }
static ALWAYS_INLINE vi vi_sub(vi a, vi b) { return _mm256_sub_epi32(a, b); }
static ALWAYS_INLINE vi vi_shr(vi a, unsigned n) { return _mm256_srli_epi32(a, n); }
static ALWAYS_INLINE vi vi_shl(vi a, unsigned n) { return _mm256_slli_epi32(a, n); }
static ALWAYS_INLINE vi vi_bits(uint32_t bits) {
    vi lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int32_t)bits), lanes), _mm256_set1_epi32(1));
}
static ALWAYS_INLINE vf vf_abs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
static ALWAYS_INLINE vi vi_from_vf(vf a) { return _mm256_cvtps_epi32(a); } /* rounded to nearest even */
static ALWAYS_INLINE int32_t vi_sum(vi a) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1))));
}
static ALWAYS_INLINE void vi_store_i8(int8_t *p, vi a) { /* lanes within int8 */
    __m128i pairs = _mm_packs_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    _mm_storel_epi64((__m128i *)p, _mm_packs_epi16(pairs, pairs));
}
/* FP4 E2M1: the 8 magnitudes times the scale, each with its code's low 3 bits xored into bits 28-30, so that
 * one xor after the 8-lane lookup (by those 3 bits) both restores them and sets the sign from bit 3: lane bits
 * 28-31 become the code's 4 bits. */
typedef vf fp4_table;
static ALWAYS_INLINE fp4_table fp4_scaled(float scale) {
    vf magnitudes = _mm256_mul_ps(_mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f), vf_set(scale));
    return _mm256_xor_ps(magnitudes, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), 28)));
}
static ALWAYS_INLINE vf fp4_lookup(fp4_table table, vi q) {
    return _mm256_xor_ps(_mm256_permutevar8x32_ps(table, q), _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
}
static ALWAYS_INLINE vi fp4_codes(const uint8_t *block, int i) {
    vi words = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)block));
    return _mm256_srlv_epi32(words, _mm256_add_epi32(_mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4), vi_set(8 * i)));
}

#else
#define VLEN 1
typedef float vf;
typedef int32_t vi;
static ALWAYS_INLINE vf vf_zero(void) { return 0.0f; }
static ALWAYS_INLINE vf vf_set(float a) { return a; }
static ALWAYS_INLINE vf vf_load(const float *p) { return *p; }
static ALWAYS_INLINE void vf_store(float *p, vf a) { *p = a; }
static ALWAYS_INLINE vf vf_add(vf a, vf b) { return a + b; }
static ALWAYS_INLINE vf vf_mul(vf a, vf b) { return a * b; }
static ALWAYS_INLINE vf vf_fma(vf a, vf b, vf c) { return a * b + c; }
static ALWAYS_INLINE float vf_sum(vf a) { return a; }
static ALWAYS_INLINE vf vf_max(vf a, vf b) { return a > b ? a : b; }
static ALWAYS_INLINE vf vf_min(vf a, vf b) { return a < b ? a : b; }
static ALWAYS_INLINE float vf_max_all(vf a) { return a; }
static ALWAYS_INLINE vf vf_round(vf a) { return rintf(a); }
static ALWAYS_INLINE vf vf_pow2(vf n) { return ldexpf(1.0f, (int)n); }
static ALWAYS_INLINE vf vf_f16(const uint8_t *p) { return fp16_at(p); }
static ALWAYS_INLINE vf vf_bf16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
    return bf16_to_float(h);
}
static ALWAYS_INLINE vf vi_float(vi a) { return (float)a; }
static ALWAYS_INLINE vi vi_set(int32_t a) { return a; }
static ALWAYS_INLINE vi vi_u8(const uint8_t *p) { return *p; }
static ALWAYS_INLINE vi vi_i8(const uint8_t *p) { return (int8_t)*p; }
static ALWAYS_INLINE vi vi_and(vi a, vi b) { return a & b; }
static ALWAYS_INLINE vi vi_or(vi a, vi b) { return a | b; }
static ALWAYS_INLINE vi vi_add(vi a, vi b) { return a + b; }
static ALWAYS_INLINE vi vi_sub(vi a, vi b) { return a - b; }
static ALWAYS_INLINE vi vi_shr(vi a, unsigned n) { return (vi)((uint32_t)a >> n); }
static ALWAYS_INLINE vi vi_shl(vi a, unsigned n) { return (vi)((uint32_t)a << n); }
static ALWAYS_INLINE vi vi_bits(uint32_t bits) { return (vi)(bits & 1); }
static ALWAYS_INLINE vf vf_abs(vf a) { return fabsf(a); }
static ALWAYS_INLINE vi vi_from_vf(vf a) { return (vi)a; } /* of a whole number */
static ALWAYS_INLINE int32_t vi_sum(vi a) { return a; }
static ALWAYS_INLINE void vi_store_i8(int8_t *p, vi a) { *p = (int8_t)a; }
typedef float fp4_table;
static ALWAYS_INLINE fp4_table fp4_scaled(float scale) { return scale; }
static ALWAYS_INLINE vf fp4_lookup(fp4_table scale, vi q) {
    static const float values[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
    return values[q & 15] * scale;
}
static ALWAYS_INLINE vi fp4_codes(const uint8_t *block, int i) { return (vi)(u32_at(block + 4 * (i % 4)) >> (4 * (i / 4))); }
#endif

/* ---- VNNI's byte and word dot products on 256-bit vectors --------------------------------------------
 * AVX-512 VNNI (with VL) and AVX-VNNI (Intel's cores since Alder Lake, without AVX-512) both have them; the
 * AVX2 kernels use them where the library is built for either, one instruction where AVX2 spends two or
 * three (maddubs, madd, add) and no int16 step that could saturate. */
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define VNNI_256 1
/* Inline assembly for gcc, which otherwise copies the accumulator to another register around each one
 * (measured: AVX-VNNI's ternary prompt kernel no faster than AVX2's); AVX-VNNI's encoding needs {vex}
 * (written %{vex%}). */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define VNNI_256_ASM(op) op " %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b)
#else
#define VNNI_256_ASM(op) "%{vex%} " op " %2, %1, %0" : "+x"(acc) : "x"(a), "x"(b)
#endif
/* acc + the sums of the 4-byte groups of products of unsigned a and signed b, in 8 int32 lanes */
static ALWAYS_INLINE __m256i dpbusd_256(__m256i acc, __m256i a, __m256i b) {
#if defined(__GNUC__) && !defined(__clang__)
    __asm__(VNNI_256_ASM("vpdpbusd"));
    return acc;
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, a, b);
#else
    return _mm256_dpbusd_avx_epi32(acc, a, b);
#endif
}
/* acc + the sums of adjacent products of int16 lanes, in 8 int32 lanes */
static ALWAYS_INLINE __m256i dpwssd_256(__m256i acc, __m256i a, __m256i b) {
#if defined(__GNUC__) && !defined(__clang__)
    __asm__(VNNI_256_ASM("vpdpwssd"));
    return acc;
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(acc, a, b);
#else
    return _mm256_dpwssd_avx_epi32(acc, a, b);
#endif
}
#else
#define VNNI_256 0
#endif
#if defined(__AVX2__)
/* A 32-weight block's 16 bytes of nibbles as 32 bytes, byte j the code of weight j (j < 16: byte j's low
 * nibble, else byte j - 16's high one): the block in both halves, the second shifted by 4 (bits from the
 * next byte masked off with the high nibble). GGML's Q4_x and Q5_x and MXFP4 store nibbles so. */
static ALWAYS_INLINE __m256i nibble_bytes(const uint8_t *qs) {
    __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    return _mm256_and_si256(_mm256_srlv_epi32(bytes, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(15));
}

/* acc + the sums of adjacent products of int16 lanes a and b */
static ALWAYS_INLINE __m256i madd_add_256(__m256i acc, __m256i a, __m256i b) {
#if VNNI_256
    return dpwssd_256(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}
#endif

/* MXFP4 (fp4_codes): lane position p (vector p / VLEN, lane p % VLEN) of a block holds the nibble p / 4 of its
 * 32-bit word p % 4, so byte 4 (p % 4) + p / 8, high nibble if p / 4 is odd. */
#define MXFP4_LANE_BYTE(p) (4 * ((p) % 4) + (p) / 8)
#define MXFP4_LANE_HIGH(p) ((p) / 4 % 2)

/* e^x, within 2 ulp of expf for x in -87..88 (clamped there: below, the softmax weights it serves vanish
 * anyway): x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' degree-6 polynomial, times 2^n. */
static ALWAYS_INLINE vf vf_exp(vf x) {
    x = vf_max(vf_min(x, vf_set(88.0f)), vf_set(-87.0f));
    const vf n = vf_round(vf_mul(x, vf_set(1.44269504088896341f)));
    vf r = vf_fma(n, vf_set(-0.693359375f), x);
    r = vf_fma(n, vf_set(2.12194440e-4f), r);
    vf p = vf_set(1.9875691500e-4f);
    p = vf_fma(p, r, vf_set(1.3981999507e-3f));
    p = vf_fma(p, r, vf_set(8.3334519073e-3f));
    p = vf_fma(p, r, vf_set(4.1665795894e-2f));
    p = vf_fma(p, r, vf_set(1.6666665459e-1f));
    p = vf_fma(p, r, vf_set(5.0000001201e-1f));
    p = vf_fma(p, vf_mul(r, r), vf_add(r, vf_set(1.0f)));
    return vf_mul(p, vf_pow2(n));
}

/* The 4-bit codes of a 32-weight block: byte j holds weight j in its low nibble and j + 16 in its high.
 * Lanes hold the code in their low 4 bits (vf_codes16 ignores the bits above). */
static ALWAYS_INLINE vi nibbles(const uint8_t *qs, int i) {
    int first = i * VLEN;
    vi bytes = vi_u8(qs + first % 16);
    return first < 16 ? bytes : vi_shr(bytes, 4);
}

#if VLEN < 16
/* Lanes q * scale + offset, for the code q in the low 4 (or 5) bits of each lane. */
static ALWAYS_INLINE vf vf_codes16(vi q, float scale, float offset) {
    return vf_fma(vi_float(vi_and(q, vi_set(15))), vf_set(scale), vf_set(offset));
}
static ALWAYS_INLINE vf vf_codes32(vi q, float scale, float offset) {
    return vf_fma(vi_float(vi_and(q, vi_set(31))), vf_set(scale), vf_set(offset));
}
#endif

#endif
