/* The functions trillm/weights/native.py calls through ctypes: find a weight type's row kernels (dense.c,
 * ggml.c) and split the rows over OpenMP threads. All return 0, or a negative code Python turns into
 * an error: -1 for a type without kernels, -2 for a row index out of range.
 */
#include <omp.h>

#include "kernels.h"

/* Below this many weight bytes the calling thread works alone: waking the others costs more than they
 * save on a matrix that small. */
#define PARALLEL_MIN_BYTES (64 * 1024)

static int thread_count; /* 0: OpenMP's default */

void trillm_set_num_threads(int n) { thread_count = n; }

static int find_kernels(int type, struct row_kernels *k) { return dense_kernels(type, k) || ggml_kernels(type, k); }

static int threads_for(int64_t bytes) {
    if (bytes < PARALLEL_MIN_BYTES)
        return 1;
    return thread_count > 0 ? thread_count : omp_get_max_threads();
}

/* y = x W^T: x is (tokens, cols), y is (tokens, rows), W has rows of row_bytes stored bytes. Each thread
 * takes one contiguous slice of the rows, and reads it once per MAX_TOKENS tokens. */
int trillm_matmul(int type, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t cols, const float *x,
                  int64_t tokens, float *y) {
    struct row_kernels k;
    if (!find_kernels(type, &k))
        return -1;
#pragma omp parallel num_threads(threads_for(rows * row_bytes))
    {
        int threads = omp_get_num_threads(), me = omp_get_thread_num();
        int64_t r0 = rows * me / threads, r1 = rows * (me + 1) / threads;
        for (int64_t t = 0; t < tokens; t += MAX_TOKENS) {
            int pass = tokens - t < MAX_TOKENS ? (int)(tokens - t) : MAX_TOKENS;
            struct matmul_job job = {w, row_bytes, cols, x + t * cols, pass, y + t * rows, rows};
            k.matmul_rows(&job, r0, r1);
        }
    }
    return 0;
}

/* Decode rows to float32 out (n, cols): rows ids[0..n) or, when ids is NULL, all n rows. */
int trillm_decode_rows(int type, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t cols,
                       const int64_t *ids, int64_t n, float *out) {
    struct row_kernels k;
    if (!find_kernels(type, &k))
        return -1;
    for (int64_t i = 0; ids && i < n; i++)
        if (ids[i] < 0 || ids[i] >= rows)
            return -2;
#pragma omp parallel for num_threads(threads_for(n * row_bytes)) schedule(static)
    for (int64_t i = 0; i < n; i++)
        k.decode_row(w + (ids ? ids[i] : i) * row_bytes, cols, out + i * cols);
    return 0;
}
