/* Ternary (BitNet b1.58) matrix products straight from 2-bit weights.
 *
 * Checkpoint layout (transformers' integrations/bitnet.py, pack_weights): uint8 (R, cols), R = rows / 4;
 * byte (p, c) holds the codes w + 1 (00 = -1, 01 = 0, 10 = +1) of rows p, p + R, p + 2R, p + 3R at column c
 * in bits 0-1, 2-3, 4-5, 6-7.
 *
 * Kernel layout ("tiles", made once at load by trillm/weights/ternary.py: tile_ternary): the same bytes,
 * still 2 bits a weight, reordered so that one 64-byte vector holds 16 packed rows times 4 columns:
 * tile (b, g) = bytes (16b + l, 4g + j) at l * 4 + j, for blocks b of 16 packed rows and groups g of 4
 * columns (rows and columns zero-padded to whole tiles). A block's tiles are contiguous, g after g.
 *
 * Arithmetic (transformers' BitLinear, in float32): each token is quantized to int8 with the scale
 * 127 / max|x| (torch computes it as reciprocal(max|x|) * 127); the products are summed as integers; one
 * rescale y = sum / (act_scale * weight_scale). Float32 sums of these integers are exact too, so the
 * results equal transformers' bit for bit.
 *
 * The products take the codes as they are, unsigned: sum((w + 1) x) - sum(x) = sum(w x). With AVX-512
 * VNNI, vpdpbusd multiplies a tile (unsigned codes) by one token's four activations broadcast to all 16
 * lanes and adds the four products into each lane: lane l sums packed row 16b + l. Masking a tile with
 * 0x03, 0x0C, 0x30, 0xC0 (rather than shifting) picks the code of row p + iR times 4^i, an exact factor
 * taken out at the end. So a tile costs 4 ands for any number of tokens and 4 vpdpbusd a token; there
 * are no horizontal sums, and the 16 lanes of a result are 16 consecutive output rows. Up to 6 tokens
 * share a pass over the weights (24 accumulators in registers).
 * AVX2 does the same 8 lanes at a time with _mm256_maddubs_epi16 (codes shifted down, as maddubs would
 * overflow int16 on the masked ones), its int16 pairs added over 32 column groups before one
 * _mm256_madd_epi16 widens them. With 16 registers it takes one code at a time for up to 5 tokens, both
 * halves of a tile (64 bytes) a step, rather than all four codes for 3 tokens, one half (32 bytes) a
 * step: that spilled 10 of its 12 sums to the stack and read each cache line twice. Forced on one Zen 4
 * core, 6912 x 2560 at 128 tokens: 87-98 -> 117-125 G MACs/s; at 8 tokens 70 -> 105-122. One token keeps
 * all four codes of both halves at once (8 sums): one pass over each cache line, where a pass a half
 * read each line twice and streamed 14.6-19.8 GB/s of weights on 2 cores against 20.3-28.5 (13824 x
 * 2560, interleaved runs; AVX-512: 20-31). Tried on
 * AVX2 and dropped: bitnet.cpp's order, the checkpoint's bytes as they are (lanes over 32 columns of a
 * packed row, activations as maddubs' memory operand, no broadcasts, 9 tokens a pass): the same ~125 G
 * MACs/s a core, about one maddubs a cycle, which both kernels reach. Where the CPU has AVX-VNNI (Intel's
 * cores since Alder Lake) the AVX2 kernels take 256-bit vpdpbusd in place of maddubs and its widening, the
 * codes masked in place as AVX-512's are, and 6 tokens a pass: on one core of a Xeon with it, 6912 x 2560 at
 * 128 tokens, 116 -> 188 G MACs/s, two vpdpbusd a cycle. Plain C row by row. Which one a library holds is
 * decided when it is compiled (see kernels.h): the AVX-512 library has the VNNI kernel, the AVX-VNNI and
 * AVX2 libraries the 256-bit ones, the portable library the plain C.
 *
 * Measured on 2 Zen 4 cores (2B4T shapes, weights streamed from memory, a plain read there: 25-40 GB/s):
 * one token 25-40 GB/s of weights, as fast as the plain read; 8 tokens or more ~400 G int8 MACs/s,
 * 128-token prefill ~200 tokens/s over 30 layers, 5-8x torch's float32 matmul on decoded weights. Tried
 * and dropped, each exact: the codes read in checkpoint order (a dot product per packed row, lanes over
 * columns, horizontal sums; at 8+ tokens ~280 G MACs/s), two bit masks per row (x where +1 minus x where
 * -1: 2.5x slower in cache), bitnet.cpp TL1-style lookup tables of pair sums (vpshufb on low and high
 * bytes, int16 sums: 2.2x slower in cache). From memory at one token all reach about the same speed.
 */
