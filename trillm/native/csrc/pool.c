/* The kernels' own small thread pool.
 *
 * Why not OpenMP: trillm runs torch with OMP_WAIT_POLICY=PASSIVE (spinning threads collapse when the
 * machine is shared), and our library would share torch's libgomp, so every matmul would wake its
 * threads from a futex: 10-40 us a call here, against 5-15 us for a whole 576x576 Q4_1 matvec. These
 * workers spin for a short while after each job instead, long enough to catch the next matmul of a
 * decode step, then sleep: an idle process costs nothing and a decoding one pays ~1 us a call.
 *
 * A job is cut into more chunks than threads and every thread, the caller included, claims chunks until
 * none are left. The caller never waits for a worker that has not started (asleep, or preempted on a
 * busy machine): it does that worker's chunks itself.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>

#include "kernels.h"

#define MAX_WORKERS 255
#define CHUNKS_PER_THREAD 4
#define SPIN_NANOSECONDS 200000 /* longer than the gaps between the matmuls of a decode step */

static struct {
    pthread_mutex_t submit; /* one caller at a time drives the workers */
    pthread_mutex_t lock;   /* guards sleeping, and the wake-up of sleepers */
    pthread_cond_t wake;
    atomic_uint generation; /* bumped for each job */
    atomic_uint_fast64_t claim; /* the job's generation << 32 | chunks not yet claimed */
    atomic_int finished;    /* chunks done */
    int workers, sleeping, threads_wanted;
    chunk_fn *run;          /* the current job: run(arg, chunk, chunks) for every chunk */
    void *arg;
    int chunks;
    atomic_int helpers, linger; /* read by workers that may be a job late, hence atomic */
} pool = {.submit = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Run chunks of job `generation` until none are left. A chunk claimed is a chunk the caller waits for,
 * so the job's fields stay valid while it runs. */
static void run_chunks(unsigned generation) {
    uint_fast64_t claim = atomic_load(&pool.claim);
    while ((unsigned)(claim >> 32) == generation && (uint32_t)claim > 0) {
        if (atomic_compare_exchange_weak(&pool.claim, &claim, claim - 1)) {
            pool.run(pool.arg, (int)(uint32_t)claim - 1, pool.chunks);
            atomic_fetch_add_explicit(&pool.finished, 1, memory_order_release);
            claim = atomic_load(&pool.claim);
        }
    }
}

/* Wait until the generation moves past `seen`: spinning for spin_nanoseconds, then asleep. */
static unsigned wait_for_job(unsigned seen, int64_t spin_nanoseconds) {
    int64_t give_up = now_ns() + spin_nanoseconds;
    unsigned generation;
    for (int spins = 1; (generation = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen; spins++) {
        cpu_relax();
        if (spins % 256 == 0 && now_ns() > give_up) {
            pthread_mutex_lock(&pool.lock);
            pool.sleeping++;
            while ((generation = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen)
                pthread_cond_wait(&pool.wake, &pool.lock);
            pool.sleeping--;
            pthread_mutex_unlock(&pool.lock);
        }
    }
    return generation;
}

static void *worker_main(void *index) {
    int helper = (int)(intptr_t)index, linger = 1;
    unsigned generation = atomic_load(&pool.generation);
    for (;;) {
        generation = wait_for_job(generation, linger ? SPIN_NANOSECONDS : 0);
        linger = pool.linger;
        if (helper < pool.helpers) /* fewer threads may have been asked for since this one started */
            run_chunks(generation);
    }
    return NULL;
}

/* A forked child has none of the parent's threads: start afresh. */
static void forget_workers(void) {
    pthread_mutex_init(&pool.submit, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.workers = pool.sleeping = 0;
}

__attribute__((constructor)) static void watch_forks(void) { pthread_atfork(NULL, NULL, forget_workers); }

void trillm_set_num_threads(int n) { pool.threads_wanted = n; }

/* The threads a large job is split over: as set, or else every CPU this process may run on. */
int pool_threads(void) {
    if (pool.threads_wanted > 0)
        return pool.threads_wanted;
    cpu_set_t cpus;
    return sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? CPU_COUNT(&cpus) : 1;
}

void run_parallel(chunk_fn *run, void *arg, int threads, int linger) {
    if (threads <= 1 || pthread_mutex_trylock(&pool.submit) != 0) {
        run(arg, 0, 1); /* one thread wanted, or another caller holds the pool: all on this thread */
        return;
    }
    if (pool.workers < threads - 1) {
        sigset_t all, caller;
        sigfillset(&all); /* workers inherit this mask: signals (Ctrl-C) stay with Python's threads */
        pthread_sigmask(SIG_SETMASK, &all, &caller);
        while (pool.workers < threads - 1 && pool.workers < MAX_WORKERS) {
            pthread_t thread;
            if (pthread_create(&thread, NULL, worker_main, (void *)(intptr_t)pool.workers))
                break;
            pthread_detach(thread);
            pool.workers++;
        }
        pthread_sigmask(SIG_SETMASK, &caller, NULL);
    }
    unsigned generation = atomic_load(&pool.generation) + 1;
    pool.run = run;
    pool.arg = arg;
    pool.chunks = threads * CHUNKS_PER_THREAD;
    pool.helpers = threads - 1;
    pool.linger = linger;
    atomic_store(&pool.finished, 0);
    atomic_store(&pool.claim, (uint_fast64_t)generation << 32 | (uint32_t)pool.chunks);
    pthread_mutex_lock(&pool.lock); /* a worker going to sleep checks the generation under this lock */
    atomic_store_explicit(&pool.generation, generation, memory_order_release);
    if (pool.sleeping)
        pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    run_chunks(generation);
    for (int spins = 1; atomic_load_explicit(&pool.finished, memory_order_acquire) < pool.chunks; spins++)
        if (spins % 1024 == 0)
            sched_yield(); /* a worker holding a chunk was preempted: let it run */
        else
            cpu_relax();
    pthread_mutex_unlock(&pool.submit);
}
