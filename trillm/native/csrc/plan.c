/* Decode plans: a decode step recorded once as the calls it makes into this library, with their buffers,
 * and run again for each new token in one call (trillm/native/plan.py records it), so that the Python and
 * torch code around the kernels runs once a sequence instead of once a token.
 *
 * A step is one entry point and its arguments as recorded, the integers (pointers, sizes) and the floats
 * apart. The token's position is the one thing that changes between runs (its id is written into the
 * embedding's input buffer before each run): the attention step reads it for the cache slot it writes and
 * attends up to, and for its row of the cache's rotation tables.
 */
#include <stdlib.h>

#include "kernels.h"

#define STEP_INTEGERS 20
#define STEP_FLOATS 2

typedef int step_fn(const int64_t *i, const float *f, int64_t position);

struct plan_step {
    step_fn *run;
    int64_t i[STEP_INTEGERS];
    float f[STEP_FLOATS];
};

struct plan {
    struct plan_step *steps;
    int64_t count, capacity;
};

#define POINTER(k) ((void *)(intptr_t)i[k])

static int run_matmul(const int64_t *i, const float *f, int64_t position) {
    (void)f, (void)position;
    return trillm_matmul((int)i[0], POINTER(1), i[2], i[3], i[4], POINTER(5), i[6], POINTER(7));
}

static int run_matmul_int8(const int64_t *i, const float *f, int64_t position) {
    (void)f, (void)position;
    return trillm_matmul_int8((int)i[0], POINTER(1), i[2], i[3], i[4], POINTER(5), i[6], POINTER(7));
}

static int run_decode_rows(const int64_t *i, const float *f, int64_t position) {
    (void)f, (void)position;
    return trillm_decode_rows((int)i[0], POINTER(1), i[2], i[3], i[4], POINTER(5), i[6], POINTER(7));
}

static int run_release_rows(const int64_t *i, const float *f, int64_t position) {
    (void)f, (void)position;
    return trillm_release_rows(POINTER(0), i[1], i[2], POINTER(3), i[4]);
}

static int run_ternary_matmul(const int64_t *i, const float *f, int64_t position) {
    (void)f, (void)position;
    return trillm_ternary_matmul(POINTER(0), i[1], i[2], POINTER(3), i[4], POINTER(5), i[6], POINTER(7));
}

static int run_rms_norm(const int64_t *i, const float *f, int64_t position) {
    (void)position;
    trillm_rms_norm(POINTER(0), POINTER(1), i[2], i[3], f[0], POINTER(4));
    return OK;
}

static int run_squared_relu_glu(const int64_t *i, const float *f, int64_t position) {
    (void)f, (void)position;
    trillm_squared_relu_glu(POINTER(0), i[1], i[2], POINTER(3));
    return OK;
}

static int run_swiglu(const int64_t *i, const float *f, int64_t position) {
    (void)f, (void)position;
    trillm_swiglu(POINTER(0), i[1], i[2], POINTER(3));
    return OK;
}

static int run_clamped_swiglu(const int64_t *i, const float *f, int64_t position) {
    (void)position;
    trillm_clamped_swiglu(POINTER(0), i[1], i[2], f[0], f[1], POINTER(3));
    return OK;
}

static int run_mxfp4_experts(const int64_t *i, const float *f, int64_t position) {
    (void)f, (void)position;
    return trillm_mxfp4_experts((int)i[0], (int)i[1], POINTER(2), i[3], i[4], i[5], POINTER(6), i[7], i[8], i[9],
                                i[10], i[11], i[12], POINTER(13), POINTER(14), i[15], POINTER(16), i[17], POINTER(18));
}

static int run_route_to_experts(const int64_t *i, const float *f, int64_t position) {
    (void)f, (void)position;
    return trillm_route_to_experts(POINTER(0), POINTER(1), i[2], i[3], i[4], i[5], POINTER(6), POINTER(7),
                                   POINTER(8), POINTER(9), POINTER(10));
}

static int run_combine_experts(const int64_t *i, const float *f, int64_t position) {
    (void)f, (void)position;
    trillm_combine_experts(POINTER(0), POINTER(1), POINTER(2), i[3], i[4], i[5], POINTER(6));
    return OK;
}

static int run_interleave(const int64_t *i, const float *f, int64_t position) {
    (void)f, (void)position;
    trillm_interleave(POINTER(0), POINTER(1), i[2], POINTER(3));
    return OK;
}