#include <stdlib.h>

#include "kernels.h"

/* The kernel this library holds, by the instruction set it is compiled for. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define TERNARY_AVX512 1
#define blocks_kernel avx512_blocks
#elif defined(__AVX2__)
#define TERNARY_AVX2 1
#define blocks_kernel avx2_blocks
#else
#define blocks_kernel plain_blocks
#endif

#define TILE_ROWS 16  /* packed rows a tile: 64 output rows */
#define TILE_BYTES 64 /* 16 packed rows x 4 columns */
#define PASS_TOKENS 6 /* tokens one pass over a block of weights serves (AVX-512) */

/* Few tokens leave so much arithmetic per weight byte that the out-of-order window does not reach far
 * enough ahead to keep memory busy: the kernels prefetch the weights into L2 this far ahead. Measured on
 * 2 Zen 4 cores, 13824 x 2560 at one token: 9 GB/s a thread without, 25 with (a plain read: 25). */
#define PREFETCH_BYTES 8192
/* Below this many weight bytes the calling thread works alone (as in matmul.c). */
#define PARALLEL_MIN_BYTES (32 * 1024)
/* Long prompts are taken in blocks of tokens whose int8 activations stay in L2 while every weight
 * block passes by. */
#define TOKEN_BLOCK_BYTES (512 * 1024)

struct ternary_job {
    const uint8_t *tiles;
    int64_t R, rows, cols, groups; /* rows = 4 R; groups = cols / 4 rounded up */
    const float *w_scale;          /* one scale, or one per output row */
    int per_row_scale;
    int64_t tokens;
    const int8_t *x;               /* token t at x + t * x_stride, zero-padded past cols */
    int64_t x_stride;
    const float *act_scale;        /* per token */
    const int32_t *x_sum;          /* per token: the sum of its int8 activations */
    float *y;                      /* (tokens, rows) */
};

static ALWAYS_INLINE float weight_scale(const struct ternary_job *job, int64_t row) {
    return job->w_scale[job->per_row_scale ? row : 0];
}

/* y[t, row] from the sum of codes times activations. */
static ALWAYS_INLINE void store_output(const struct ternary_job *job, int64_t t, int64_t row, int32_t code_sum) {
    float sum = (float)(code_sum - job->x_sum[t]); /* exact: |sum| < 2^24 (the caller bounds cols) */
    job->y[t * job->rows + row] = sum / (job->act_scale[t] * weight_scale(job, row));
}

/* The four activations of token t at columns 4g..4g+3, as one int32. */
static ALWAYS_INLINE int32_t four_activations(const struct ternary_job *job, int64_t t, int64_t g) {
    int32_t four;
    memcpy(&four, job->x + t * job->x_stride + 4 * g, 4);
    return four;
}

/* ---- Activations --------------------------------------------------------------------------------- */

/* One token to int8 as transformers' BitLinear.activation_quant computes it in float32: scale =
 * reciprocal(max(max|x|, 1e-5)) * 127, q = clamp(round_half_even(x * scale), -128, 127). (In fact
 * |q| <= 127: |x| <= max|x| and the scale is 127 / max|x| within 2 ulp, short of 127.5.) */
static float activation_scale(float absmax) { return (1.0f / (absmax > 1e-5f ? absmax : 1e-5f)) * 127.0f; }

