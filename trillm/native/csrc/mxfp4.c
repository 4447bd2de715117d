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
 * Codes are decoded in the lane order fp4_codes finds cheapest (kernels.h, MXFP4_LANE_BYTE), not in element
 * order: rather than reordering codes, the call reorders the activations once into that order for the
 * layout at hand. A dot product does not care in which order it sums, and a token's activations are a
 * thousandth of the weights it meets.
 * The activations stay float32 (products as a float32 matmul over the decoded weights).
 */
#include <stdlib.h>

#include "kernels.h"

#define MXFP4_BLOCK 32

/* Scales decoded at a time, ahead of their blocks. */
#define SCALE_RUN 32

/* The E8M0 scale 2^(s - 127) as a float: its bits moved into the exponent (s = 0 is 2^-127, a float32
 * subnormal; 255, NaN in the spec, reads as infinity). */
static ALWAYS_INLINE float e8m0_to_float(uint8_t s) {
    uint32_t bits = (uint32_t)s << 23;
    bits = bits > 0x00400000u ? bits : 0x00400000u; /* branch-free */
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

struct mxfp4_job {
    const uint8_t *qs, *scales;
    int64_t qs_block, qs_row, scale_block, scale_row, cols;
    const float *x; /* (tokens, cols), each block's activations in lane order */
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
        for (int64_t run = 0; run < blocks; run += SCALE_RUN) {
            const int n = blocks - run < SCALE_RUN ? (int)(blocks - run) : SCALE_RUN;
            float d[SCALE_RUN];
            for (int b = 0; b < n; b++)
                d[b] = e8m0_to_float(scales[(run + b) * job->scale_block]);
            const uint8_t *block = qs + run * job->qs_block;
            const float *x = job->x + run * MXFP4_BLOCK;
            int b = 0;
            for (; b + sets <= n; b += sets, block += sets * job->qs_block, x += sets * MXFP4_BLOCK) {
                mxfp4_block(block, d[b], x, cols, tokens, acc, 0);
                if (sets == 2)
                    mxfp4_block(block + job->qs_block, d[b + 1], x + MXFP4_BLOCK, cols, tokens, acc, 1);
            }
            if (b < n)
                mxfp4_block(block, d[b], x, cols, tokens, acc, 0);
        }
        for (int t = 0; t < tokens; t++)
            job->y[t * job->y_stride + r] =
                vf_sum(vf_add(vf_add(acc[t][0][0], acc[t][0][1]), vf_add(acc[t][1][0], acc[t][1][1])));
    }
}

struct mxfp4_call {
    struct mxfp4_job job;
    int64_t rows, tokens;
};

static void mxfp4_chunk(void *arg, int chunk, int chunks) {
    const struct mxfp4_call *call = arg;
    int64_t r0 = call->rows * chunk / chunks, r1 = call->rows * (chunk + 1) / chunks;
    for (int64_t t = 0; t < call->tokens; t += MAX_TOKENS) {
        struct mxfp4_job job = call->job;
        job.x += t * job.cols;
        job.y += t * call->rows;
        job.tokens = call->tokens - t < MAX_TOKENS ? (int)(call->tokens - t) : MAX_TOKENS;
        switch (job.tokens) { /* the token count a constant, so the accumulators live in registers */
        case 1: mxfp4_rows_tokens(&job, 1, r0, r1); break;
        case 2: mxfp4_rows_tokens(&job, 2, r0, r1); break;
        case 3: mxfp4_rows_tokens(&job, 3, r0, r1); break;
        case 4: mxfp4_rows_tokens(&job, 4, r0, r1); break;
        case 5: mxfp4_rows_tokens(&job, 5, r0, r1); break;
        case 6: mxfp4_rows_tokens(&job, 6, r0, r1); break;
        case 7: mxfp4_rows_tokens(&job, 7, r0, r1); break;
        case 8: mxfp4_rows_tokens(&job, 8, r0, r1); break;
        }
    }
}

/* y (tokens, rows) = x (tokens, cols) W^T for one MXFP4 matrix (one expert) given by its strides (see the
 * top of this file); `interleaved` for the Hugging Face element order. Returns OK, ERROR_SHAPE for cols
 * not whole blocks, ERROR_MEMORY. */
int trillm_mxfp4_matmul(int interleaved, const uint8_t *qs, int64_t qs_block, int64_t qs_row, const uint8_t *scales,
                        int64_t scale_block, int64_t scale_row, int64_t rows, int64_t cols, const float *x,
                        int64_t tokens, float *y) {
    if (cols <= 0 || cols % MXFP4_BLOCK || rows < 0 || tokens < 0)
        return ERROR_SHAPE;
    if (rows == 0 || tokens == 0)
        return OK;
    /* each block's activations into lane order: lane p meets the element of byte MXFP4_LANE_BYTE(p)'s low or
     * high nibble, which is element 2 byte + high in the release's order, byte + 16 high in GGUF's */
    int element[MXFP4_BLOCK];
    for (int p = 0; p < MXFP4_BLOCK; p++)
        element[p] = interleaved ? 2 * MXFP4_LANE_BYTE(p) + MXFP4_LANE_HIGH(p)
                                 : MXFP4_LANE_BYTE(p) + MXFP4_BLOCK / 2 * MXFP4_LANE_HIGH(p);
    float *reordered = malloc(tokens * cols * sizeof *reordered);
    if (!reordered)
        return ERROR_MEMORY;
    for (int64_t i = 0; i < tokens * cols; i += MXFP4_BLOCK)
        for (int p = 0; p < MXFP4_BLOCK; p++)
            reordered[i + p] = x[i + element[p]];
    struct mxfp4_call call = {{qs, scales, qs_block, qs_row, scale_block, scale_row, cols, reordered, 0, y, rows}, rows, tokens};
    int64_t bytes = rows * (cols / MXFP4_BLOCK) * 17;
    run_parallel(mxfp4_chunk, &call, bytes < 32 * 1024 ? 1 : pool_threads(), 1);
    free(reordered);
    return OK;
}
