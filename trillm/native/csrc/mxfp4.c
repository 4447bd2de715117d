/* MXFP4 matrix products straight from the packed blocks, as gpt-oss's experts are stored (OCP Microscaling
 * Formats v1.0: 32 FP4 E2M1 elements share one E8M0 scale 2^(s - 127); element values 0, 0.5, 1, 1.5, 2,
 * 3, 4, 6 and their negatives, bit 3 the sign). trillm/weights/mxfp4.py holds the layouts and the twin.
 *
 * One kernel serves both stored layouts, told by strides: a block's 16 code bytes and its scale byte are
 * found at qs + b * qs_block and scales + b * scale_block within a row.
 * - GGUF (llama.cpp's block_mxfp4): 17-byte blocks, the scale first; byte j holds element j in its low
 *   nibble and element j + 16 in its high (as Q4_0).
 * - The Hugging Face release: codes (rows, cols / 32, 16) and scales (rows, cols / 32) apart; byte j holds
 *   element 2j in its low nibble and 2j + 1 in its high.
 * Codes are decoded in the order each kernel finds cheapest, not in element order: rather than reordering
 * codes, the call reorders the activations once into that order for the layout at hand. A dot product does
 * not care in which order it sums, and a token's activations are a thousandth of the weights it meets.
 * Three forms of activations (ACTIVATIONS_*):
 * - float32 (a product as a float32 matmul over the decoded weights), decoding codes in the lane order
 *   fp4_codes finds cheapest;
 * - int8, as llama.cpp's MXFP4 x Q8_0: a token's activations quantized per block of 32 (scale max|x| / 127),
 *   each block's products integers (the codes as int8 2 FP4_VALUES + 12, an unsigned byte for the
 *   multiply-add instructions, the +12 taken back exactly by the block's -12 sum q), times the two scales.
 *   About twice float32's speed, at the cost of the activations' rounding (see weights/mxfp4.py);
 * - bfloat16 (CPUs with AVX512-BF16), for prompts.
 * A decode step's rows are read once each, a block decoded for at most MAX_TOKENS tokens; a prompt's float32
 * and bfloat16 groups decode a tile of rows once into L2 and multiply it in register tiles.
 */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

#define MXFP4_BLOCK 32
/* The E8M0 scales 2^(s - 127) as floats, looked up: fewer instructions a block than moving the bits into an
 * exponent. s = 0 is 2^-127, a float32 subnormal; 255, NaN in the spec, reads as infinity. */
static float e8m0_values[256];

__attribute__((constructor)) static void fill_e8m0_values(void) {
    for (int s = 0; s < 256; s++) {
        uint32_t bits = s ? (uint32_t)s << 23 : 0x00400000u;
        memcpy(&e8m0_values[s], &bits, sizeof bits);
    }
}

struct mxfp4_job {
    const uint8_t *qs, *scales;
    int64_t qs_block, qs_row, scale_block, scale_row, cols;
    const float *x; /* (tokens, cols), each block's activations in lane order */
    const struct q8_row *x8; /* or int8 blocks, one row per token (q of token t at x8[0].q + t * cols / 32) */
    const uint16_t *x16; /* or bfloat16 (tokens, cols), in the int8 kernel's lane order */
    int tokens;
    float *y;
    int64_t y_stride;
};

/* One block of a row into acc[t][0..1] for each token: its 32 codes decoded once serve every token. */
static ALWAYS_INLINE void mxfp4_block(const uint8_t *block, float scale, const float *x, int64_t cols, const int tokens,
                                      vf acc[][2][2], const int set) {
    const fp4_table table = fp4_scaled(scale);
#pragma GCC unroll 32
    for (int i = 0; i < MXFP4_BLOCK / VLEN; i++) {
        vf weights = fp4_lookup(table, fp4_codes(block, i));
#pragma GCC unroll 8
        for (int t = 0; t < tokens; t++)
            acc[t][set][i % 2] = vf_fma(weights, vf_load(x + t * cols + i * VLEN), acc[t][set][i % 2]);
    }
}

/* Rows r0..r1 for a constant number of tokens. With few tokens, blocks alternate between two sets of
 * accumulators, so that the additions into one do not wait on the last. */
