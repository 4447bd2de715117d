/* GGML block formats: matrix products straight from the stored blocks, and block decoding.
 *
 * Block layouts follow llama.cpp's ggml-common.h and dequantize_row_* in ggml-quants.c. Unlike
 * llama.cpp's vec_dot kernels, the first kernels here keep the activations float32 (never quantized), so
 * a product equals a float32 matmul over the dequantized weights, which is what transformers computes for
 * a GGUF file, up to summation order; the int8 kernels at the end compute as llama.cpp does, from
 * activations quantized to int8 (asked for with --activations int8, and by output heads kept in Q6_K).
 *
 * Each format is one function giving the i-th vector (VLEN weights) of a block, decoded to floats; one
 * generic loop turns it into the matmul, another into the row decoder. Called with constant arguments
 * and fully unrolled, the compiler merges the loads and scale conversions the vectors of a block share.
 */
#include "kernels.h"

typedef vf block_vector_fn(const uint8_t *block, int i);

/* Q8_0, 34 bytes: fp16 d, 32 int8 q. w = d * q */
static ALWAYS_INLINE vf q8_0_vector(const uint8_t *b, int i) {
    return vf_mul(vi_float(vi_i8(b + 2 + i * VLEN)), vf_set(fp16_at(b)));
}

#if defined(__AVX2__)
/* Q5_0 / Q5_1's fifth bits, bit j of the little-endian uint32 at qh, as 16 (set) or 0 in byte j. */
static ALWAYS_INLINE __m256i fifth_bit_bytes(const uint8_t *qh) {
    const __m256i byte_of_bit = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201);
    __m256i fifth = _mm256_shuffle_epi8(_mm256_set1_epi32((int32_t)u32_at(qh)), byte_of_bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(fifth, bit), bit), _mm256_set1_epi8(16));
}
#endif

/* Q5_0 / Q5_1 codes: the nibble plus a fifth bit, bit j of a little-endian uint32 for weight j. */
static ALWAYS_INLINE vi five_bit_codes(const uint8_t *qh, const uint8_t *qs, int i) {
#if VLEN == 8
    /* all 32 codes as bytes (shared by the block's four vectors, inlined together), then 8 of them: half
     * the instructions of spreading each vector's bits to its lanes (Q5_0 decoded at ~7 GB/s that way) */
    __m256i codes = _mm256_or_si256(nibble_bytes(qs), fifth_bit_bytes(qh));
    __m128i half = i < 2 ? _mm256_castsi256_si128(codes) : _mm256_extracti128_si256(codes, 1);
    return _mm256_cvtepu8_epi32(i % 2 ? _mm_srli_si128(half, 8) : half);
#else
    vi fifth = vi_shl(vi_bits(u32_at(qh) >> (i * VLEN)), 4);
    return vi_or(vi_and(nibbles(qs, i), vi_set(15)), fifth);
#endif
}

/* Q4_0, 18 bytes: fp16 d, 16 bytes of nibbles. w = d * (q - 8) */
static ALWAYS_INLINE vf q4_0_vector(const uint8_t *b, int i) {
    float d = fp16_at(b);
    return vf_codes16(nibbles(b + 2, i), d, -8 * d);
}

/* Q4_1, 20 bytes: fp16 d, fp16 m, 16 bytes of nibbles. w = d * q + m */
static ALWAYS_INLINE vf q4_1_vector(const uint8_t *b, int i) {
    return vf_codes16(nibbles(b + 4, i), fp16_at(b), fp16_at(b + 2));
}

/* Q5_0, 22 bytes: fp16 d, 4 bytes of fifth bits, 16 bytes of nibbles. w = d * (q - 16) */
static ALWAYS_INLINE vf q5_0_vector(const uint8_t *b, int i) {
    float d = fp16_at(b);
    return vf_codes32(five_bit_codes(b + 2, b + 6, i), d, -16 * d);
}

/* Q5_1, 24 bytes: fp16 d, fp16 m, 4 bytes of fifth bits, 16 bytes of nibbles. w = d * q + m */
static ALWAYS_INLINE vf q5_1_vector(const uint8_t *b, int i) {
    return vf_codes32(five_bit_codes(b + 4, b + 8, i), fp16_at(b), fp16_at(b + 2));
}

/* Q4_K and Q5_K hold 256 weights in 8 sub-blocks of 32; 12 bytes pack each sub-block's 6-bit scale and
 * 6-bit min (get_scale_min_k4 in ggml-quants.c). */
static ALWAYS_INLINE void k_scale_min(const uint8_t *s, int sub, int *scale, int *min) {
    if (sub < 4) {
        *scale = s[sub] & 63;
        *min = s[sub + 4] & 63;
    } else {
        *scale = (s[sub + 4] & 15) | ((s[sub - 4] >> 6) << 4);
        *min = (s[sub + 4] >> 4) | ((s[sub] >> 6) << 4);
    }
}

/* Q4_K, 144 bytes: fp16 d, fp16 dmin, 12 bytes of scales and mins, 128 bytes of nibbles where sub-blocks
 * 2k and 2k + 1 share bytes 32k..32k+31 (low and high nibbles). w = d * scale * q - dmin * min */
static ALWAYS_INLINE vf q4_k_vector(const uint8_t *b, int i) {
    int first = i * VLEN, sub = first / 32, scale, min;
    k_scale_min(b + 4, sub, &scale, &min);
    vi bytes = vi_u8(b + 16 + 32 * (sub / 2) + first % 32);
    return vf_codes16(sub % 2 ? vi_shr(bytes, 4) : bytes, fp16_at(b) * scale, -(fp16_at(b + 2) * min));
}

/* Q5_K, 176 bytes: as Q4_K with 32 bytes of fifth bits before the nibbles: bit s of byte j belongs to
 * weight j of sub-block s. */
static ALWAYS_INLINE vf q5_k_vector(const uint8_t *b, int i) {
    int first = i * VLEN, sub = first / 32, scale, min;
    k_scale_min(b + 4, sub, &scale, &min);
    vi bytes = vi_u8(b + 48 + 32 * (sub / 2) + first % 32);
    vi low = sub % 2 ? vi_shr(bytes, 4) : vi_and(bytes, vi_set(15));
    vi high = vi_shl(vi_and(vi_shr(vi_u8(b + 16 + first % 32), sub), vi_set(1)), 4);
    return vf_codes32(vi_or(low, high), fp16_at(b) * scale, -(fp16_at(b + 2) * min));
}

