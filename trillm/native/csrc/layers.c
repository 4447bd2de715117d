/* The steps of a decoder layer that are not matmuls, each one call where torch would make several: RMSNorm,
 * LLaMA's SwiGLU, BitNet's squared-ReLU GLU, gpt-oss's clamped SwiGLU and its experts' routing and
 * combining, and the attention of one new token (RoPE, the KV cache's update, attention over the cache);
 * and the additions, copies and interleavings a decode plan (plan.c) runs for the torch ops between them.
 * Their bindings and PyTorch twins are in trillm/native/ops.py, and the tests hold each to its twin.
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

/* out[i] = a . b_i for four rows b_i `stride` floats apart: one horizontal reduction for the four, where four
 * dot() calls make one each (the attention of a long context makes one a key and query head). */
static void dot4(const float *a, const float *b, int64_t stride, int64_t n, float *out) {
#if VLEN >= 8
    if (n % VLEN == 0) {
        vf acc[4] = {vf_zero(), vf_zero(), vf_zero(), vf_zero()};
        for (int64_t i = 0; i < n; i += VLEN) {
            const vf x = vf_load(a + i);
            for (int k = 0; k < 4; k++)
                acc[k] = vf_fma(x, vf_load(b + k * stride + i), acc[k]);
        }
        __m256 h[4];
        for (int k = 0; k < 4; k++)
#if VLEN == 16
            h[k] = _mm256_add_ps(_mm512_castps512_ps256(acc[k]), _mm512_extractf32x8_ps(acc[k], 1));
#else
            h[k] = acc[k];
#endif
        __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
        _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1)));
        return;
    }
#endif
    for (int k = 0; k < 4; k++)
        out[k] = dot(a, b + k * stride, n);
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

/* out = relu(gate)^2 * up for each of `tokens` rows of gate_up = [gate (dim) | up (dim)]: BitNet's ReLU² GLU,
 * in torch's order of operations (relu, square, times up), so the results are the same floats. */
void trillm_squared_relu_glu(const float *gate_up, int64_t tokens, int64_t dim, float *out) {
    for (int64_t t = 0; t < tokens; t++) {
        const float *gate = gate_up + 2 * t * dim, *up = gate + dim;
        for (int64_t i = 0; i < dim; i++) {
            float relu = gate[i] < 0.0f ? 0.0f : gate[i]; /* NaN stays NaN, as in torch */
            out[t * dim + i] = relu * relu * up[i];
        }
    }
}

/* out = silu(gate) * up = gate / (1 + e^-gate) * up for each of `tokens` rows of gate_up = [gate (dim) | up (dim)]:
 * LLaMA's SwiGLU. out first holds e^-gate, by the vector exp. */
void trillm_swiglu(const float *gate_up, int64_t tokens, int64_t dim, float *out) {
    for (int64_t t = 0; t < tokens; t++) {
        const float *gate = gate_up + 2 * t * dim, *up = gate + dim;
        float *row = out + t * dim;
        int64_t i = 0;
        for (; i + VLEN <= dim; i += VLEN)
            vf_store(row + i, vf_exp(vf_mul(vf_load(gate + i), vf_set(-1.0f))));
        for (; i < dim; i++)
            row[i] = expf(-gate[i]);
        for (i = 0; i < dim; i++)
            row[i] = gate[i] / (1.0f + row[i]) * up[i];
    }
}

/* out = a + b, n floats (a residual connection, a bias): what a decode plan (plan.c) runs for torch's add. */
void trillm_add(const float *a, const float *b, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++)
        out[i] = a[i] + b[i];
}

/* A mixture of experts' routing (models/layers.py: mixture_of_experts) for `tokens` tokens x (tokens, dim)
 * and their router logits (tokens, experts): each token's k highest logits (the lower index first among
 * equals) and a softmax over those k; then the (token, rank) pairs sorted by expert, stably, as
 * argsort(stable=True) sorts them. Out: rows (tokens k, dim), the token of each pair copied, in that order;
 * token_of_row and weight_of_row (tokens k) beside them; groups (experts, 2) of (expert, rows) for the
 * experts routed to, in increasing order, and their number in *n_groups. Returns ERROR_SHAPE unless
 * 1 <= k <= experts <= MAX_ROUTED_EXPERTS. */