static ALWAYS_INLINE void mxfp4_rows_tokens(const struct mxfp4_job *job, const int tokens, int64_t r0, int64_t r1) {
    const int64_t cols = job->cols, blocks = cols / MXFP4_BLOCK;
    const int sets = tokens <= 4 ? 2 : 1;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *qs = job->qs + r * job->qs_row, *scales = job->scales + r * job->scale_row;
        vf acc[MAX_TOKENS][2][2];
        for (int t = 0; t < tokens; t++)
            acc[t][0][0] = acc[t][0][1] = acc[t][1][0] = acc[t][1][1] = vf_zero();
        const uint8_t *block = qs, *scale = scales;
        const float *x = job->x;
        int64_t b = 0;
        for (; b + sets <= blocks; b += sets, block += sets * job->qs_block, scale += sets * job->scale_block,
                                   x += sets * MXFP4_BLOCK) {
            __builtin_prefetch(block + ROW_PREFETCH_BYTES);
            mxfp4_block(block, e8m0_values[*scale], x, cols, tokens, acc, 0);
            if (sets == 2)
                mxfp4_block(block + job->qs_block, e8m0_values[scale[job->scale_block]], x + MXFP4_BLOCK, cols, tokens, acc, 1);
        }
        if (b < blocks)
            mxfp4_block(block, e8m0_values[*scale], x, cols, tokens, acc, 0);
        for (int t = 0; t < tokens; t++)
            job->y[t * job->y_stride + r] =
                vf_sum(vf_add(vf_add(acc[t][0][0], acc[t][0][1]), vf_add(acc[t][1][0], acc[t][1][1])));
    }
}

/* Float32 prompts: a tile of rows decoded once to float32 (exact) into a buffer that stays in L2, then the
 * group's tokens multiply it in register tiles of FLOAT_ROWS rows by FLOAT_TOKENS tokens, a multiply-add a
 * row, token and vector: a block's decode serves all of the group's tokens, where mxfp4_rows_tokens decodes
 * it again for every MAX_TOKENS. */
#define FLOAT_TILE_BYTES (192 * 1024)
#if VLEN >= 16
#define FLOAT_ROWS 4 /* 32 registers: 24 accumulators, 4 rows of weights, an activation */
#define FLOAT_TOKENS 6
#else
#define FLOAT_ROWS 2 /* AVX2's 16: 8 accumulators, 2 rows, an activation */
#define FLOAT_TOKENS 4
#endif

static void decode_tile_float(const struct mxfp4_job *job, int64_t r0, int64_t n, float *decoded) {
    const int64_t cols = job->cols, blocks = cols / MXFP4_BLOCK;
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *block = job->qs + (r0 + r) * job->qs_row, *scale = job->scales + (r0 + r) * job->scale_row;
        float *out = decoded + r * cols;
        for (int64_t b = 0; b < blocks; b++, block += job->qs_block, scale += job->scale_block, out += MXFP4_BLOCK) {
            __builtin_prefetch(block + ROW_PREFETCH_BYTES);
            const fp4_table table = fp4_scaled(e8m0_values[*scale]);
#pragma GCC unroll 32
            for (int i = 0; i < MXFP4_BLOCK / VLEN; i++)
                vf_store(out + i * VLEN, fp4_lookup(table, fp4_codes(block, i)));
        }
    }
}

/* y[t * y_stride + r] = decoded row r . x row t, `rows` and `tokens` constants (registers). */
static ALWAYS_INLINE void float_register_tile(const float *w, const float *x, int64_t cols, float *y, int64_t y_stride,
                                              const int rows, const int tokens) {
    vf acc[4][6]; /* the largest tile any level instantiates; a level calls those up to FLOAT_ROWS x FLOAT_TOKENS */
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < tokens; t++)
            acc[r][t] = vf_zero();
    for (int64_t c = 0; c < cols; c += VLEN) {
        vf weights[4];
        for (int r = 0; r < rows; r++)
            weights[r] = vf_load(w + r * cols + c);
        for (int t = 0; t < tokens; t++) {
            vf activations = vf_load(x + t * cols + c);
            for (int r = 0; r < rows; r++)
                acc[r][t] = vf_fma(weights[r], activations, acc[r][t]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < tokens; t++)
            y[t * y_stride + r] = vf_sum(acc[r][t]);
}

typedef void float_tile_fn(const float *, const float *, int64_t, float *, int64_t);
#define FLOAT_TILE(r, t) static void float_tile_##r##_##t(const float *w, const float *x, int64_t cols, float *y, \
                                                          int64_t y_stride) { float_register_tile(w, x, cols, y, y_stride, r, t); }