/* Q6_K, 210 bytes: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales (one per 16
 * weights), fp16 d. Each half of 128 weights is four quarters of 32: quarters 0 and 1 take the low
 * nibbles of the half's 64 bytes, quarters 2 and 3 the high ones; quarter k takes bits 2k, 2k+1 of the
 * half's 32 high-bit bytes. w = d * scale * (q - 32) */
static ALWAYS_INLINE vf q6_k_vector(const uint8_t *b, int i) {
    int first = i * VLEN, half = first / 128, quarter = first % 128 / 32, j = first % 32;
    vi low_bytes = vi_u8(b + 64 * half + 32 * (quarter % 2) + j);
    vi low = quarter < 2 ? vi_and(low_bytes, vi_set(15)) : vi_shr(low_bytes, 4);
    vi high = vi_shl(vi_and(vi_shr(vi_u8(b + 128 + 32 * half + j), 2 * quarter), vi_set(3)), 4);
    float scale = fp16_at(b + 208) * (int8_t)b[192 + first / 16];
    return vf_mul(vi_float(vi_sub(vi_or(low, high), vi_set(32))), vf_set(scale));
}

/* ---- The generic loops ---------------------------------------------------------------------------- */

/* A matmul over rows r0..r1 for a constant number of tokens: the decoded weights stay in registers and
 * serve every token, so each weight byte is read once per pass. */
static ALWAYS_INLINE void block_matmul_tokens(block_vector_fn *vector, int block_elems, int block_bytes, const int tokens,
                                              const struct matmul_job *job, int64_t r0, int64_t r1) {
    const int64_t cols = job->cols;
    const float *x = job->x;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *block = job->w + r * job->row_bytes;
        vf acc[MAX_TOKENS][2]; /* two accumulators a token, so consecutive FMAs do not wait on each other */
        for (int t = 0; t < tokens; t++)
            acc[t][0] = acc[t][1] = vf_zero();
        for (int64_t c = 0; c < cols; c += block_elems, block += block_bytes) {
            prefetch_row_ahead(block, block_bytes);
#pragma GCC unroll 16
            for (int i = 0; i < block_elems / VLEN; i++) {
                vf weights = vector(block, i);
#pragma GCC unroll 8
                for (int t = 0; t < tokens; t++)
                    acc[t][i % 2] = vf_fma(weights, vf_load(x + t * cols + c + i * VLEN), acc[t][i % 2]);
            }
        }
        for (int t = 0; t < tokens; t++)
            job->y[t * job->y_stride + r] = vf_sum(vf_add(acc[t][0], acc[t][1]));
    }
}

/* The token count made a constant, so the accumulators live in registers. */
static ALWAYS_INLINE void block_matmul_rows(block_vector_fn *vector, int block_elems, int block_bytes,
                                            const struct matmul_job *job, int64_t r0, int64_t r1) {
#define BLOCK_TOKENS(n) block_matmul_tokens(vector, block_elems, block_bytes, n, job, r0, r1)
    WITH_CONSTANT_TOKENS(job->tokens, BLOCK_TOKENS)
#undef BLOCK_TOKENS
}

static ALWAYS_INLINE void block_decode_row(block_vector_fn *vector, int block_elems, int block_bytes,
                                           const uint8_t *block, int64_t cols, float *restrict out) {
    for (int64_t c = 0; c < cols; c += block_elems, block += block_bytes)
#pragma GCC unroll 16
        for (int i = 0; i < block_elems / VLEN; i++)
            vf_store(out + c + i * VLEN, vector(block, i));
}

/* A format's two row kernels, made from its block-vector function. */
#define BLOCK_FORMAT(name, block_elems, block_bytes)                                                        \
    static void name##_matmul_rows(const struct matmul_job *job, int64_t r0, int64_t r1) {                 \
        block_matmul_rows(name##_vector, block_elems, block_bytes, job, r0, r1);                           \
    }                                                                                                      \
    static void name##_decode_row(const uint8_t *row, int64_t cols, float *restrict out) {                 \
        block_decode_row(name##_vector, block_elems, block_bytes, row, cols, out);                         \
    }

BLOCK_FORMAT(q8_0, 32, 34)
BLOCK_FORMAT(q4_0, 32, 18)
BLOCK_FORMAT(q4_1, 32, 20)
BLOCK_FORMAT(q5_0, 32, 22)
BLOCK_FORMAT(q5_1, 32, 24)
BLOCK_FORMAT(q4_k, 256, 144)
BLOCK_FORMAT(q5_k, 256, 176)
BLOCK_FORMAT(q6_k, 256, 210)

/* ---- Q6_K times int8 activations ------------------------------------------------------------------
 *
 * The float kernel above spends about a dozen vector instructions on every 16 Q6_K weights and so reads
 * them at ~7 GB/s a core, half of what memory delivers. This one computes as llama.cpp does
 * (ggml_vec_dot_q6_K_q8_K): each token's activations are quantized once a call to int8, a float scale
 * per 256 (quantize_q8_k), and a block's products are integers. maddubs multiplies the unsigned 6-bit
 * codes (0..63) by the int8 activations and adds pairs into int16 (at most 2 * 63 * 127: no saturation);
 * a multiply-add by the 16-weight sub-blocks' int8 scales widens them to int32; and w = q - 32 is paid
 * once per sub-block, sum (q - 32) x = sum q x - 32 sum x, from the sums of each 16 activations. A
 * block's int32 total (|.| < 2^29 at every step) is scaled once, by d_w * d_x, in float. Measured on 2
 * Zen 4 cores, 2B4T's head (128256 x 2560, 269 MB): 10 ms at one token, 26 GB/s, the memory's speed
 * (float activations: 25 ms), 12 ms at four (35). In cache, one core: 28 GB/s at one token, 7 at eight.
 */