/* In vectors of VLEN (kernels.h), the last cols % VLEN one by one, with the same float32 operations. */
static void quantize_token(const float *x, int64_t cols, int8_t *q, float *scale, int32_t *sum) {
    const int64_t whole = cols / VLEN * VLEN;
    vf magnitude = vf_zero();
    for (int64_t c = 0; c < whole; c += VLEN)
        magnitude = vf_max(vf_abs(vf_load(x + c)), magnitude);
    float absmax = vf_max_all(magnitude);
    for (int64_t c = whole; c < cols; c++)
        absmax = fabsf(x[c]) > absmax ? fabsf(x[c]) : absmax;
    const float s = activation_scale(absmax);
    const vf vs = vf_set(s), low = vf_set(-128.0f), high = vf_set(127.0f);
    vi total = vi_set(0);
    for (int64_t c = 0; c < whole; c += VLEN) {
        vi codes = vi_from_vf(vf_min(vf_max(vf_round(vf_mul(vf_load(x + c), vs)), low), high));
        total = vi_add(total, codes);
        vi_store_i8(q + c, codes);
    }
    int32_t rest = 0;
    for (int64_t c = whole; c < cols; c++) {
        float v = rintf(x[c] * s); /* the default rounding mode: to nearest, ties to even */
        q[c] = (int8_t)(v < -128.0f ? -128.0f : v > 127.0f ? 127.0f : v);
        rest += q[c];
    }
    *scale = s;
    *sum = vi_sum(total) + rest;
}

struct quantize_call {
    const float *x;
    int64_t tokens, cols;
    int8_t *q; /* (tokens, stride) */
    int64_t stride;
    float *scale;
    int32_t *sum;
};

static void quantize_chunk(void *arg, int chunk, int chunks) {
    const struct quantize_call *call = arg;
    for (int64_t t = call->tokens * chunk / chunks; t < call->tokens * (chunk + 1) / chunks; t++) {
        int8_t *q = call->q + t * call->stride;
        quantize_token(call->x + t * call->cols, call->cols, q, call->scale + t, call->sum + t);
        memset(q + call->cols, 0, call->stride - call->cols);
    }
}

/* ---- Plain C ------------------------------------------------------------------------------------- */

#if !TERNARY_AVX2 && !TERNARY_AVX512
static void plain_blocks(const struct ternary_job *job, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *block = job->tiles + b * job->groups * TILE_BYTES;
        for (int64_t t = 0; t < job->tokens; t++) {
            int32_t sum[4][TILE_ROWS] = {{0}};
            for (int64_t g = 0; g < job->groups; g++) {
                const int8_t *x = job->x + t * job->x_stride + 4 * g;
                for (int l = 0; l < TILE_ROWS; l++)
                    for (int j = 0; j < 4; j++)
                        for (int i = 0; i < 4; i++)
                            sum[i][l] += (block[g * TILE_BYTES + l * 4 + j] >> (2 * i) & 3) * x[j];
            }
            for (int l = 0; l < TILE_ROWS && TILE_ROWS * b + l < job->R; l++)
                for (int i = 0; i < 4; i++)
                    store_output(job, t, TILE_ROWS * b + l + i * job->R, sum[i][l]);
        }
    }
}
#endif

#if TERNARY_AVX2 || TERNARY_AVX512
/* The tokens of the next pass over a block, of the `left` still to do: passes of at most `most` tokens, as
 * even as possible (8 tokens in passes of 6: 4 + 4, not 6 + 2). */
static ALWAYS_INLINE int pass_tokens(int64_t left, int most) {
    const int64_t passes = (left + most - 1) / most;
    return (int)((left + passes - 1) / passes);
}

/* Blocks b0..b1 are contiguous: start the prefetch that the kernels then keep PREFETCH_BYTES ahead. */
static ALWAYS_INLINE void prefetch_start(const struct ternary_job *job, int64_t b0, int64_t b1) {
    const uint8_t *first = job->tiles + b0 * job->groups * TILE_BYTES;
    for (int64_t offset = 0; offset < (b1 - b0) * job->groups * TILE_BYTES && offset < PREFETCH_BYTES; offset += 64)
        _mm_prefetch((const char *)(first + offset), _MM_HINT_T1);
}
#endif

/* ---- AVX2: each tile as two halves of 8 packed rows -------------------------------------------------- */