#define FLOAT_TILES(r) FLOAT_TILE(r, 1) FLOAT_TILE(r, 2) FLOAT_TILE(r, 3) FLOAT_TILE(r, 4) FLOAT_TILE(r, 5) FLOAT_TILE(r, 6)
FLOAT_TILES(1) FLOAT_TILES(2) FLOAT_TILES(3) FLOAT_TILES(4)
#define FLOAT_ROW_OF_TILES(r) {float_tile_##r##_1, float_tile_##r##_2, float_tile_##r##_3, float_tile_##r##_4, \
                               float_tile_##r##_5, float_tile_##r##_6}
static float_tile_fn *const float_tiles[4][6] = {
    FLOAT_ROW_OF_TILES(1), FLOAT_ROW_OF_TILES(2), FLOAT_ROW_OF_TILES(3), FLOAT_ROW_OF_TILES(4)};
#undef FLOAT_TILE
#undef FLOAT_TILES
#undef FLOAT_ROW_OF_TILES

/* Rows r0..r1 of the job's expert for its `tokens` tokens (job->x, job->y), a tile at a time. */
static void mxfp4_rows_float_tiled(const struct mxfp4_job *job, int64_t tokens, int64_t r0, int64_t r1) {
    const int64_t cols = job->cols, fit = FLOAT_TILE_BYTES / (cols * (int64_t)sizeof(float));
    const int64_t tile_rows = fit < 1 ? 1 : fit;
    float decoded[tile_rows * cols]; /* at most FLOAT_TILE_BYTES, or one row, on the thread's stack */
    for (int64_t tile = r0; tile < r1; tile += tile_rows) {
        const int64_t n = tile + tile_rows < r1 ? tile_rows : r1 - tile;
        decode_tile_float(job, tile, n, decoded);
        const int64_t passes = (tokens + FLOAT_TOKENS - 1) / FLOAT_TOKENS; /* of about equal size */
        for (int64_t pass = 0, t = 0; pass < passes; pass++) {
            const int64_t pass_tokens = (tokens - t) / (passes - pass);
            for (int64_t r = 0; r < n; r += FLOAT_ROWS) {
                const int64_t register_rows = n - r < FLOAT_ROWS ? n - r : FLOAT_ROWS;
                float_tiles[register_rows - 1][pass_tokens - 1](decoded + r * cols, job->x + t * cols, cols,
                                                                 job->y + t * job->y_stride + tile + r, job->y_stride);
            }
            t += pass_tokens;
        }
    }
}

/* ---- int8 activations --------------------------------------------------------------------------------- */

/* A token's activations as int8 blocks: q[b][p] for the element of block b that code p meets (the low
 * nibbles' 16, then the high nibbles'), x = 2 d[b] q[b], and offset[b] = (-12 sum q[b], 0, ..., 0): the
 * lanes a block's integer products start from. */
struct q8_row {
    int8_t (*q)[MXFP4_BLOCK];
    float *d;
    int32_t (*offset)[8];
};

/* cols activations to int8 blocks; element[p] is the element that code p of a block meets. The same
 * operations as weights/mxfp4.py's quantize_q8_0: q = round_half_even(x * (127 / max|x|)). */
static void quantize_q8_row(const float *x, int64_t cols, const int *element, struct q8_row out) {
    for (int64_t b = 0; b < cols / MXFP4_BLOCK; b++, x += MXFP4_BLOCK) {
        float absmax = 0.0f;
        for (int i = 0; i < MXFP4_BLOCK; i++)
            absmax = fmaxf(absmax, fabsf(x[i]));
        const float iscale = absmax > 0.0f ? 127.0f / absmax : 0.0f;
        int32_t sum = 0;
        for (int p = 0; p < MXFP4_BLOCK; p++) {
            out.q[b][p] = (int8_t)rintf(x[element[p]] * iscale); /* |q| <= 127 up to a rounding */
            sum += out.q[b][p];
        }
        out.d[b] = 0.5f * (absmax / 127.0f); /* halved: the codes are doubled */
        memset(out.offset[b], 0, sizeof out.offset[b]);
        out.offset[b][0] = -12 * sum;
    }
}