/* n activations (a multiple of 16) to int8 q with the scale 127 / max|x|, rounded to nearest even (|q| <= 127),
 * and sums[j] = q[g j] + ... + q[g j + g - 1] for groups of g = 16 or 32; returns the block's d = max|x| / 127.
 * A NaN is passed over in the maximum, as fabsf(x) > max would. trillm/weights/linear.py: round_to_int8
 * computes the same, operation for operation. */
static ALWAYS_INLINE float round_block_to_int8(const float *x, const int n, const int g, int8_t *q, int32_t *sums) {
    vf magnitude = vf_zero();
    for (int i = 0; i < n; i += VLEN)
        magnitude = vf_max(vf_abs(vf_load(x + i)), magnitude);
    const float absmax = vf_max_all(magnitude);
    const vf iscale = vf_set(absmax > 0.0f ? 127.0f / absmax : 0.0f);
    for (int j = 0; j < n / g; j++) {
        int32_t sum = 0;
        for (int i = g * j; i < g * j + g; i += VLEN) {
            vi codes = vi_from_vf(vf_round(vf_mul(vf_load(x + i), iscale)));
            vi_store_i8(q + i, codes);
            sum += vi_sum(codes);
        }
        sums[j] = sum;
    }
    return absmax / 127.0f;
}

/* 256 activations to int8 as llama.cpp's quantize_row_q8_K, with their sums per 16. */
void quantize_q8_k(const float *x, struct q8_k_block *out) {
    int32_t sums[QK_K / 16];
    out->d = round_block_to_int8(x, QK_K, 16, out->q, sums);
    for (int j = 0; j < QK_K / 16; j++)
        out->sums[j] = (int16_t)sums[j];
}

#if defined(__AVX512BW__)
/* A block as four vectors of 64 codes (weights 64v..64v+63) and, for each, the scale of every int16 pair
 * that maddubs makes of it (8 pairs a sub-block). */
struct q6_k_unpacked {
    __m512i codes[4], scales[4];
    __m256i minus_32_scales; /* -32 s of the 16 sub-blocks, int16 */
};

static ALWAYS_INLINE void q6_k_unpack(const uint8_t *b, struct q6_k_unpacked *u) {
    static const uint8_t pair_sub_block[32] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                               2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
    const __m512i low4 = _mm512_set1_epi8(0x0F), bits45 = _mm512_set1_epi8(0x30);
    /* 16-bit shift counts: one for the first 32 bytes of a vector, another for the last 32 */
    const __m512i left_4_2 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i right_0_2 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    for (int h = 0; h < 2; h++) { /* a half: 64 bytes of nibbles, 32 of high bit pairs, in both 256-bit lanes */
        __m512i low = _mm512_loadu_si512(b + 64 * h);
        __m512i high = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h)));
        /* quarters 0, 1: the low nibbles, and high bits 0-1 and 2-3 moved to bits 4-5 */
        u->codes[2 * h] = _mm512_or_si512(_mm512_and_si512(low, low4),
                                          _mm512_and_si512(_mm512_sllv_epi16(high, left_4_2), bits45));
        /* quarters 2, 3: the high nibbles, and high bits 4-5 and 6-7 */
        u->codes[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(low, 4), low4),
                                              _mm512_and_si512(_mm512_srlv_epi16(high, right_0_2), bits45));
    }
    __m256i scales = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192)));
    __m512i first = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)pair_sub_block));
    for (int v = 0; v < 4; v++)
        u->scales[v] = _mm512_permutexvar_epi16(_mm512_add_epi16(first, _mm512_set1_epi16((short)(4 * v))),
                                                _mm512_castsi256_si512(scales));
    u->minus_32_scales = _mm256_mullo_epi16(scales, _mm256_set1_epi16(-32));
}

/* acc + the sums of adjacent products of int16 lanes, in int32 lanes. */
static ALWAYS_INLINE __m512i madd_add(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

/* The block's sum of (q - 32) * s * x, spread over the lanes. */
static ALWAYS_INLINE vi q6_k_dot(const struct q6_k_unpacked *u, const struct q8_k_block *x) {
    __m256i sums = _mm256_loadu_si256((const __m256i *)x->sums);
    __m512i acc = _mm512_zextsi256_si512(_mm256_madd_epi16(u->minus_32_scales, sums));
    for (int v = 0; v < 4; v++)
        acc = madd_add(acc, _mm512_maddubs_epi16(u->codes[v], _mm512_loadu_si512(x->q + 64 * v)), u->scales[v]);
    return acc;
}

#elif defined(__AVX2__) && VLEN == 8
/* As above, with eight vectors of 32 codes (weights 32v..32v+31). */
struct q6_k_unpacked {
    __m256i codes[8], scales[8];
    __m256i minus_32_scales;
};

static ALWAYS_INLINE void q6_k_unpack(const uint8_t *b, struct q6_k_unpacked *u) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), bits45 = _mm256_set1_epi8(0x30);
    for (int h = 0; h < 2; h++) {
        __m256i low0 = _mm256_loadu_si256((const __m256i *)(b + 64 * h));
        __m256i low1 = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32));
        __m256i high = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
        /* quarter k: a nibble, and high bits 2k, 2k + 1 moved to bits 4-5 */
        u->codes[4 * h] = _mm256_or_si256(_mm256_and_si256(low0, low4),
                                          _mm256_and_si256(_mm256_slli_epi16(high, 4), bits45));
        u->codes[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(low1, low4),
                                              _mm256_and_si256(_mm256_slli_epi16(high, 2), bits45));
        u->codes[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(low0, 4), low4),
                                              _mm256_and_si256(high, bits45));
        u->codes[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(low1, 4), low4),
                                              _mm256_and_si256(_mm256_srli_epi16(high, 2), bits45));
    }
    __m128i scales = _mm_loadu_si128((const __m128i *)(b + 192));
    const __m128i pair_sub_block = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    for (int v = 0; v < 8; v++) {
        __m128i sub_blocks = _mm_add_epi8(pair_sub_block, _mm_set1_epi8((char)(2 * v)));
        u->scales[v] = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, sub_blocks));
    }
    u->minus_32_scales = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(scales), _mm256_set1_epi16(-32));
}