static int run_copy(const int64_t *i, const float *f, int64_t position) {
    (void)f, (void)position;
    trillm_copy(POINTER(0), i[1], POINTER(2));
    return OK;
}

static int run_add(const int64_t *i, const float *f, int64_t position) {
    (void)f, (void)position;
    trillm_add(POINTER(0), POINTER(1), i[2], POINTER(3));
    return OK;
}

/* trillm_attention_one_token at the run's position. Integers: qkv, the cos and sin tables (rope_rows rows
 * of head_dim), keys, values, sinks (or 0), batch, heads, kv_heads, head_dim, the cache's slots, its window
 * (0: none; else the slots are a ring), the caches' batch and head strides, out, rope_rows; the float: the
 * scale. The slot and length as models/layers.py's cache_slot computes them. */
static int run_attention(const int64_t *i, const float *f, int64_t position) {
    const int64_t head_dim = i[9], slots = i[10], window = i[11], rope_rows = i[15];
    if (position < 0 || position >= rope_rows || (!window && position >= slots))
        return ERROR_INDEX;
    const int64_t slot = window ? position % slots : position;
    const int64_t length = window && position + 1 > slots ? slots : position + 1;
    const float *cos = (const float *)POINTER(1) + position * head_dim, *sin = (const float *)POINTER(2) + position * head_dim;
    return trillm_attention_one_token(POINTER(0), cos, sin, POINTER(3), POINTER(4), POINTER(5), i[6], i[7], i[8],
                                      head_dim, slot, length, i[12], i[13], f[0], POINTER(14));
}

static const struct {
    const char *name;
    step_fn *run;
} STEPS[] = {
    {"trillm_matmul", run_matmul},
    {"trillm_matmul_int8", run_matmul_int8},
    {"trillm_decode_rows", run_decode_rows},
    {"trillm_release_rows", run_release_rows},
    {"trillm_ternary_matmul", run_ternary_matmul},
    {"trillm_rms_norm", run_rms_norm},
    {"trillm_squared_relu_glu", run_squared_relu_glu},
    {"trillm_swiglu", run_swiglu},
    {"trillm_clamped_swiglu", run_clamped_swiglu},
    {"trillm_add", run_add},
    {"trillm_copy", run_copy},
    {"trillm_mxfp4_experts", run_mxfp4_experts},
    {"trillm_route_to_experts", run_route_to_experts},
    {"trillm_combine_experts", run_combine_experts},
    {"trillm_interleave", run_interleave},
    {"attention_at_position", run_attention},
};

void *trillm_plan_new(void) { return calloc(1, sizeof(struct plan)); }

void trillm_plan_free(void *plan) {
    if (plan)
        free(((struct plan *)plan)->steps);
    free(plan);
}

/* Append a step: the entry point `name` (or attention_at_position) with its arguments. Returns OK,
 * ERROR_TYPE for a name no step runs, ERROR_SHAPE for more arguments than a step holds, ERROR_MEMORY. */
int trillm_plan_add(void *handle, const char *name, const int64_t *integers, int64_t n_integers, const float *floats,
                    int64_t n_floats) {
    struct plan *plan = handle;
    if (n_integers < 0 || n_integers > STEP_INTEGERS || n_floats < 0 || n_floats > STEP_FLOATS)
        return ERROR_SHAPE;
    step_fn *run = NULL;
    for (size_t k = 0; k < sizeof STEPS / sizeof STEPS[0]; k++)
        if (!strcmp(STEPS[k].name, name))
            run = STEPS[k].run;
    if (!run)
        return ERROR_TYPE;
    if (plan->count == plan->capacity) {
        int64_t capacity = plan->capacity ? 2 * plan->capacity : 256;
        struct plan_step *steps = realloc(plan->steps, capacity * sizeof *steps);
        if (!steps)
            return ERROR_MEMORY;
        plan->steps = steps;
        plan->capacity = capacity;
    }
    struct plan_step *step = &plan->steps[plan->count++];
    *step = (struct plan_step){.run = run};
    memcpy(step->i, integers, n_integers * sizeof *integers);
    memcpy(step->f, floats, n_floats * sizeof *floats);
    return OK;
}

/* Every step in order, for the token at `position`; the first error stops the run and is returned. */
int trillm_plan_run(const void *handle, int64_t position) {
    const struct plan *plan = handle;
    for (int64_t s = 0; s < plan->count; s++) {
        const struct plan_step *step = &plan->steps[s];
        int code = step->run(step->i, step->f, position);
        if (code != OK)
            return code;
    }
    return OK;
}