/* 2 FP4_VALUES[code] + 12 for codes 0..15: 0..24, unsigned */
#define FP4_DOUBLED_PLUS_12 12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0

#if defined(__AVX2__)
/* A block's 32 codes as 2 FP4_VALUES + 12, the low nibbles' in the first 16 bytes, the high nibbles' in the
 * last (kernels.h: nibble_bytes), then one byte shuffle looks all 32 up. */
static ALWAYS_INLINE __m256i fp4_unsigned_codes(const uint8_t *block) {
    return _mm256_shuffle_epi8(_mm256_setr_epi8(FP4_DOUBLED_PLUS_12, FP4_DOUBLED_PLUS_12), nibble_bytes(block));
}
/* 8 int32 lanes that sum to offset + sum_p codes_p q_p */
static ALWAYS_INLINE __m256i q8_dot(__m256i codes, const int8_t *q, const int32_t *offset) {
    __m256i activations = _mm256_loadu_si256((const __m256i *)q), start = _mm256_loadu_si256((const __m256i *)offset);
#if VNNI_256
    return dpbusd_256(start, codes, activations);
#else /* unsigned x signed bytes: pairs summed to int16 (at most 2 * 24 * 127), then to int32 */
    return _mm256_add_epi32(start, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, activations), _mm256_set1_epi16(1)));
#endif
}
typedef __m256 acc8;
static ALWAYS_INLINE acc8 acc8_zero(void) { return _mm256_setzero_ps(); }
static ALWAYS_INLINE float acc8_sum(acc8 a, acc8 b) {
    a = _mm256_add_ps(a, b);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
/* acc[t] += scale d_t (offset + sum_p codes_p q_p) for each token t, its block b of x8[t] */
static ALWAYS_INLINE void q8_block_into(const uint8_t *block, float scale, const struct q8_row *x8, int64_t b,
                                        const int tokens, acc8 *acc) {
    __m256i codes = fp4_unsigned_codes(block);
    __m256 weight_scale = _mm256_set1_ps(scale);
#pragma GCC unroll 8
    for (int t = 0; t < tokens; t++)
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_dot(codes, x8[t].q[b], x8[t].offset[b])),
                                 _mm256_mul_ps(weight_scale, _mm256_set1_ps(x8[t].d[b])), acc[t]);
}
#else
typedef float acc8;
static ALWAYS_INLINE acc8 acc8_zero(void) { return 0.0f; }
static ALWAYS_INLINE float acc8_sum(acc8 a, acc8 b) { return a + b; }
static ALWAYS_INLINE void q8_block_into(const uint8_t *block, float scale, const struct q8_row *x8, int64_t b,
                                        const int tokens, acc8 *acc) {
    static const int32_t codes[16] = {FP4_DOUBLED_PLUS_12};
    for (int t = 0; t < tokens; t++) {
        const int8_t *qt = x8[t].q[b];
        int32_t dot = x8[t].offset[b][0];
        for (int j = 0; j < MXFP4_BLOCK / 2; j++)
            dot += codes[block[j] & 15] * qt[j] + codes[block[j] >> 4] * qt[j + 16];
        acc[t] += (float)dot * (scale * x8[t].d[b]);
    }
}
#endif