static ALWAYS_INLINE vi q6_k_dot(const struct q6_k_unpacked *u, const struct q8_k_block *x) {
    __m256i acc = _mm256_madd_epi16(u->minus_32_scales, _mm256_loadu_si256((const __m256i *)x->sums));
    for (int v = 0; v < 8; v++) {
        __m256i products = _mm256_maddubs_epi16(u->codes[v], _mm256_loadu_si256((const __m256i *)(x->q + 32 * v)));
        acc = madd_add_256(acc, products, u->scales[v]);
    }
    return acc;
}

#else
/* Plain C, the codes read in place. Also taken by AVX-512 CPUs without its byte instructions (BW). */
struct q6_k_unpacked {
    const uint8_t *block;
};

static ALWAYS_INLINE void q6_k_unpack(const uint8_t *b, struct q6_k_unpacked *u) { u->block = b; }

static ALWAYS_INLINE vi q6_k_dot(const struct q6_k_unpacked *u, const struct q8_k_block *x) {
    const uint8_t *b = u->block;
    int32_t total = 0;
    for (int j = 0; j < QK_K / 16; j++) {
        int32_t sum = 0;
        for (int i = 16 * j; i < 16 * j + 16; i++) {
            int half = i / 128, quarter = i % 128 / 32, k = i % 32;
            int low = b[64 * half + 32 * (quarter % 2) + k] >> (4 * (quarter / 2)) & 15;
            int high = b[128 + 32 * half + k] >> (2 * quarter) & 3;
            sum += (low | high << 4) * x->q[i];
        }
        total += (int8_t)b[192 + j] * (sum - 32 * x->sums[j]);
    }
#if VLEN == 1
    return total;
#else
    return _mm512_maskz_set1_epi32(1, total); /* in lane 0, the others 0 */
#endif
}
#endif

/* As block_matmul_tokens: a block is unpacked once and serves every token. */
static ALWAYS_INLINE void q6_k_int8_tokens(const int tokens, const struct matmul_job *job, int64_t r0, int64_t r1) {
    const int64_t blocks = job->cols / QK_K;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *block = job->w + r * job->row_bytes;
        vf acc[MAX_TOKENS];
        for (int t = 0; t < tokens; t++)
            acc[t] = vf_zero();
        for (int64_t b = 0; b < blocks; b++, block += 210) {
            prefetch_row_ahead(block, 210);
            struct q6_k_unpacked u;
            q6_k_unpack(block, &u);
            float d = fp16_at(block + 208);
            for (int t = 0; t < tokens; t++) {
                const struct q8_k_block *x = job->x8 + t * blocks + b;
                acc[t] = vf_fma(vi_float(q6_k_dot(&u, x)), vf_set(d * x->d), acc[t]);
            }
        }
        for (int t = 0; t < tokens; t++)
            job->y[t * job->y_stride + r] = vf_sum(acc[t]);
    }
}

static void q6_k_int8_matmul_rows(const struct matmul_job *job, int64_t r0, int64_t r1) {
#define Q6_K_TOKENS(n) q6_k_int8_tokens(n, job, r0, r1)
    WITH_CONSTANT_TOKENS(job->tokens, Q6_K_TOKENS)
#undef Q6_K_TOKENS
}

/* ---- Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 times int8 activations ---------------------------------------------
 *
 * As llama.cpp's ggml_vec_dot_q8_0_q8_0, q4_0_q8_0, q4_1_q8_1, q5_0_q8_0 and q5_1_q8_1: each token's
 * activations quantized once a call to int8, a float scale per 32 (quantize_q8_32), and a block's 32
 * products summed as integers, then scaled once, by d_w * d_x, in float. The codes of Q4_x (nibbles) and
 * Q5_x (nibbles and a fifth bit) are unsigned u (w = d (u - 8) or d (u - 16), and w = d u + m): their
 * products u q go straight to the unsigned-by-signed multiply-add (a pair at most 2 * 31 * 127, within
 * int16), and the offset or the minimum is paid per block from the activations' sum, sum w x = d_w d_x
 * sum u q + c_w d_x sum q with c_w = -8 d_w, -16 d_w or m. Q8_0's signed codes are multiplied as |w| times
 * q with w's sign, so that no pair of products leaves int16 (|w| <= 128, |q| <= 127). (Q5_0 and Q5_1 are
 * what llama.cpp's Q4_K_M and Q5_K_M fall back to for rows of other than a multiple of 256 weights, as in
 * SmolLM2, where they hold half the bytes.)
 */

/* 32 activations to int8, as quantize_q8_k does per 256. */
void quantize_q8_32(const float *x, struct q8_32_block *out) {
    int32_t sum;
    out->d = round_block_to_int8(x, 32, 32, out->q, &sum);
    out->d_sum = out->d * (float)sum;
}

enum { INT8_Q8_0, INT8_Q4_0, INT8_Q4_1, INT8_Q5_0, INT8_Q5_1 };
/* Where a block's nibbles start, and Q5_x's fifth bits (a little-endian uint32, bit j for weight j). */
static ALWAYS_INLINE int int8_nibbles_at(const int format) {
    return format == INT8_Q4_0 ? 2 : format == INT8_Q4_1 ? 4 : format == INT8_Q5_0 ? 6 : 8;
}
static ALWAYS_INLINE int int8_fifth_bits_at(const int format) { return format == INT8_Q5_0 ? 2 : 4; }

