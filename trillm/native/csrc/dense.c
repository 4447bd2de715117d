/* Dense float32 / float16 / bfloat16 weights: matrix products that read the stored dtype directly, with
 * float32 activations and sums, and row decoding to float32 (for embedding lookups).
 *
 * Same shape as ggml.c: each dtype gives a vector and a scalar read at column c; generic loops make the
 * matmul (rows need not be a multiple of the vector width: the scalar read takes the tail) and decoder.
 */
#include "kernels.h"

typedef vf dense_vector_fn(const uint8_t *row, int64_t c);
typedef float dense_scalar_fn(const uint8_t *row, int64_t c);

static ALWAYS_INLINE vf f32_vector(const uint8_t *row, int64_t c) { return vf_load((const float *)row + c); }
static ALWAYS_INLINE float f32_scalar(const uint8_t *row, int64_t c) { return ((const float *)row)[c]; }
static ALWAYS_INLINE vf f16_vector(const uint8_t *row, int64_t c) { return vf_f16(row + 2 * c); }
static ALWAYS_INLINE float f16_scalar(const uint8_t *row, int64_t c) { return fp16_at(row + 2 * c); }
static ALWAYS_INLINE vf bf16_vector(const uint8_t *row, int64_t c) { return vf_bf16(row + 2 * c); }
static ALWAYS_INLINE float bf16_scalar(const uint8_t *row, int64_t c) {
    uint16_t h;
    memcpy(&h, row + 2 * c, sizeof h);
    return bf16_to_float(h);
}

static ALWAYS_INLINE void dense_matmul_tokens(dense_vector_fn *vector, dense_scalar_fn *scalar, const int element_bytes,
                                              const int tokens, const struct matmul_job *job, int64_t r0, int64_t r1) {
    const int64_t cols = job->cols;
    const float *x = job->x;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = job->w + r * job->row_bytes;
        vf acc[MAX_TOKENS][2]; /* two accumulators a token, so consecutive FMAs do not wait on each other */
        for (int t = 0; t < tokens; t++)
            acc[t][0] = acc[t][1] = vf_zero();
        int64_t c = 0;
        for (; c + 2 * VLEN <= cols; c += 2 * VLEN) {
            prefetch_row_ahead(row + c * element_bytes, 2 * VLEN * element_bytes);
            vf even = vector(row, c), odd = vector(row, c + VLEN);
#pragma GCC unroll 8
            for (int t = 0; t < tokens; t++) {
                acc[t][0] = vf_fma(even, vf_load(x + t * cols + c), acc[t][0]);
                acc[t][1] = vf_fma(odd, vf_load(x + t * cols + c + VLEN), acc[t][1]);
            }
        }
        for (int t = 0; t < tokens; t++) {
            float sum = vf_sum(vf_add(acc[t][0], acc[t][1]));
            for (int64_t tail = c; tail < cols; tail++)
                sum += scalar(row, tail) * x[t * cols + tail];
            job->y[t * job->y_stride + r] = sum;
        }
    }
}

/* The token count made a constant, so the accumulators live in registers. */
static ALWAYS_INLINE void dense_matmul_rows(dense_vector_fn *vector, dense_scalar_fn *scalar, const int element_bytes,
                                            const struct matmul_job *job, int64_t r0, int64_t r1) {
#define DENSE_TOKENS(n) dense_matmul_tokens(vector, scalar, element_bytes, n, job, r0, r1)
    WITH_CONSTANT_TOKENS(job->tokens, DENSE_TOKENS)
#undef DENSE_TOKENS
}

static ALWAYS_INLINE void dense_decode_row(dense_vector_fn *vector, dense_scalar_fn *scalar,
                                           const uint8_t *row, int64_t cols, float *restrict out) {
    int64_t c = 0;
    for (; c + VLEN <= cols; c += VLEN)
        vf_store(out + c, vector(row, c));
    for (; c < cols; c++)
        out[c] = scalar(row, c);
}

/* A dtype's two row kernels, made from its vector and scalar reads. */
#define DENSE_FORMAT(name, element_bytes)                                                                  \
    static void name##_matmul_rows(const struct matmul_job *job, int64_t r0, int64_t r1) {                 \
        dense_matmul_rows(name##_vector, name##_scalar, element_bytes, job, r0, r1);                       \
    }                                                                                                      \
    static void name##_decode_row(const uint8_t *row, int64_t cols, float *restrict out) {                 \
        dense_decode_row(name##_vector, name##_scalar, row, cols, out);                                    \
    }

DENSE_FORMAT(f32, 4)
DENSE_FORMAT(f16, 2)
DENSE_FORMAT(bf16, 2)

int dense_kernels(int type, struct row_kernels *k) {
    switch (type) {
    case TYPE_F32: *k = (struct row_kernels){f32_matmul_rows, f32_decode_row}; return 1;
    case TYPE_F16: *k = (struct row_kernels){f16_matmul_rows, f16_decode_row}; return 1;
    case TYPE_BF16: *k = (struct row_kernels){bf16_matmul_rows, bf16_decode_row}; return 1;
    }
    return 0;
}
