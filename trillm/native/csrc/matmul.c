/* The entry points for weights stored as rows (trillm/weights/rows.py): find a weight type's row kernels
 * (dense.c, ggml.c) and split the rows over the thread pool (pool.c). All return OK or an error code
 * (kernels.h).
 */
#include <stdlib.h>
#if defined(__linux__)
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "kernels.h"

/* Below this many weight bytes the calling thread works alone: handing out a job costs about a
 * microsecond, more than a second thread saves on a matrix this small. */
#define PARALLEL_MIN_BYTES (32 * 1024)

static int threads_for(int64_t bytes) { return bytes < PARALLEL_MIN_BYTES ? 1 : pool_threads(); }

struct matmul_call {
    matmul_rows_fn *matmul_rows;
    struct matmul_job job;
    int64_t rows, tokens;
};

/* One chunk of the rows, for every pass of MAX_TOKENS tokens. */
static void matmul_chunk(void *arg, int chunk, int chunks) {
    const struct matmul_call *call = arg;
    int64_t r0 = call->rows * chunk / chunks, r1 = call->rows * (chunk + 1) / chunks;
    for (int64_t t = 0; t < call->tokens; t += MAX_TOKENS) {
        struct matmul_job job = call->job;
        if (job.x8)
            job.x8 += t * (job.cols / QK_K);
        else if (job.x32)
            job.x32 += t * (job.cols / 32);
        else
            job.x += t * job.cols;
        job.y += t * call->rows;
        job.tokens = call->tokens - t < MAX_TOKENS ? (int)(call->tokens - t) : MAX_TOKENS;
        call->matmul_rows(&job, r0, r1);
    }
}

struct prompt_call {
    matmul_prompt_fn *prompt_rows;
    struct matmul_job job;
    int64_t rows;
    _Atomic int failed;
};

/* One chunk of whole panels (PANEL_ROWS rows) for all tokens. */
static void prompt_chunk(void *arg, int chunk, int chunks) {
    struct prompt_call *call = arg;
    int64_t panels = (call->rows + PANEL_ROWS - 1) / PANEL_ROWS, p0 = panels * chunk / chunks, p1 = panels * (chunk + 1) / chunks;
    int64_t r1 = p1 * PANEL_ROWS < call->rows ? p1 * PANEL_ROWS : call->rows;
    if (p0 < p1 && call->prompt_rows(&call->job, p0 * PANEL_ROWS, r1) != OK)
        call->failed = 1;
}

/* y = x W^T: x is (tokens, cols), y is (tokens, rows), W has rows of row_bytes stored bytes. Rows are
 * split in contiguous chunks, each read once per MAX_TOKENS tokens. */
int trillm_matmul(int type, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t cols, const float *x,
                  int64_t tokens, float *y) {
    struct row_kernels kernels;
    if (!dense_kernels(type, &kernels) && !ggml_kernels(type, &kernels))
        return ERROR_TYPE;
    struct matmul_call call = {kernels.matmul_rows, {.w = w, .row_bytes = row_bytes, .cols = cols, .x = x, .y = y,
                                                     .y_stride = rows}, rows, tokens};
    run_parallel(matmul_chunk, &call, threads_for(rows * row_bytes), 1);
    return OK;
}

/* As trillm_matmul, with each token's activations first quantized to int8 (a scale per 32 of them, or per
 * QK_K for the K types), for the GGML types with an int8 kernel (ggml.c: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
 * Q4_K, Q5_K, Q6_K). What llama.cpp computes; no longer exactly a float matmul. cols must be a multiple of
 * the type's block. Prompts go to the type's prompt kernel where it has one (a GEMM over repacked panels). */
int trillm_matmul_int8(int type, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t cols, const float *x,
                       int64_t tokens, float *y) {
    struct row_kernels kernels = {0};
    if (!ggml_kernels(type, &kernels) || !kernels.matmul_rows_int8)
        return ERROR_TYPE;
    if (cols % kernels.int8_block)
        return ERROR_SHAPE;
    if (tokens == 0)
        return OK;
    const int64_t blocks = tokens * (cols / kernels.int8_block);
    const size_t size = blocks * (kernels.int8_block == QK_K ? sizeof(struct q8_k_block) : sizeof(struct q8_32_block));
    void *quantized = aligned_alloc(64, (size + 63) / 64 * 64); /* no vector of q straddles two cache lines */
    if (!quantized)
        return ERROR_MEMORY;
    struct matmul_job job = {.w = w, .row_bytes = row_bytes, .cols = cols, .y = y, .y_stride = rows,
                             .tokens = (int)tokens};
    struct matmul_call call = {kernels.matmul_rows_int8, job, rows, tokens};
    if (kernels.int8_block == QK_K) {
        struct q8_k_block *x8 = quantized;
        for (int64_t i = 0; i < blocks; i++)
            quantize_q8_k(x + i * QK_K, x8 + i);
        call.job.x8 = x8;
    } else {
        struct q8_32_block *x32 = quantized;
        for (int64_t i = 0; i < blocks; i++)
            quantize_q8_32(x + i * 32, x32 + i);
        call.job.x32 = x32;
    }
    int status = OK;
    if (kernels.int8_prompt_rows && tokens > MAX_TOKENS && tokens <= INT32_MAX) {
        struct prompt_call prompt = {kernels.int8_prompt_rows, call.job, rows, 0};
        run_parallel(prompt_chunk, &prompt, threads_for(rows * row_bytes), 1);
        status = prompt.failed ? ERROR_MEMORY : OK;
    } else {
        run_parallel(matmul_chunk, &call, threads_for(rows * row_bytes), 1);
    }
    free(quantized);
    return status;
}