#if TERNARY_AVX2
/* Groups of columns whose products add up in int16 before they widen to int32: a pair of products is at
 * most 2 * 2 * 128 = 512, and AVX2 has no instruction that widens them on the way (VNNI's vpdpbusd). With
 * VNNI the runs of several tokens only keep in L1 the bytes that the passes of the four codes share. */
#define INT16_GROUPS 32

/* AVX2 has 16 vector registers: see the top of this file for how the kernels below fit in them. */
#define AVX2_PASS_TOKENS (VNNI_256 ? 6 : 5) /* VNNI's dot products need no register for the products */

/* acc + the products of unsigned u8 and signed s8, summed in pairs into int16 lanes (AVX2's maddubs), or
 * where VNNI_256 (kernels.h) in fours into int32 lanes. Inline assembly because gcc 12 otherwise adds into
 * a copy and moves it back, an instruction more for each product. */
static ALWAYS_INLINE __m256i add_products(__m256i acc, __m256i u8, __m256i s8) {
#if VNNI_256
    return dpbusd_256(acc, u8, s8);
#elif defined(__GNUC__) && !defined(__clang__)
    __m256i products;
    __asm__("vpmaddubsw %3, %2, %1\n\tvpaddw %1, %0, %0" : "+x"(acc), "=&x"(products) : "x"(u8), "x"(s8));
    return acc;
#else
    return _mm256_add_epi16(acc, _mm256_maddubs_epi16(u8, s8));
#endif
}

/* Code i of each byte: shifted down for maddubs (its int16 pairs would overflow on the masked ones), masked
 * in place with VNNI (the code times 4^i, one instruction fewer). */
static ALWAYS_INLINE __m256i code_of(__m256i bytes, int i) {
    if (VNNI_256)
        return _mm256_and_si256(bytes, _mm256_set1_epi8((char)(3 << (2 * i))));
    return _mm256_and_si256(_mm256_srli_epi16(bytes, 2 * i), _mm256_set1_epi8(3));
}

/* A run's sums of code i (add_products of code_of) as int32 sums of the codes themselves. */
static ALWAYS_INLINE __m256i widen_sums(__m256i partial, int i) {
    return VNNI_256 ? _mm256_srai_epi32(partial, 2 * i) : _mm256_madd_epi16(partial, _mm256_set1_epi16(1));
}

/* y for token t at the 8 output rows 16b + 8h + l + iR (fewer in a last, partial block) from their sums of
 * codes times activations, as store_output computes them. */
static ALWAYS_INLINE void avx2_store(const struct ternary_job *job, int64_t b, int h, int i, int64_t t, __m256i code_sum) {
    const int64_t first = TILE_ROWS * b + 8 * h, live = job->R - first, row = first + i * job->R;
    const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(live > 8 ? 8 : (int)live), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 w_scale = job->per_row_scale ? _mm256_maskload_ps(job->w_scale + row, valid) : _mm256_set1_ps(job->w_scale[0]);
    const __m256 sum = _mm256_cvtepi32_ps(_mm256_sub_epi32(code_sum, _mm256_set1_epi32(job->x_sum[t])));
    const __m256 y = _mm256_div_ps(sum, _mm256_mul_ps(_mm256_set1_ps(job->act_scale[t]), w_scale));
    if (live >= 8) /* a plain store: AMD's masked stores (vmaskmovps) cost ~10x, measured 1.5x a 13824-row matmul */
        _mm256_storeu_ps(job->y + t * job->rows + row, y);
    else
        _mm256_maskstore_ps(job->y + t * job->rows + row, valid, y);
}

/* Block b (both halves) for token t, all four codes of a tile at once: one pass over the block's bytes,
 * each cache line read whole once (8 int16 sums, 16 registers in all). VNNI's int32 sums need no runs. */