#define MAX_ROUTED_EXPERTS 1024
int trillm_route_to_experts(const float *x, const float *logits, int64_t tokens, int64_t dim, int64_t experts,
                            int64_t k, float *rows, int64_t *token_of_row, float *weight_of_row, int64_t *groups,
                            int64_t *n_groups) {
    if (k < 1 || k > experts || experts > MAX_ROUTED_EXPERTS || tokens < 0)
        return ERROR_SHAPE;
    int64_t *chosen = malloc(tokens * k * sizeof *chosen), counts[MAX_ROUTED_EXPERTS] = {0};
    float *weights = malloc(tokens * k * sizeof *weights);
    if (!chosen || !weights) {
        free(chosen), free(weights);
        return ERROR_MEMORY;
    }
    for (int64_t t = 0; t < tokens; t++) {
        const float *row = logits + t * experts;
        int64_t *top = chosen + t * k;
        float *w = weights + t * k;
        for (int64_t j = 0; j < k; j++) { /* the j-th highest: k is a handful */
            int64_t best = -1;
            for (int64_t e = 0; e < experts; e++) {
                int taken = 0;
                for (int64_t i = 0; i < j; i++)
                    taken |= top[i] == e;
                if (!taken && (best < 0 || row[e] > row[best]))
                    best = e;
            }
            top[j] = best;
            counts[best]++;
        }
        float sum = 0.0f; /* softmax over the chosen, as torch: e^(l - max) / sum */
        for (int64_t j = 0; j < k; j++)
            sum += w[j] = expf(row[top[j]] - row[top[0]]);
        for (int64_t j = 0; j < k; j++)
            w[j] /= sum;
    }
    int64_t start[MAX_ROUTED_EXPERTS], next = 0, g = 0;
    for (int64_t e = 0; e < experts; e++) {
        start[e] = next;
        next += counts[e];
        if (counts[e]) {
            groups[2 * g] = e;
            groups[2 * g++ + 1] = counts[e];
        }
    }
    *n_groups = g;
    for (int64_t pair = 0; pair < tokens * k; pair++) { /* in (token, rank) order: a stable sort */
        int64_t row = start[chosen[pair]]++;
        token_of_row[row] = pair / k;
        weight_of_row[row] = weights[pair];
        memcpy(rows + row * dim, x + pair / k * dim, dim * sizeof *rows);
    }
    free(chosen), free(weights);
    return OK;
}

/* out (tokens, dim) = for each token, the sum of its routed rows y (n, dim) times their weights, added in
 * the rows' order (index_add_'s). */
void trillm_combine_experts(const float *y, const float *weight_of_row, const int64_t *token_of_row, int64_t n,
                            int64_t dim, int64_t tokens, float *out) {
    memset(out, 0, tokens * dim * sizeof *out);
    for (int64_t row = 0; row < n; row++) {
        float *o = out + token_of_row[row] * dim;
        const float *in = y + row * dim, w = weight_of_row[row];
        for (int64_t i = 0; i < dim; i++)
            o[i] += in[i] * w;
    }
}

/* out = a, n floats: what a decode plan runs for torch.cat of single rows (plan.c). */
void trillm_copy(const float *a, int64_t n, float *out) { memcpy(out, a, n * sizeof *out); }

/* out = [a0, b0, a1, b1, ...], n floats of each: two banks' outputs, their rows interleaved. */
void trillm_interleave(const float *a, const float *b, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) {
        out[2 * i] = a[i];
        out[2 * i + 1] = b[i];
    }
}

/* out = (clamp(up, -limit, limit) + 1) * g sigmoid(alpha g), g = min(gate, limit), for each of `rows` rows of
 * gate_up = [gate 0, up 0, gate 1, up 1, ...] (2 dim): gpt-oss's clamped SwiGLU, its release's interleaved
 * order. NaN stays NaN, as in torch's clamp. */
void trillm_clamped_swiglu(const float *gate_up, int64_t rows, int64_t dim, float alpha, float limit, float *out) {
    const int64_t n = rows * dim;
    /* out first holds -alpha g, then e^(-alpha g) by the vector exp (the work: a prompt has millions) */
    for (int64_t i = 0; i < n; i++) {
        float gate = gate_up[2 * i];
        out[i] = -((gate > limit ? limit : gate) * alpha);
    }
    int64_t i = 0;
    for (; i + VLEN <= n; i += VLEN)
        vf_store(out + i, vf_exp(vf_load(out + i)));
    for (; i < n; i++)
        out[i] = expf(out[i]);
    for (i = 0; i < n; i++) {
        float gate = gate_up[2 * i], up = gate_up[2 * i + 1];
        gate = gate > limit ? limit : gate;
        up = up > limit ? limit : up < -limit ? -limit : up;
        out[i] = (up + 1.0f) * (gate * (1.0f / (1.0f + out[i])));
    }
}