struct decode_call {
    struct row_kernels kernels;
    const uint8_t *w;
    int64_t row_bytes, cols, n;
    const int64_t *ids;
    float *out;
};

static void decode_chunk(void *arg, int chunk, int chunks) {
    const struct decode_call *call = arg;
    for (int64_t i = call->n * chunk / chunks; i < call->n * (chunk + 1) / chunks; i++) {
        int64_t row = call->ids ? call->ids[i] : i;
        call->kernels.decode_row(call->w + row * call->row_bytes, call->cols, call->out + i * call->cols);
    }
}

/* Decode rows to float32 out (n, cols): rows ids[0..n) (an embedding lookup, part of a decode step) or,
 * when ids is NULL, all n rows (a whole weight, for a prefill matmul in torch that follows at once, so
 * the workers should not linger and compete with torch's threads). */
int trillm_decode_rows(int type, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t cols,
                       const int64_t *ids, int64_t n, float *out) {
    struct decode_call call = {.w = w, .row_bytes = row_bytes, .cols = cols, .n = n, .ids = ids, .out = out};
    if (!dense_kernels(type, &call.kernels) && !ggml_kernels(type, &call.kernels))
        return ERROR_TYPE;
    for (int64_t i = 0; ids && i < n; i++)
        if (ids[i] < 0 || ids[i] >= rows)
            return ERROR_INDEX;
    run_parallel(decode_chunk, &call, threads_for(n * row_bytes), ids != NULL);
    return OK;
}

#if defined(__linux__) && defined(MADV_DONTNEED)
/* Unmap the pages of [start, end) that are still the file's. The maps are copy-on-write: a page this process
 * wrote is its own copy now, and dropping it would lose the write, so /proc/self/pagemap is asked first
 * (bit 63: present, bit 61: a file page). Without pagemap nothing is dropped. */
static void release_file_pages(int pagemap, uintptr_t start, uintptr_t end, uintptr_t page) {
    uint64_t entries[512];
    for (uintptr_t at = start; at < end;) {
        const uintptr_t count = (end - at) / page < 512 ? (end - at) / page : 512;
        if (pread(pagemap, entries, count * 8, (off_t)(at / page * 8)) != (ssize_t)(count * 8))
            return;
        for (uintptr_t k = 0; k < count;) {
            uintptr_t run = k;
            while (run < count && (entries[run] >> 63 & 1) && (entries[run] >> 61 & 1))
                run++;
            if (run > k)
                madvise((void *)(at + k * page), (run - k) * page, MADV_DONTNEED);
            k = run + 1;
        }
        at += count * page;
    }
}
#endif

/* Unmap the file pages around looked-up rows ids[0..n) of a table that lies in a file's memory map (they stay
 * in the page cache). A lookup faults in the page cache's whole folio around its row, up to 2 MB, so each
 * token looked up from a memory-mapped embedding grew the resident memory by up to that much (measured on a
 * bf16 2B4T embedding: 250 KB a token). Everything in the 2 MB-aligned windows around the rows goes, clipped
 * to the table's own whole pages, except pages this process wrote. Returns OK; does nothing off Linux. */
int trillm_release_rows(const uint8_t *w, int64_t row_bytes, int64_t rows, const int64_t *ids, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= rows)
            return ERROR_INDEX;
#if defined(__linux__) && defined(MADV_DONTNEED)
    const int pagemap = open("/proc/self/pagemap", O_RDONLY);
    if (pagemap < 0)
        return OK;
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), window = 2u << 20; /* a multiple of any page size */
    const uintptr_t first = ((uintptr_t)w + page - 1) & ~(page - 1), last = ((uintptr_t)w + rows * row_bytes) & ~(page - 1);
    for (int64_t i = 0; i < n; i++) {
        const uintptr_t row = (uintptr_t)w + ids[i] * row_bytes;
        uintptr_t start = row & ~(window - 1), end = (row + row_bytes + window - 1) & ~(window - 1);
        start = start > first ? start : first;
        end = end < last ? end : last;
        if (end > start)
            release_file_pages(pagemap, start, end, page);
    }
    close(pagemap);
#else
    (void)w, (void)row_bytes;
#endif
    return OK;
}

/* The vector width this library was compiled for (see kernels.h), as a check that the library loaded is
 * the one asked for. */
int trillm_vector_floats(void) { return VLEN; }

/* Whether the integer kernels use VNNI's dot products (kernels.h: VNNI_256), the check for AVX-VNNI's level. */
int trillm_vnni(void) { return VNNI_256; }