static ALWAYS_INLINE void avx2_block_one_token(const struct ternary_job *job, int64_t b, int64_t t) {
    const uint8_t *tiles = job->tiles + b * job->groups * TILE_BYTES;
    const int64_t run = VNNI_256 ? job->groups : INT16_GROUPS;
    __m256i acc[2][4], partial[2][4];
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < 4; i++)
            acc[h][i] = _mm256_setzero_si256();
    for (int64_t g0 = 0; g0 < job->groups; g0 += run) {
        const int64_t g1 = g0 + run < job->groups ? g0 + run : job->groups;
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 4; i++)
                partial[h][i] = _mm256_setzero_si256();
        for (int64_t g = g0; g < g1; g++) {
            _mm_prefetch((const char *)(tiles + g * TILE_BYTES + PREFETCH_BYTES), _MM_HINT_T1);
            const __m256i x = _mm256_set1_epi32(four_activations(job, t, g));
            for (int h = 0; h < 2; h++) {
                const __m256i bytes = _mm256_loadu_si256((const __m256i *)(tiles + g * TILE_BYTES + 32 * h));
                for (int i = 0; i < 4; i++)
                    partial[h][i] = add_products(partial[h][i], code_of(bytes, i), x);
            }
        }
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 4; i++)
                acc[h][i] = _mm256_add_epi32(acc[h][i], widen_sums(partial[h][i], i));
    }
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < 4; i++)
            avx2_store(job, b, h, i, t, acc[h][i]);
}

/* Block b (both halves) for tokens t0..t0+nt-1, nt <= AVX2_PASS_TOKENS, one code at a time over a run of
 * INT16_GROUPS tiles (2 KB, in L1). */
static ALWAYS_INLINE void avx2_block_many(const struct ternary_job *job, int64_t b, int64_t t0, const int nt) {
    const uint8_t *tiles = job->tiles + b * job->groups * TILE_BYTES;
    __m256i acc[2][4][AVX2_PASS_TOKENS];
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < 4; i++)
            for (int t = 0; t < nt; t++)
                acc[h][i][t] = _mm256_setzero_si256();
    for (int64_t g0 = 0; g0 < job->groups; g0 += INT16_GROUPS) {
        const int64_t g1 = g0 + INT16_GROUPS < job->groups ? g0 + INT16_GROUPS : job->groups;
        for (int i = 0; i < 4; i++) {
            __m256i partial[2][AVX2_PASS_TOKENS];
            for (int h = 0; h < 2; h++)
                for (int t = 0; t < nt; t++)
                    partial[h][t] = _mm256_setzero_si256();
            for (int64_t g = g0; g < g1; g++) {
                if (i == 0)
                    _mm_prefetch((const char *)(tiles + g * TILE_BYTES + PREFETCH_BYTES), _MM_HINT_T1);
                __m256i codes[2];
                for (int h = 0; h < 2; h++)
                    codes[h] = code_of(_mm256_loadu_si256((const __m256i *)(tiles + g * TILE_BYTES + 32 * h)), i);
                for (int t = 0; t < nt; t++) {
                    __m256i x = _mm256_set1_epi32(four_activations(job, t0 + t, g));
                    for (int h = 0; h < 2; h++)
                        partial[h][t] = add_products(partial[h][t], codes[h], x);
                }
            }
            for (int h = 0; h < 2; h++)
                for (int t = 0; t < nt; t++)
                    acc[h][i][t] = _mm256_add_epi32(acc[h][i][t], widen_sums(partial[h][t], i));
        }
    }
    for (int t = 0; t < nt; t++)
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 4; i++)
                avx2_store(job, b, h, i, t0 + t, acc[h][i][t]);
}

static void avx2_blocks(const struct ternary_job *job, int64_t b0, int64_t b1) {
    prefetch_start(job, b0, b1);
    for (int64_t b = b0; b < b1; b++)
        for (int64_t t = 0; t < job->tokens;) {
            const int nt = pass_tokens(job->tokens - t, AVX2_PASS_TOKENS);
            switch (nt) { /* the token count a constant, so the sums live in registers */
            case 1: avx2_block_one_token(job, b, t); break;
            case 2: avx2_block_many(job, b, t, 2); break;
            case 3: avx2_block_many(job, b, t, 3); break;
            case 4: avx2_block_many(job, b, t, 4); break;
            case 5: avx2_block_many(job, b, t, 5); break;
            default: avx2_block_many(job, b, t, AVX2_PASS_TOKENS); break;
            }
            t += nt;
        }
}