/* Rows r0..r1 for a constant number of tokens, from int8 activations (job->x8[t] for token t). */
static ALWAYS_INLINE void mxfp4_rows_tokens_int8(const struct mxfp4_job *job, const int tokens, int64_t r0, int64_t r1) {
    const int64_t blocks = job->cols / MXFP4_BLOCK;
    const int sets = tokens <= 4 ? 2 : 1;
    const struct q8_row *x8 = job->x8;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *qs = job->qs + r * job->qs_row, *scales = job->scales + r * job->scale_row;
        acc8 acc[2][MAX_TOKENS];
        for (int t = 0; t < tokens; t++)
            acc[0][t] = acc[1][t] = acc8_zero();
        const uint8_t *block = qs, *scale = scales;
        int64_t b = 0;
        for (; b + sets <= blocks; b += sets, block += sets * job->qs_block, scale += sets * job->scale_block) {
            __builtin_prefetch(block + ROW_PREFETCH_BYTES);
            q8_block_into(block, e8m0_values[*scale], x8, b, tokens, acc[0]);
            if (sets == 2)
                q8_block_into(block + job->qs_block, e8m0_values[scale[job->scale_block]], x8, b + 1, tokens, acc[1]);
        }
        if (b < blocks)
            q8_block_into(block, e8m0_values[*scale], x8, b, tokens, acc[0]);
        for (int t = 0; t < tokens; t++)
            job->y[t * job->y_stride + r] = acc8_sum(acc[0][t], acc[1][t]);
    }
}

/* ---- bfloat16 activations (CPUs with AVX512-BF16), for prompts ----------------------------------------------
 * A tile of rows is decoded once to bfloat16 (FP4 values times a power of two are exact in it) into a
 * buffer that stays in L2, then every token routed to the expert multiplies it, a register tile of up to 4
 * rows by 6 tokens a pass: one dot-product instruction a row, token and block of 32 (the int8 kernel spends
 * four, and decodes its block again for each 8 tokens). The activations are rounded to bfloat16 (8
 * significant bits a value). For prompts only: with one token a block, the decode is the work. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && __GNUC__ >= 11
#define MXFP4_BF16 1
#define BF16_TILE_BYTES (192 * 1024) /* the decoded rows of a tile, kept in L2 while the tokens meet them */
#define BF16_ROWS 4
#define BF16_TOKENS 6
#pragma GCC push_options
#pragma GCC target("avx512bf16")
static const float FP4_FLOATS[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* Rows r0..r0+n of the job's expert decoded to bfloat16, (n, cols), each block's 32 in the kernel's lane order. */
static void decode_tile_bf16(const struct mxfp4_job *job, int64_t r0, int64_t n, uint16_t *decoded) {
    const int64_t cols = job->cols, blocks = cols / MXFP4_BLOCK;
    const __m512 values = _mm512_loadu_ps(FP4_FLOATS);
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *block = job->qs + (r0 + r) * job->qs_row, *scale = job->scales + (r0 + r) * job->scale_row;
        for (int64_t b = 0; b < blocks; b++, block += job->qs_block, scale += job->scale_block) {
            __builtin_prefetch(block + ROW_PREFETCH_BYTES);
            __m256bh table = _mm512_cvtneps_pbh(_mm512_mul_ps(values, _mm512_set1_ps(e8m0_values[*scale])));
            _mm512_storeu_si512(decoded + r * cols + b * MXFP4_BLOCK,
                                _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(nibble_bytes(block)),
                                                         _mm512_castsi256_si512((__m256i)table)));
        }
    }
}

/* y[t * y_stride + r] = decoded row r . x16 row t for `rows` rows and `tokens` tokens, both constants so
 * that the rows x tokens accumulators live in registers. */
static inline __attribute__((always_inline)) void bf16_register_tile(const uint16_t *w, const uint16_t *x, int64_t cols,
                                                                     float *y, int64_t y_stride, const int rows,
                                                                     const int tokens) {
    __m512 acc[BF16_ROWS][BF16_TOKENS];
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < tokens; t++)
            acc[r][t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < cols; c += MXFP4_BLOCK) {
        __m512i weights[BF16_ROWS];
        for (int r = 0; r < rows; r++)
            weights[r] = _mm512_loadu_si512(w + r * cols + c);
        for (int t = 0; t < tokens; t++) {
            __m512i activations = _mm512_loadu_si512(x + t * cols + c);
            for (int r = 0; r < rows; r++)
                acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)weights[r], (__m512bh)activations);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < tokens; t++)
            y[t * y_stride + r] = _mm512_reduce_add_ps(acc[r][t]);
}