/* x rotated by RoPE in the "rotate half" layout: channel i pairs with channel i + head_dim / 2, and the
 * sine table carries the rotation's sign (-sin for the first half, +sin for the second), as apply_rope. */
static void rotate(const float *x, const float *cos, const float *sin, int64_t head_dim, float *out) {
    int64_t half = head_dim / 2;
    for (int64_t i = 0; i < half; i++) {
        out[i] = x[i] * cos[i] + x[i + half] * sin[i];
        out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    }
}

/* out (head_dim) += sum_j p[j] values[j], values (length, head_dim): 4 vectors of out at a time (then 1)
 * summed in registers over all positions. */
static void weighted_sum(const float *p, const float *values, int64_t length, int64_t head_dim, float *out) {
    int64_t i = 0;
    for (; i + 4 * VLEN <= head_dim; i += 4 * VLEN) {
        vf sum[4] = {vf_load(out + i), vf_load(out + i + VLEN), vf_load(out + i + 2 * VLEN), vf_load(out + i + 3 * VLEN)};
        for (int64_t j = 0; j < length; j++)
            for (int k = 0; k < 4; k++)
                sum[k] = vf_fma(vf_set(p[j]), vf_load(values + j * head_dim + i + k * VLEN), sum[k]);
        for (int k = 0; k < 4; k++)
            vf_store(out + i + k * VLEN, sum[k]);
    }
    for (; i + VLEN <= head_dim; i += VLEN) {
        vf sum = vf_load(out + i);
        for (int64_t j = 0; j < length; j++)
            sum = vf_fma(vf_set(p[j]), vf_load(values + j * head_dim + i), sum);
        vf_store(out + i, sum);
    }
    for (; i < head_dim; i++) {
        for (int64_t j = 0; j < length; j++)
            out[i] += p[j] * values[j * head_dim + i];
    }
}

/* p (length) = softmax(p) over its scores and one more logit, `sink` (-INFINITY for none), whose own weight
 * is dropped: the vector exp and max where the ISA has them, length being thousands in a long context. */
static void softmax_with_sink(float *p, int64_t length, float sink) {
    vf max_vector = vf_set(sink);
    int64_t j = 0;
    for (; j + VLEN <= length; j += VLEN)
        max_vector = vf_max(max_vector, vf_load(p + j));
    float max_score = vf_max_all(max_vector);
    for (; j < length; j++)
        max_score = p[j] > max_score ? p[j] : max_score;
    const vf max_scores = vf_set(max_score);
    vf totals = vf_zero();
    for (j = 0; j + VLEN <= length; j += VLEN) {
        vf e = vf_exp(vf_add(vf_load(p + j), vf_mul(max_scores, vf_set(-1.0f))));
        vf_store(p + j, e);
        totals = vf_add(totals, e);
    }
    float total = vf_sum(totals) + (sink == -INFINITY ? 0.0f : expf(sink - max_score));
    for (; j < length; j++)
        total += p[j] = expf(p[j] - max_score);
    const vf scale = vf_set(1.0f / total);
    for (j = 0; j + VLEN <= length; j += VLEN)
        vf_store(p + j, vf_mul(vf_load(p + j), scale));
    for (; j < length; j++)
        p[j] /= total;
}

struct attention_call {
    const float *qkv, *cos, *sin, *keys, *values, *sinks;
    float *out;
    int64_t batch, heads, kv_heads, head_dim, length;
    int64_t kv_batch_stride, kv_head_stride; /* floats; positions are head_dim apart */
    float scale;
};

/* Positions a pass over the cache takes: the query heads that share a key/value head meet each span of its
 * keys and values in L2 (256 of 64 floats are 64 KB), so a long context is read from memory once a key/value
 * head, not once a query head (8 times, for gpt-oss's 64 query and 8 key/value heads). */
#define ATTENTION_SPAN 256

