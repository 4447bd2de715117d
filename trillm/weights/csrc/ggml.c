/* GGML block formats: matrix products straight from the stored blocks, and block decoding.
 *
 * Block layouts follow llama.cpp's ggml-common.h and dequantize_row_* in ggml-quants.c. Unlike
 * llama.cpp's vec_dot kernels, the activations stay float32 (they are never quantized), so a product
 * equals a float32 matmul over the dequantized weights, which is what transformers computes for a GGUF
 * file, up to summation order.
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

/* The 4-bit codes of a 32-weight block: byte j holds weight j in its low nibble and j + 16 in its high.
 * Lanes hold the code in their low 4 bits (vf_codes16 ignores the bits above). */
static ALWAYS_INLINE vi nibbles(const uint8_t *qs, int i) {
    int first = i * VLEN;
    vi bytes = vi_u8(qs + first % 16);
    return first < 16 ? bytes : vi_shr(bytes, 4);
}

/* Q5_0 / Q5_1 codes: the nibble plus a fifth bit, bit j of a little-endian uint32 for weight j. */
static ALWAYS_INLINE vi five_bit_codes(const uint8_t *qh, const uint8_t *qs, int i) {
    vi fifth = vi_shl(vi_bits(u32_at(qh) >> (i * VLEN)), 4);
    return vi_or(vi_and(nibbles(qs, i), vi_set(15)), fifth);
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
    switch (job->tokens) {
    case 1: block_matmul_tokens(vector, block_elems, block_bytes, 1, job, r0, r1); break;
    case 2: block_matmul_tokens(vector, block_elems, block_bytes, 2, job, r0, r1); break;
    case 3: block_matmul_tokens(vector, block_elems, block_bytes, 3, job, r0, r1); break;
    case 4: block_matmul_tokens(vector, block_elems, block_bytes, 4, job, r0, r1); break;
    case 5: block_matmul_tokens(vector, block_elems, block_bytes, 5, job, r0, r1); break;
    case 6: block_matmul_tokens(vector, block_elems, block_bytes, 6, job, r0, r1); break;
    case 7: block_matmul_tokens(vector, block_elems, block_bytes, 7, job, r0, r1); break;
    case 8: block_matmul_tokens(vector, block_elems, block_bytes, 8, job, r0, r1); break;
    }
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

int ggml_kernels(int type, struct row_kernels *k) {
    switch (type) {
    case TYPE_Q8_0: *k = (struct row_kernels){q8_0_matmul_rows, q8_0_decode_row}; return 1;
    case TYPE_Q4_0: *k = (struct row_kernels){q4_0_matmul_rows, q4_0_decode_row}; return 1;
    case TYPE_Q4_1: *k = (struct row_kernels){q4_1_matmul_rows, q4_1_decode_row}; return 1;
    case TYPE_Q5_0: *k = (struct row_kernels){q5_0_matmul_rows, q5_0_decode_row}; return 1;
    case TYPE_Q5_1: *k = (struct row_kernels){q5_1_matmul_rows, q5_1_decode_row}; return 1;
    case TYPE_Q4_K: *k = (struct row_kernels){q4_k_matmul_rows, q4_k_decode_row}; return 1;
    case TYPE_Q5_K: *k = (struct row_kernels){q5_k_matmul_rows, q5_k_decode_row}; return 1;
    case TYPE_Q6_K: *k = (struct row_kernels){q6_k_matmul_rows, q6_k_decode_row}; return 1;
    }
    return 0;
}