typedef void bf16_tile_fn(const uint16_t *, const uint16_t *, int64_t, float *, int64_t);
#define BF16_TILE(r, t) static void bf16_tile_##r##_##t(const uint16_t *w, const uint16_t *x, int64_t cols, float *y, \
                                                        int64_t y_stride) { bf16_register_tile(w, x, cols, y, y_stride, r, t); }
#define BF16_TILES(r) BF16_TILE(r, 1) BF16_TILE(r, 2) BF16_TILE(r, 3) BF16_TILE(r, 4) BF16_TILE(r, 5) BF16_TILE(r, 6)
BF16_TILES(1) BF16_TILES(2) BF16_TILES(3) BF16_TILES(4)
#define BF16_ROW_OF_TILES(r) {bf16_tile_##r##_1, bf16_tile_##r##_2, bf16_tile_##r##_3, bf16_tile_##r##_4, \
                              bf16_tile_##r##_5, bf16_tile_##r##_6}
static bf16_tile_fn *const bf16_tiles[BF16_ROWS][BF16_TOKENS] = {
    BF16_ROW_OF_TILES(1), BF16_ROW_OF_TILES(2), BF16_ROW_OF_TILES(3), BF16_ROW_OF_TILES(4)};
#undef BF16_TILE
#undef BF16_TILES
#undef BF16_ROW_OF_TILES
#pragma GCC pop_options

/* Rows r0..r1 of the job's expert for its `tokens` tokens (job->x16, job->y), a tile at a time. */
static void mxfp4_rows_bf16(const struct mxfp4_job *job, int64_t tokens, int64_t r0, int64_t r1) {
    const int64_t cols = job->cols, fit = BF16_TILE_BYTES / (cols * (int64_t)sizeof(uint16_t));
    const int64_t tile_rows = fit < 1 ? 1 : fit; /* 33 rows of 2880 columns */
    uint16_t decoded[tile_rows * cols]; /* at most BF16_TILE_BYTES, or one row, on the thread's stack */
    for (int64_t tile = r0; tile < r1; tile += tile_rows) {
        const int64_t n = tile + tile_rows < r1 ? tile_rows : r1 - tile;
        decode_tile_bf16(job, tile, n, decoded);
        /* passes of about equal size, as in mxfp4_chunk */
        const int64_t passes = (tokens + BF16_TOKENS - 1) / BF16_TOKENS;
        for (int64_t pass = 0, t = 0; pass < passes; pass++) {
            const int64_t pass_tokens = (tokens - t) / (passes - pass);
            for (int64_t r = 0; r < n; r += BF16_ROWS) {
                const int64_t register_rows = n - r < BF16_ROWS ? n - r : BF16_ROWS;
                bf16_tiles[register_rows - 1][pass_tokens - 1](decoded + r * cols, job->x16 + t * cols, cols,
                                                           job->y + t * job->y_stride + tile + r, job->y_stride);
            }
            t += pass_tokens;
        }
    }
}
#endif

/* Whether this library and this CPU have the bfloat16 kernel (ACTIVATIONS_BF16). */
int trillm_mxfp4_has_bf16(void) {
#ifdef MXFP4_BF16
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
#else
    return 0;
#endif
}

/* float to bfloat16, rounding to nearest even as torch's .to(torch.bfloat16) does; NaN stays NaN */
static uint16_t bf16_of(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
}

struct mxfp4_call {
    struct mxfp4_job job; /* expert 0's blocks; x and y of the first group's first token */
    int64_t rows, qs_expert, scale_expert;
    const int64_t (*groups)[2]; /* (expert, tokens), the tokens of each group after the last group's */
    int64_t n_groups;
    const float *bias; /* (experts, rows), or NULL */
};

/* Rows are taken a tile at a time, so that a prompt's tokens, MAX_TOKENS a pass, meet a tile's blocks in
 * L2 (48 rows of 2880 columns are 73 KB) instead of in memory. */
#define ROW_TILE 48

/* From this many tokens a group, float32 activations take the tiled kernel. */
#define FLOAT_TILE_MIN_TOKENS 4