#if defined(__AVX2__)
typedef __m256i int8_codes;
/* 8 int32 lanes summing to sum_i u_i s_i, u unsigned bytes, s signed, no pair above int16 */
static ALWAYS_INLINE __m256i dot_u8_s8(__m256i u, __m256i s) {
#if VNNI_256
    return dpbusd_256(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* A block's 32 codes: Q8_0's bytes, or the nibbles of Q4_x and Q5_x, Q5_x's with their fifth bits. */
static ALWAYS_INLINE int8_codes int8_block_codes(const int format, const uint8_t *b) {
    if (format == INT8_Q8_0)
        return _mm256_loadu_si256((const __m256i *)(b + 2));
    __m256i codes = nibble_bytes(b + int8_nibbles_at(format));
    if (format == INT8_Q4_0 || format == INT8_Q4_1)
        return codes;
    return _mm256_or_si256(codes, fifth_bit_bytes(b + int8_fifth_bits_at(format)));
}

/* |w| for Q8_0 (its sign moves to the activations), the codes as they are for the others */
static ALWAYS_INLINE int8_codes int8_block_unsigned(const int format, int8_codes codes) {
    return format == INT8_Q8_0 ? _mm256_abs_epi8(codes) : codes;
}

/* acc + d (sum of the block's integer products), for one token's activations x */
static ALWAYS_INLINE __m256 int8_block_dot(const int format, int8_codes codes, int8_codes magnitudes, const int8_t *x,
                                           float d, __m256 acc) {
    __m256i activations = _mm256_load_si256((const __m256i *)x);
    if (format == INT8_Q8_0)
        activations = _mm256_sign_epi8(activations, codes);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8_s8(magnitudes, activations)), _mm256_set1_ps(d), acc);
}
typedef __m256 int8_acc;
static ALWAYS_INLINE int8_acc int8_acc_zero(void) { return _mm256_setzero_ps(); }
static ALWAYS_INLINE float int8_acc_sum(int8_acc a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
typedef const uint8_t *int8_codes; /* the block itself, read in place */
typedef float int8_acc;
static ALWAYS_INLINE int8_codes int8_block_codes(const int format, const uint8_t *b) { (void)format; return b; }
static ALWAYS_INLINE int8_codes int8_block_unsigned(const int format, int8_codes codes) { (void)format; return codes; }
static ALWAYS_INLINE float int8_block_dot(const int format, int8_codes b, int8_codes unused, const int8_t *x,
                                          float d, float acc) {
    (void)unused;
    int32_t sum = 0;
    for (int j = 0; j < 32; j++) {
        int w = format == INT8_Q8_0 ? (int8_t)b[2 + j] : b[int8_nibbles_at(format) + j % 16] >> (4 * (j / 16)) & 15;
        if (format == INT8_Q5_0 || format == INT8_Q5_1)
            w |= (int)(u32_at(b + int8_fifth_bits_at(format)) >> j & 1) << 4;
        sum += w * x[j];
    }
    return acc + (float)sum * d;
}
static ALWAYS_INLINE int8_acc int8_acc_zero(void) { return 0.0f; }
static ALWAYS_INLINE float int8_acc_sum(int8_acc a) { return a; }
#endif

/* Block b of a row into the accumulators of each token (sums: the c_w d_x sum q terms). */
static ALWAYS_INLINE void int8_32_block(const int format, const int tokens, const uint8_t *block, int64_t b,
                                        int64_t blocks, const struct q8_32_block *x32, int8_acc *acc, float *sums) {
    int8_codes codes = int8_block_codes(format, block);
    int8_codes magnitudes = int8_block_unsigned(format, codes);
    const float d = fp16_at(block);
    const float c = format == INT8_Q4_0 ? -8.0f * d : format == INT8_Q5_0 ? -16.0f * d
                    : format == INT8_Q4_1 || format == INT8_Q5_1 ? fp16_at(block + 2) : 0.0f;
#pragma GCC unroll 8
    for (int t = 0; t < tokens; t++) {
        const struct q8_32_block *x = x32 + t * blocks + b;
        acc[t] = int8_block_dot(format, codes, magnitudes, x->q, d * x->d, acc[t]);
        if (format != INT8_Q8_0)
            sums[t] += c * x->d_sum;
    }
}

/* Rows r0..r1 for a constant number of tokens. Blocks alternate between two sets of accumulators, so that
 * the additions into one do not wait on the last. */
static ALWAYS_INLINE void int8_32_tokens(const int format, const int block_bytes, const int tokens,
                                         const struct matmul_job *job, int64_t r0, int64_t r1) {
    const int64_t blocks = job->cols / 32;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *block = job->w + r * job->row_bytes;
        int8_acc even[MAX_TOKENS], odd[MAX_TOKENS];
        float even_sums[MAX_TOKENS], odd_sums[MAX_TOKENS];
        for (int t = 0; t < tokens; t++)
            even[t] = odd[t] = int8_acc_zero(), even_sums[t] = odd_sums[t] = 0.0f;
        int64_t b = 0;
        for (; b + 2 <= blocks; b += 2, block += 2 * block_bytes) {
            prefetch_row_ahead(block, 2 * block_bytes);
            int8_32_block(format, tokens, block, b, blocks, job->x32, even, even_sums);
            int8_32_block(format, tokens, block + block_bytes, b + 1, blocks, job->x32, odd, odd_sums);
        }
        if (b < blocks)
            int8_32_block(format, tokens, block, b, blocks, job->x32, even, even_sums);
        for (int t = 0; t < tokens; t++)
            job->y[t * job->y_stride + r] = int8_acc_sum(even[t]) + int8_acc_sum(odd[t]) + (even_sums[t] + odd_sums[t]);
    }
}

/* The format's kernel for a run-time token count: format and block_bytes are constants of each function. */
#define INT8_32_TOKENS(n) int8_32_tokens(format, block_bytes, n, job, r0, r1)
#define INT8_32_FORMAT(name, format_, block_bytes_)                                                         \
    static void name##_int8_matmul_rows(const struct matmul_job *job, int64_t r0, int64_t r1) {            \
        const int format = format_, block_bytes = block_bytes_;                                            \
        WITH_CONSTANT_TOKENS(job->tokens, INT8_32_TOKENS)                                                  \
    }
INT8_32_FORMAT(q8_0, INT8_Q8_0, 34)
INT8_32_FORMAT(q4_0, INT8_Q4_0, 18)
INT8_32_FORMAT(q4_1, INT8_Q4_1, 20)
INT8_32_FORMAT(q5_0, INT8_Q5_0, 22)
INT8_32_FORMAT(q5_1, INT8_Q5_1, 24)
#undef INT8_32_FORMAT
#undef INT8_32_TOKENS