/* One thread's query heads, a contiguous range, taken as runs that share a key/value head. */
static void attention_chunk(void *arg, int chunk, int chunks) {
    const struct attention_call *c = arg;
    const int64_t group = c->heads / c->kv_heads, length = c->length, head_dim = c->head_dim;
    const int64_t end = c->batch * c->heads * (chunk + 1) / chunks;
    float *scores = malloc(group * (length + head_dim) * sizeof *scores), *q = scores + group * length;
    for (int64_t first = c->batch * c->heads * chunk / chunks, last; first < end; first = last) {
        const int64_t b = first / c->heads, kv_head = first % c->heads / group;
        last = b * c->heads + (kv_head + 1) * group < end ? b * c->heads + (kv_head + 1) * group : end;
        const int64_t n = last - first; /* query heads first..last-1 of sequence b read kv head kv_head */
        const float *keys = c->keys + b * c->kv_batch_stride + kv_head * c->kv_head_stride;
        const float *values = c->values + b * c->kv_batch_stride + kv_head * c->kv_head_stride;
        for (int64_t g = 0; g < n; g++)
            rotate(c->qkv + (b * (c->heads + 2 * c->kv_heads) + (first + g) % c->heads) * head_dim, c->cos, c->sin,
                   head_dim, q + g * head_dim);
        for (int64_t j0 = 0; j0 < length; j0 += ATTENTION_SPAN) {
            const int64_t j1 = j0 + ATTENTION_SPAN < length ? j0 + ATTENTION_SPAN : length;
            for (int64_t g = 0; g < n; g++) {
                float *p = scores + g * length;
                int64_t j = j0;
                for (; j + 4 <= j1; j += 4)
                    dot4(q + g * head_dim, keys + j * head_dim, head_dim, head_dim, p + j);
                for (; j < j1; j++)
                    p[j] = dot(q + g * head_dim, keys + j * head_dim, head_dim);
                for (j = j0; j < j1; j++)
                    p[j] *= c->scale;
            }
        }
        for (int64_t g = 0; g < n; g++) {
            float *p = scores + g * length;
            /* A sink (gpt-oss) is one more logit in the softmax's denominator whose value is dropped: the head
             * may give a token less than all of its attention. */
            softmax_with_sink(p, length, c->sinks ? c->sinks[(first + g) % c->heads] : -INFINITY);
            memset(c->out + (first + g) * head_dim, 0, head_dim * sizeof *c->out);
        }
        for (int64_t j0 = 0; j0 < length; j0 += ATTENTION_SPAN) {
            const int64_t j1 = j0 + ATTENTION_SPAN < length ? j0 + ATTENTION_SPAN : length;
            for (int64_t g = 0; g < n; g++)
                weighted_sum(scores + g * length + j0, values + j0 * head_dim, j1 - j0, head_dim,
                             c->out + (first + g) * head_dim);
        }
    }
    free(scores);
}

/* The attention of a decode step, one new token a sequence, in one call: rotate its query and key heads
 * (RoPE), store its key and value in cache slot `slot`, attend over slots 0..length-1 (a full layer: the
 * token's position and every one before; a sliding-window layer: a ring of the last positions, in any order).
 * qkv: (batch, heads + 2 kv_heads, head_dim), the fused projection's output. cos, sin: (head_dim) tables
 * of this position (see rotate). keys/values: the layer's cache (batch, kv_heads, slots, head_dim) with the
 * given strides. sinks: one logit per head, or NULL. out: (batch, heads, head_dim). Query head h reads kv
 * head h / (heads / kv_heads) (grouped-query attention). Returns OK, or ERROR_SHAPE (touching nothing) for
 * head counts that do not group, an odd head_dim, or a slot past the attended ones. */
int trillm_attention_one_token(const float *qkv, const float *cos, const float *sin, float *keys, float *values,
                               const float *sinks, int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim,
                               int64_t slot, int64_t length, int64_t kv_batch_stride, int64_t kv_head_stride,
                               float scale, float *out) {
    if (batch < 0 || kv_heads < 1 || heads < kv_heads || heads % kv_heads || head_dim < 2 || head_dim % 2 ||
        slot < 0 || slot >= length)
        return ERROR_SHAPE;
    for (int64_t b = 0; b < batch; b++)
        for (int64_t h = 0; h < kv_heads; h++) {
            const float *key = qkv + (b * (heads + 2 * kv_heads) + heads + h) * head_dim;
            int64_t at = b * kv_batch_stride + h * kv_head_stride + slot * head_dim;
            rotate(key, cos, sin, head_dim, keys + at);
            memcpy(values + at, key + kv_heads * head_dim, head_dim * sizeof *values);
        }
    struct attention_call call = {qkv, cos, sin, keys, values, sinks, out, batch, heads, kv_heads, head_dim, length,
                                  kv_batch_stride, kv_head_stride, scale};
    int64_t work = batch * heads * length * head_dim;
    run_parallel(attention_chunk, &call, work < PARALLEL_MIN_WORK ? 1 : pool_threads(), 1);
    return OK;
}