/* One thread's share of the rows of every group's expert. */
static void mxfp4_chunk(void *arg, int chunk, int chunks) {
    const struct mxfp4_call *call = arg;
    const int64_t rows = call->rows, r0 = rows * chunk / chunks, r1 = rows * (chunk + 1) / chunks;
    int64_t first = 0; /* the group's first token */
    for (int64_t g = 0; g < call->n_groups; first += call->groups[g][1], g++) {
        const int64_t expert = call->groups[g][0], tokens = call->groups[g][1];
#ifdef MXFP4_BF16
        if (call->job.x16) {
            struct mxfp4_job job = call->job;
            job.qs += expert * call->qs_expert;
            job.scales += expert * call->scale_expert;
            job.x16 += first * job.cols;
            job.y += first * rows;
            if (tokens)
                mxfp4_rows_bf16(&job, tokens, r0, r1);
        }
        else
#endif
        if (!call->job.x8 && tokens >= FLOAT_TILE_MIN_TOKENS) {
            struct mxfp4_job job = call->job;
            job.qs += expert * call->qs_expert;
            job.scales += expert * call->scale_expert;
            job.x += first * job.cols;
            job.y += first * rows;
            mxfp4_rows_float_tiled(&job, tokens, r0, r1);
        }
        else
        for (int64_t tile = r0; tile < r1; tile += ROW_TILE) {
            const int64_t tile_end = tile + ROW_TILE < r1 ? tile + ROW_TILE : r1;
            /* passes of about equal size (9 tokens as 5 and 4, not 8 and 1: a pass of few tokens is slow) */
            const int64_t passes = (tokens + MAX_TOKENS - 1) / MAX_TOKENS;
            for (int64_t pass = 0, t = 0; pass < passes; pass++) {
                const int64_t pass_tokens = (tokens - t) / (passes - pass);
                struct mxfp4_job job = call->job;
                job.qs += expert * call->qs_expert;
                job.scales += expert * call->scale_expert;
                if (job.x8)
                    job.x8 += first + t;
                else
                    job.x += (first + t) * job.cols;
                job.y += (first + t) * rows;
                job.tokens = (int)pass_tokens;
#define INT8_PASS(n) mxfp4_rows_tokens_int8(&job, n, tile, tile_end)
#define FLOAT32_PASS(n) mxfp4_rows_tokens(&job, n, tile, tile_end)
                if (job.x8)
                    WITH_CONSTANT_TOKENS(job.tokens, INT8_PASS)
                else
                    WITH_CONSTANT_TOKENS(job.tokens, FLOAT32_PASS)
#undef INT8_PASS
#undef FLOAT32_PASS
                t += pass_tokens;
            }
        }
        if (call->bias)
            for (int64_t t = first; t < first + tokens; t++)
                for (int64_t r = r0; r < r1; r++)
                    call->job.y[t * rows + r] += call->bias[expert * rows + r];
    }
}

/* The activations a product takes (trillm/weights/mxfp4.py: ACTIVATIONS): float32 as given, int8 blocks, or
 * bfloat16 (where trillm_mxfp4_has_bf16 says so). */
enum { ACTIVATIONS_FLOAT32 = 0, ACTIVATIONS_INT8 = 1, ACTIVATIONS_BF16 = 2 };

/* y (tokens, rows) = x (tokens, cols) W_e^T + bias_e for a bank of MXFP4 matrices (experts) given by their
 * strides (see the top of this file), in groups: `groups` (n_groups, 2) of (expert e, its token count), the
 * tokens of x and y in group order (the counts summing to `tokens`); `bias` (experts, rows) or NULL.
 * One call for all the experts a layer's tokens are routed to, so that the threads start once.
 * `interleaved` for the Hugging Face element order; `activations` one of ACTIVATIONS_*. Returns OK,
 * ERROR_SHAPE for cols not whole blocks or counts that do not sum to tokens, ERROR_INDEX for an expert out
 * of range, ERROR_TYPE for activations this library or CPU has no kernel for, ERROR_MEMORY. */