/* ---- Q8_0, Q4_0 and Q4_1 prompts: an int8 GEMM over repacked panels -------------------------------------
 *
 * For a prompt, the row kernel above spends most of its time not multiplying: each row, block and token
 * takes a multiply-add, a conversion and a float multiply-add for 32 products. Here VLEN rows at a time are
 * first repacked into a panel whose vectors hold 4 consecutive codes of each of the VLEN rows, so that one
 * integer multiply-add advances all of them for one token (by a broadcast of 4 of its activations), and the
 * float work is paid once a block for the VLEN rows together. The panel is packed once and then serves every
 * token of the prompt from the cache, as a BLAS packs its panels (and llama.cpp's repacked Q4_0 layouts
 * interleave rows the same way, for good). Products as in the row kernel: sum w x = d_w d_x sum u q + c_w
 * d_x sum q, with the codes taken as unsigned u: Q4_x's nibbles (c_w = -8 d_w or m), and Q8_0's w + 128
 * (c_w = -128 d_w) where the multiply-add is VNNI's; on AVX2 Q8_0 stays |w| times q with w's sign, since
 * maddubs would overflow int16 on w + 128.
 */
#if defined(__AVX2__)
/* A panel (kernels.h: PANEL_ROWS) is taken PANEL_TOKENS tokens a pass: the accumulators fit the registers
 * (AVX-512: 32 of them, AVX2: 16, with VNNI room for a third token: no products or signs in registers). */
#define PANEL_TOKENS (VLEN == 16 ? 4 : VNNI_256 ? 3 : 2)
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#define PANEL_UNSIGNED_Q8_0 1
static ALWAYS_INLINE vi panel_gather(const uint8_t *base, vi offsets) { return _mm512_i32gather_epi32(offsets, base, 1); }
static ALWAYS_INLINE void panel_store(uint8_t *p, vi a) { _mm512_store_si512(p, a); }
static ALWAYS_INLINE vi panel_load(const uint8_t *p) { return _mm512_load_si512(p); }
static ALWAYS_INLINE vi panel_offsets(const int32_t *p) { return _mm512_loadu_si512(p); }
static ALWAYS_INLINE vi vi_zero(void) { return _mm512_setzero_si512(); }
static ALWAYS_INLINE vi panel_dot(const int format, vi acc, vi codes, vi magnitudes, int32_t x4) {
    (void)format, (void)magnitudes;
    return _mm512_dpbusd_epi32(acc, codes, _mm512_set1_epi32(x4));
}
static ALWAYS_INLINE vi panel_magnitudes(const int format, vi codes) { (void)format; return codes; }
static ALWAYS_INLINE vi panel_block_sums(const int format, vi dot) { (void)format; return dot; }
static ALWAYS_INLINE vi vi_xor(vi a, vi b) { return _mm512_xor_si512(a, b); }
#else /* 256-bit: VNNI's vpdpbusd where the CPU has it, else AVX2's maddubs */
#define PANEL_UNSIGNED_Q8_0 VNNI_256
static ALWAYS_INLINE vi panel_gather(const uint8_t *base, vi offsets) { return _mm256_i32gather_epi32((const int *)base, offsets, 1); }
static ALWAYS_INLINE void panel_store(uint8_t *p, vi a) { _mm256_store_si256((__m256i *)p, a); }
static ALWAYS_INLINE vi panel_load(const uint8_t *p) { return _mm256_load_si256((const __m256i *)p); }
static ALWAYS_INLINE vi panel_offsets(const int32_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static ALWAYS_INLINE vi vi_zero(void) { return _mm256_setzero_si256(); }
static ALWAYS_INLINE vi panel_magnitudes(const int format, vi codes) {
    return format == INT8_Q8_0 && !VNNI_256 ? _mm256_abs_epi8(codes) : codes;
}
/* Q4_x's products (u <= 15) stay in int16 for a whole block: 8 groups of at most 2 * 15 * 127 each. */
static ALWAYS_INLINE vi panel_dot(const int format, vi acc, vi codes, vi magnitudes, int32_t x4) {
    __m256i x = _mm256_set1_epi32(x4);
#if VNNI_256
    (void)format, (void)magnitudes;
    return dpbusd_256(acc, codes, x);
#else
    if (format != INT8_Q8_0)
        return _mm256_add_epi16(acc, _mm256_maddubs_epi16(codes, x));
    __m256i pairs = _mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(x, codes));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}
static ALWAYS_INLINE vi panel_block_sums(const int format, vi dot) {
    return format != INT8_Q8_0 && !VNNI_256 ? _mm256_madd_epi16(dot, _mm256_set1_epi16(1)) : dot;
}
static ALWAYS_INLINE vi vi_xor(vi a, vi b) { return _mm256_xor_si256(a, b); }
#endif

static ALWAYS_INLINE int32_t i32_at(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Rows r0..r0 + n (n <= PANEL_ROWS; a short panel repeats its last row) packed: vector v of group g of block b,
 * codes + ((b * 8 + g) * PANEL_VECTORS + v) * VLEN * 4, holds u of weights 4 g..4 g + 3 of block b of rows
 * r0 + v VLEN..; d and c the blocks' d_w and c_w, [b * PANEL_ROWS + i] for row r0 + i. */
static ALWAYS_INLINE void pack_panel(const int format, const int block_bytes, const struct matmul_job *job, int64_t r0,
                                     int n, uint8_t *codes, float *d, float *c) {
    const int64_t blocks = job->cols / 32;
    int32_t offsets[PANEL_ROWS];
    for (int i = 0; i < PANEL_ROWS; i++)
        offsets[i] = (int32_t)((i < n ? i : n - 1) * job->row_bytes);
    const vi low4 = vi_set(0x0f0f0f0f);
    const int code_start = format == INT8_Q4_1 ? 4 : 2;
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *base = job->w + r0 * job->row_bytes + b * block_bytes;
        for (int g = 0; g < 8; g++)
            for (int v = 0; v < PANEL_VECTORS; v++) {
                const vi lanes = panel_offsets(offsets + v * VLEN);
                vi u;
                if (format == INT8_Q8_0) {
                    u = panel_gather(base + code_start + 4 * g, lanes);
                    if (PANEL_UNSIGNED_Q8_0)
                        u = vi_xor(u, vi_set((int32_t)0x80808080u)); /* w + 128 */
                } else { /* weights 4 g.. from the low nibbles of bytes 4 g.., then 4 (g - 4).. from the high ones */
                    u = vi_and(vi_shr(panel_gather(base + code_start + 4 * (g % 4), lanes), 4 * (g / 4)), low4);
                }
                panel_store(codes + ((b * 8 + g) * PANEL_VECTORS + v) * VLEN * 4, u);
            }
        for (int i = 0; i < PANEL_ROWS; i++) {
            const uint8_t *block = base + offsets[i];
            const float scale = fp16_at(block);
            d[b * PANEL_ROWS + i] = scale;
            c[b * PANEL_ROWS + i] = format == INT8_Q4_0 ? -8.0f * scale : format == INT8_Q4_1 ? fp16_at(block + 2)
                                    : PANEL_UNSIGNED_Q8_0 ? -128.0f * scale : 0.0f;
        }
    }
}