#endif

/* ---- AVX-512 VNNI ---------------------------------------------------------------------------------- */

#if TERNARY_AVX512

/* acc + the dot products of the 4-byte groups of unsigned u8 and signed s8, in 16 int32 lanes. Inline
 * assembly because gcc 12 otherwise copies each accumulator to another register around each one. */
static ALWAYS_INLINE __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
#if defined(__GNUC__) && !defined(__clang__)
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
    return acc;
#else
    return _mm512_dpbusd_epi32(acc, u8, s8);
#endif
}

/* One tile times nt tokens' four activations, into acc[i][t] for the rows p + iR. */
static ALWAYS_INLINE void avx512_tile(__m512i acc[4][PASS_TOKENS], const uint8_t *tile, const struct ternary_job *job,
                                      int64_t t0, int64_t g, const int nt) {
    __m512i bytes = _mm512_loadu_si512(tile), codes[4], x[PASS_TOKENS];
    for (int i = 0; i < 4; i++) /* byte masks 0x03, 0x0C, 0x30, 0xC0: row i's code times 4^i */
        codes[i] = _mm512_and_si512(bytes, _mm512_set1_epi8((char)(3 << (2 * i))));
    for (int t = 0; t < nt; t++) {
        x[t] = _mm512_set1_epi32(four_activations(job, t0 + t, g));
        for (int i = 0; i < 4; i++)
            acc[i][t] = dpbusd(acc[i][t], codes[i], x[t]);
    }
}

/* Block b (packed rows 16b..16b+15, outputs 16b + l + iR) for tokens t0..t0+nt-1. One token has two sets
 * of accumulators for alternate tiles, so that consecutive vpdpbusd do not wait on each other. */
static ALWAYS_INLINE void avx512_block(const struct ternary_job *job, int64_t b, int64_t t0, const int nt) {
    const int sets = nt == 1 ? 2 : 1;
    const int64_t groups = job->groups, paired = groups / sets * sets;
    const uint8_t *tiles = job->tiles + b * groups * TILE_BYTES;
    __m512i acc[2][4][PASS_TOKENS];
    for (int k = 0; k < sets; k++)
        for (int i = 0; i < 4; i++)
            for (int t = 0; t < nt; t++)
                acc[k][i][t] = _mm512_setzero_si512();
    for (int64_t g = 0; g < paired; g += sets)
        for (int k = 0; k < sets; k++) {
            _mm_prefetch((const char *)(tiles + (g + k) * TILE_BYTES + PREFETCH_BYTES), _MM_HINT_T1);
            avx512_tile(acc[k], tiles + (g + k) * TILE_BYTES, job, t0, g + k, nt);
        }
    if (paired < groups)
        avx512_tile(acc[0], tiles + paired * TILE_BYTES, job, t0, paired, nt);
    for (int k = 1; k < sets; k++)
        for (int i = 0; i < 4; i++)
            acc[0][i][0] = _mm512_add_epi32(acc[0][i][0], acc[k][i][0]);

    /* Lanes are 16 consecutive output rows (fewer in a last, partial block). */
    int64_t live = job->R - TILE_ROWS * b;
    __mmask16 valid = live >= 16 ? 0xffff : (__mmask16)((1u << live) - 1);
    for (int i = 0; i < 4; i++) {
        int64_t row = TILE_ROWS * b + i * job->R;
        __m512 w_scale = job->per_row_scale ? _mm512_maskz_loadu_ps(valid, job->w_scale + row)
                                            : _mm512_set1_ps(job->w_scale[0]);
        for (int t = 0; t < nt; t++) {
            __m512i sum = _mm512_sub_epi32(_mm512_srai_epi32(acc[0][i][t], 2 * i),
                                           _mm512_set1_epi32(job->x_sum[t0 + t]));
            __m512 y = _mm512_div_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(_mm512_set1_ps(job->act_scale[t0 + t]), w_scale));
            _mm512_mask_storeu_ps(job->y + (t0 + t) * job->rows + row, valid, y);
        }
    }
}

