/* The two steps of a decoder layer that are not matmuls but still cost the most torch calls in a decode
 * step: RMSNorm, and attention of one new token over the KV cache. Their PyTorch twins (F.rms_norm and
 * scaled_dot_product_attention) are in trillm/models/layers.py, and the tests compare the two.
 */
#include <stdlib.h>

#include "kernels.h"

/* Below this many multiply-adds the calling thread works alone (see PARALLEL_MIN_BYTES in matmul.c). */
#define PARALLEL_MIN_WORK (64 * 1024)

static float dot(const float *a, const float *b, int64_t n) {
    vf acc = vf_zero();
    int64_t i = 0;
    for (; i + VLEN <= n; i += VLEN)
        acc = vf_fma(vf_load(a + i), vf_load(b + i), acc);
    float sum = vf_sum(acc);
    for (; i < n; i++)
        sum += a[i] * b[i];
    return sum;
}

/* out = x / sqrt(mean(x^2) + eps) * weight, for each of `rows` rows of `dim` floats. */
void trillm_rms_norm(const float *x, const float *weight, int64_t rows, int64_t dim, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * dim;
        float inverse_rms = 1.0f / sqrtf(dot(row, row, dim) / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++)
            out[r * dim + i] = row[i] * inverse_rms * weight[i];
    }
}

struct attention_call {
    const float *q, *keys, *values;
    float *out;
    int64_t batch, heads, group, head_dim, length;
    int64_t kv_batch_stride, kv_head_stride; /* floats; positions are head_dim apart */
    float scale;
};

static void attention_chunk(void *arg, int chunk, int chunks) {
    const struct attention_call *c = arg;
    int64_t all_heads = c->batch * c->heads;
    float *scores = malloc(c->length * sizeof *scores);
    for (int64_t bh = all_heads * chunk / chunks; bh < all_heads * (chunk + 1) / chunks; bh++) {
        int64_t b = bh / c->heads, kv_head = bh % c->heads / c->group;
        const float *q = c->q + bh * c->head_dim;
        const float *keys = c->keys + b * c->kv_batch_stride + kv_head * c->kv_head_stride;
        const float *values = c->values + b * c->kv_batch_stride + kv_head * c->kv_head_stride;
        float *out = c->out + bh * c->head_dim;
        float max_score = -INFINITY, total = 0.0f;
        for (int64_t j = 0; j < c->length; j++) {
            scores[j] = dot(q, keys + j * c->head_dim, c->head_dim) * c->scale;
            max_score = scores[j] > max_score ? scores[j] : max_score;
        }
        for (int64_t j = 0; j < c->length; j++)
            total += scores[j] = expf(scores[j] - max_score);
        for (int64_t i = 0; i < c->head_dim; i++)
            out[i] = 0.0f;
        for (int64_t j = 0; j < c->length; j++) {
            float weight = scores[j] / total;
            const float *value = values + j * c->head_dim;
            for (int64_t i = 0; i < c->head_dim; i++)
                out[i] += weight * value[i];
        }
    }
    free(scores);
}

/* Softmax attention of one query per (sequence, head) over cached positions 0..length-1.
 * q and out: (batch, heads, head_dim). keys/values: (batch, kv_heads, positions, head_dim) with the given
 * strides; query head h reads kv head h / (heads / kv_heads) (grouped-query attention). */
void trillm_attention_one_token(const float *q, const float *keys, const float *values, int64_t batch,
                                int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t length,
                                int64_t kv_batch_stride, int64_t kv_head_stride, float scale, float *out) {
    struct attention_call call = {q, keys, values, out, batch, heads, heads / kv_heads, head_dim, length,
                                  kv_batch_stride, kv_head_stride, scale};
    int64_t work = batch * heads * length * head_dim;
    run_parallel(attention_chunk, &call, work < PARALLEL_MIN_WORK ? 1 : pool_threads(), 1);
}