/* The panel's rows for `tokens` (a constant) tokens x[0..tokens), each (blocks) activation blocks apart. Each
 * broadcast of 4 activations serves PANEL_VECTORS multiply-adds. */
static ALWAYS_INLINE void panel_tokens(const int format, const int tokens, const uint8_t *codes, const float *d,
                                       const float *c, int64_t blocks, const struct q8_32_block *x,
                                       vf out[][PANEL_VECTORS]) {
    const int corrected = format != INT8_Q8_0 || PANEL_UNSIGNED_Q8_0;
    vf acc[PANEL_TOKENS][PANEL_VECTORS];
    for (int t = 0; t < tokens; t++)
        for (int v = 0; v < PANEL_VECTORS; v++)
            acc[t][v] = vf_zero();
    for (int64_t b = 0; b < blocks; b++) {
        vi dot[PANEL_TOKENS][PANEL_VECTORS];
        for (int t = 0; t < tokens; t++)
            for (int v = 0; v < PANEL_VECTORS; v++)
                dot[t][v] = vi_zero();
#pragma GCC unroll 8
        for (int g = 0; g < 8; g++) {
            vi u[PANEL_VECTORS], magnitudes[PANEL_VECTORS];
            for (int v = 0; v < PANEL_VECTORS; v++) {
                u[v] = panel_load(codes + ((b * 8 + g) * PANEL_VECTORS + v) * VLEN * 4);
                magnitudes[v] = panel_magnitudes(format, u[v]);
            }
            for (int t = 0; t < tokens; t++) {
                const int32_t x4 = i32_at(x[t * blocks + b].q + 4 * g);
                for (int v = 0; v < PANEL_VECTORS; v++)
                    dot[t][v] = panel_dot(format, dot[t][v], u[v], magnitudes[v], x4);
            }
        }
        for (int v = 0; v < PANEL_VECTORS; v++) {
            const vf dv = vf_load(d + b * PANEL_ROWS + v * VLEN), cv = vf_load(c + b * PANEL_ROWS + v * VLEN);
            for (int t = 0; t < tokens; t++) {
                const struct q8_32_block *xb = x + t * blocks + b;
                acc[t][v] = vf_fma(vi_float(panel_block_sums(format, dot[t][v])), vf_mul(dv, vf_set(xb->d)), acc[t][v]);
                if (corrected)
                    acc[t][v] = vf_fma(cv, vf_set(xb->d_sum), acc[t][v]);
            }
        }
    }
    for (int t = 0; t < tokens; t++)
        for (int v = 0; v < PANEL_VECTORS; v++)
            out[t][v] = acc[t][v];
}

/* Rows r0..r1 (r0 a multiple of PANEL_ROWS) for all job->tokens tokens, a panel at a time. */
static ALWAYS_INLINE int int8_32_prompt(const int format, const int block_bytes, const struct matmul_job *job,
                                        int64_t r0, int64_t r1) {
    const int64_t blocks = job->cols / 32;
    uint8_t *codes = aligned_alloc(64, blocks * 8 * PANEL_ROWS * 4 + 2 * blocks * PANEL_ROWS * sizeof(float));
    if (!codes)
        return ERROR_MEMORY;
    float *d = (float *)(codes + blocks * 8 * PANEL_ROWS * 4), *c = d + blocks * PANEL_ROWS;
    for (int64_t r = r0; r < r1; r += PANEL_ROWS) {
        const int n = r1 - r < PANEL_ROWS ? (int)(r1 - r) : PANEL_ROWS;
        pack_panel(format, block_bytes, job, r, n, codes, d, c);
        for (int t0 = 0; t0 < job->tokens; t0 += PANEL_TOKENS) {
            const int tokens = job->tokens - t0 < PANEL_TOKENS ? job->tokens - t0 : PANEL_TOKENS;
            vf out[PANEL_TOKENS][PANEL_VECTORS];
            /* counts above PANEL_TOKENS never come: clamped, their cases compile without reading past acc */
#define PANEL_CALL(k) panel_tokens(format, (k) < PANEL_TOKENS ? (k) : PANEL_TOKENS, codes, d, c, blocks, \
                                   job->x32 + t0 * blocks, out)
            WITH_CONSTANT_TOKENS(tokens, PANEL_CALL)
#undef PANEL_CALL
            for (int t = 0; t < tokens; t++) {
                float *y = job->y + (t0 + t) * job->y_stride + r;
                if (n == PANEL_ROWS)
                    memcpy(y, out[t], sizeof out[t]);
                else
                    memcpy(y, out[t], n * sizeof(float));
            }
        }
    }
    free(codes);
    return OK;
}

#define INT8_32_PROMPT(name, format, block_bytes)                                                          \
    static int name##_int8_prompt_rows(const struct matmul_job *job, int64_t r0, int64_t r1) {             \
        return int8_32_prompt(format, block_bytes, job, r0, r1);                                           \
    }
INT8_32_PROMPT(q8_0, INT8_Q8_0, 34)
INT8_32_PROMPT(q4_0, INT8_Q4_0, 18)
INT8_32_PROMPT(q4_1, INT8_Q4_1, 20)
#undef INT8_32_PROMPT
#else
#define q8_0_int8_prompt_rows NULL /* portable C: the row kernel serves prompts too */
#define q4_0_int8_prompt_rows NULL
#define q4_1_int8_prompt_rows NULL
#endif

/* ---- Q4_K and Q5_K times int8 activations ----------------------------------------------------------------
 *
 * As llama.cpp's ggml_vec_dot_q4_K_q8_K and q5_K_q8_K: the activations per 256 (quantize_q8_k), each
 * sub-block's unsigned codes (4 or 5 bits) multiplied by them as integers, its 6-bit scale applied to the
 * integer sum, and the minimum paid from the activations' sums per 16: sum w x = d_x (d sum_s scale_s
 * sum q x_q - dmin sum_s min_s sum x_q). All integers fit int32 (|sum| < 2^26).
 */