static void avx512_blocks(const struct ternary_job *job, int64_t b0, int64_t b1) {
    prefetch_start(job, b0, b1);
    for (int64_t b = b0; b < b1; b++)
        for (int64_t t = 0; t < job->tokens;) {
            const int nt = pass_tokens(job->tokens - t, PASS_TOKENS);
            switch (nt) { /* the token count a constant, so the accumulators live in registers */
            case 1: avx512_block(job, b, t, 1); break;
            case 2: avx512_block(job, b, t, 2); break;
            case 3: avx512_block(job, b, t, 3); break;
            case 4: avx512_block(job, b, t, 4); break;
            case 5: avx512_block(job, b, t, 5); break;
            default: avx512_block(job, b, t, 6); break;
            }
            t += nt;
        }
}

#endif

/* ---- Entry points -------------------------------------------------------------------------------- */


/* The activation quantizer alone, for tests: x (tokens, cols) -> q (tokens, cols), scale (tokens). */
void trillm_ternary_quantize(const float *x, int64_t tokens, int64_t cols, int8_t *q, float *scale) {
    int32_t sum;
    for (int64_t t = 0; t < tokens; t++)
        quantize_token(x + t * cols, cols, q + t * cols, scale + t, &sum);
}

static void blocks_chunk(void *arg, int chunk, int chunks) {
    const struct ternary_job *job = arg;
    int64_t blocks = (job->R + TILE_ROWS - 1) / TILE_ROWS;
    blocks_kernel(job, blocks * chunk / chunks, blocks * (chunk + 1) / chunks);
}

/* y (tokens, rows) = transformers' BitLinear of x (tokens, cols) float32, with weights given as tiles
 * (see the top of this file) and weight_scale of scale_count = 1 or rows entries. Returns 0 or an error
 * code (kernels.h). */
int trillm_ternary_matmul(const uint8_t *tiles, int64_t rows, int64_t cols, const float *w_scale,
                          int64_t scale_count, const float *x, int64_t tokens, float *y) {
    if (rows % 4 || cols <= 0 || cols > (1 << 17) || tokens < 0 || (scale_count != 1 && scale_count != rows))
        return ERROR_SHAPE;
    if (tokens == 0 || rows == 0)
        return OK;
    const int64_t stride = (cols + 63) / 64 * 64;
    uint8_t *scratch = aligned_alloc(64, tokens * stride + (tokens * 8 + 63) / 64 * 64);
    if (!scratch)
        return ERROR_MEMORY;
    int8_t *q = (int8_t *)scratch;
    float *act_scale = (float *)(scratch + tokens * stride);
    int32_t *x_sum = (int32_t *)(act_scale + tokens);
    struct quantize_call quantize = {x, tokens, cols, q, stride, act_scale, x_sum};
    run_parallel(quantize_chunk, &quantize, tokens * cols < 64 * 1024 ? 1 : pool_threads(), 1);

    struct ternary_job job = {.tiles = tiles, .R = rows / 4, .rows = rows, .cols = cols, .groups = (cols + 3) / 4,
                              .w_scale = w_scale, .per_row_scale = scale_count != 1, .x_stride = stride};
    const int threads = rows / 4 * cols < PARALLEL_MIN_BYTES ? 1 : pool_threads();
    const int64_t block = TOKEN_BLOCK_BYTES / stride > PASS_TOKENS ? TOKEN_BLOCK_BYTES / stride : PASS_TOKENS;
    for (int64_t t0 = 0; t0 < tokens; t0 += block) {
        job.tokens = tokens - t0 < block ? tokens - t0 : block;
        job.x = q + t0 * stride;
        job.act_scale = act_scale + t0;
        job.x_sum = x_sum + t0;
        job.y = y + t0 * rows;
        run_parallel(blocks_chunk, &job, threads, 1);
    }
    free(scratch);
    return OK;
}

/* The position of the first byte holding a code 3 (binary 11, no ternary value) among n, or -1. */
int64_t trillm_ternary_find_invalid(const uint8_t *packed, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (packed[i] & packed[i] >> 1 & 0x55)
            return i;
    return -1;
}