int trillm_mxfp4_experts(int interleaved, int activations, const uint8_t *qs, int64_t qs_block, int64_t qs_row,
                         int64_t qs_expert, const uint8_t *scales, int64_t scale_block, int64_t scale_row,
                         int64_t scale_expert, int64_t experts, int64_t rows, int64_t cols, const float *bias,
                         const int64_t (*groups)[2], int64_t n_groups, const float *x, int64_t tokens, float *y) {
    if (activations != ACTIVATIONS_FLOAT32 && activations != ACTIVATIONS_INT8 &&
        (activations != ACTIVATIONS_BF16 || !trillm_mxfp4_has_bf16()))
        return ERROR_TYPE;
    if (cols <= 0 || cols % MXFP4_BLOCK || rows < 0 || tokens < 0 || n_groups < 0)
        return ERROR_SHAPE;
    int64_t counted = 0;
    for (int64_t g = 0; g < n_groups; g++) {
        if (groups[g][0] < 0 || groups[g][0] >= experts)
            return ERROR_INDEX;
        if (groups[g][1] < 0)
            return ERROR_SHAPE;
        counted += groups[g][1];
    }
    if (counted != tokens)
        return ERROR_SHAPE;
    if (rows == 0 || tokens == 0)
        return OK;
    /* the element of each block that the kernel's p-th code meets: the float kernel's lane p holds the low or
     * high nibble of byte MXFP4_LANE_BYTE(p), the int8 and bfloat16 kernels' p < 16 byte p's low, p >= 16 byte
     * p - 16's high; the byte's low nibble is element 2 byte, its high 2 byte + 1 in the release's order, byte
     * and byte + 16 in GGUF's */
    const int float32 = activations == ACTIVATIONS_FLOAT32;
    int element[MXFP4_BLOCK];
    for (int p = 0; p < MXFP4_BLOCK; p++) {
        int byte = float32 ? MXFP4_LANE_BYTE(p) : p % 16, high = float32 ? MXFP4_LANE_HIGH(p) : p / 16;
        element[p] = interleaved ? 2 * byte + high : byte + MXFP4_BLOCK / 2 * high;
    }
    const int64_t blocks = cols / MXFP4_BLOCK;
    /* int8: q (tokens, blocks, 32), offset (tokens, blocks, 8), the rows, and d (tokens, blocks); else
     * floats or bfloat16 (tokens, cols) */
    /* 64-byte aligned: a block's 32 bytes of q or offsets never straddle two cache lines (measured, Zen 4:
     * the misaligned half cost a core 12% of its speed in cache) */
    size_t size = activations == ACTIVATIONS_INT8 ? tokens * (blocks * (MXFP4_BLOCK + 9 * 4) + sizeof(struct q8_row)) :
                  tokens * cols * (float32 ? sizeof(float) : sizeof(uint16_t));
    void *prepared = aligned_alloc(64, (size + 63) / 64 * 64);
    if (!prepared)
        return ERROR_MEMORY;
    struct mxfp4_call call = {{qs, scales, qs_block, qs_row, scale_block, scale_row, cols, NULL, NULL, NULL, 0, y, rows},
                              rows, qs_expert, scale_expert, groups, n_groups, bias};
    if (activations == ACTIVATIONS_INT8) {
        int8_t (*q)[MXFP4_BLOCK] = prepared;
        int32_t (*offset)[8] = (void *)(q + tokens * blocks);
        struct q8_row *x8 = (void *)(offset + tokens * blocks);
        float *d = (float *)(x8 + tokens);
        for (int64_t t = 0; t < tokens; t++) {
            x8[t] = (struct q8_row){q + t * blocks, d + t * blocks, offset + t * blocks};
            quantize_q8_row(x + t * cols, cols, element, x8[t]);
        }
        call.job.x8 = x8;
    } else if (activations == ACTIVATIONS_BF16) {
        uint16_t *x16 = prepared;
        for (int64_t i = 0; i < tokens * cols; i += MXFP4_BLOCK)
            for (int p = 0; p < MXFP4_BLOCK; p++)
                x16[i + p] = bf16_of(x[i + element[p]]);
        call.job.x16 = x16;
    } else {
        float *reordered = prepared;
        for (int64_t i = 0; i < tokens * cols; i += MXFP4_BLOCK)
            for (int p = 0; p < MXFP4_BLOCK; p++)
                reordered[i + p] = x[i + element[p]];
        call.job.x = reordered;
    }
    int64_t bytes = n_groups * rows * blocks * 17;
    run_parallel(mxfp4_chunk, &call, bytes < 32 * 1024 ? 1 : pool_threads(), 1);
    free(prepared);
    return OK;
}