/* The block's d_x (d sum_s scale_s sum_i q_i x_i - dmin sum_s min_s sum_i x_i), q the codes of Q4_K
 * (five = 0) or Q5_K (five = 1). */
static ALWAYS_INLINE float k_quant_int8_block(const int five, const uint8_t *b, const struct q8_k_block *x) {
    int scales[8], mins[8];
    int32_t min_total = 0, total = 0;
    for (int s = 0; s < 8; s++) {
        k_scale_min(b + 4, s, &scales[s], &mins[s]);
        min_total += mins[s] * (x->sums[2 * s] + x->sums[2 * s + 1]);
    }
    const uint8_t *qs = b + (five ? 48 : 16), *qh = b + 16;
#if defined(__AVX2__)
    const __m256i low4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    __m256i acc = _mm256_setzero_si256();
    for (int pair = 0; pair < 4; pair++) { /* sub-blocks 2 pair (low nibbles) and 2 pair + 1 (high) */
        __m256i bytes = _mm256_loadu_si256((const __m256i *)(qs + 32 * pair));
        __m256i low = _mm256_and_si256(bytes, low4), high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
        if (five) { /* bit s of byte j: weight j of sub-block s, moved to bit 4 */
            __m256i fifth = _mm256_loadu_si256((const __m256i *)qh);
            low = _mm256_or_si256(low, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(fifth, 2 * pair), one), 4));
            high = _mm256_or_si256(high, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(fifth, 2 * pair + 1), one), 4));
        }
        /* unsigned codes (at most 31) times int8: pairs of products within int16 */
        __m256i low_products = _mm256_maddubs_epi16(low, _mm256_load_si256((const __m256i *)(x->q + 64 * pair)));
        __m256i high_products = _mm256_maddubs_epi16(high, _mm256_load_si256((const __m256i *)(x->q + 64 * pair + 32)));
        acc = madd_add_256(acc, low_products, _mm256_set1_epi16((short)scales[2 * pair]));
        acc = madd_add_256(acc, high_products, _mm256_set1_epi16((short)scales[2 * pair + 1]));
    }
    __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, _MM_SHUFFLE(1, 0, 3, 2)));
    total = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32(sum, _MM_SHUFFLE(2, 3, 0, 1))));
#else
    for (int s = 0; s < 8; s++) {
        int32_t sub = 0;
        for (int j = 0; j < 32; j++) {
            int q = qs[32 * (s / 2) + j] >> (4 * (s % 2)) & 15;
            if (five)
                q |= (qh[j] >> s & 1) << 4;
            sub += q * x->q[32 * s + j];
        }
        total += scales[s] * sub;
    }
#endif
    return x->d * (fp16_at(b) * (float)total - fp16_at(b + 2) * (float)min_total);
}

/* Rows r0..r1 for a constant number of tokens, blocks alternating between two accumulators. */
static ALWAYS_INLINE void k_quant_int8_tokens(const int five, const int tokens, const struct matmul_job *job,
                                              int64_t r0, int64_t r1) {
    const int64_t blocks = job->cols / QK_K, block_bytes = five ? 176 : 144;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *block = job->w + r * job->row_bytes;
        float even[MAX_TOKENS] = {0}, odd[MAX_TOKENS] = {0};
        for (int64_t b = 0; b < blocks; b++, block += block_bytes) {
            prefetch_row_ahead(block, (int)block_bytes);
            for (int t = 0; t < tokens; t++) {
                float value = k_quant_int8_block(five, block, job->x8 + t * blocks + b);
                if (b % 2)
                    odd[t] += value;
                else
                    even[t] += value;
            }
        }
        for (int t = 0; t < tokens; t++)
            job->y[t * job->y_stride + r] = even[t] + odd[t];
    }
}

#define K_QUANT_INT8_TOKENS(n) k_quant_int8_tokens(five, n, job, r0, r1)
#define K_QUANT_INT8_FORMAT(name, five_)                                                                   \
    static void name##_int8_matmul_rows(const struct matmul_job *job, int64_t r0, int64_t r1) {            \
        const int five = five_;                                                                            \
        WITH_CONSTANT_TOKENS(job->tokens, K_QUANT_INT8_TOKENS)                                             \
    }
K_QUANT_INT8_FORMAT(q4_k, 0)
K_QUANT_INT8_FORMAT(q5_k, 1)
#undef K_QUANT_INT8_FORMAT
#undef K_QUANT_INT8_TOKENS

int ggml_kernels(int type, struct row_kernels *k) {
    switch (type) {
    case TYPE_Q8_0: *k = (struct row_kernels){q8_0_matmul_rows, q8_0_decode_row, q8_0_int8_matmul_rows, 32, q8_0_int8_prompt_rows}; return 1;
    case TYPE_Q4_0: *k = (struct row_kernels){q4_0_matmul_rows, q4_0_decode_row, q4_0_int8_matmul_rows, 32, q4_0_int8_prompt_rows}; return 1;
    case TYPE_Q4_1: *k = (struct row_kernels){q4_1_matmul_rows, q4_1_decode_row, q4_1_int8_matmul_rows, 32, q4_1_int8_prompt_rows}; return 1;
    case TYPE_Q5_0: *k = (struct row_kernels){q5_0_matmul_rows, q5_0_decode_row, q5_0_int8_matmul_rows, 32}; return 1;
    case TYPE_Q5_1: *k = (struct row_kernels){q5_1_matmul_rows, q5_1_decode_row, q5_1_int8_matmul_rows, 32}; return 1;
    case TYPE_Q4_K: *k = (struct row_kernels){q4_k_matmul_rows, q4_k_decode_row, q4_k_int8_matmul_rows, QK_K}; return 1;
    case TYPE_Q5_K: *k = (struct row_kernels){q5_k_matmul_rows, q5_k_decode_row, q5_k_int8_matmul_rows, QK_K}; return 1;
    case TYPE_Q6_K: *k = (struct row_kernels){q6_k_matmul_rows, q6_k_decode_row, q6_k_int8_matmul_rows, QK_K}; return 1;
    }
    return 0;
}
