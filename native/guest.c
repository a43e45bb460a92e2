/* guest: C threads that touch (possibly uffd-registered) guest memory.
 *
 * Nothing here is ever called with the GIL held (cffi releases it), so a thread may block
 * on a userfaultfd fault that the trio loop of this same process serves.
 *
 * SIGBUS (UFFDIO_POISON'd page, memfd page beyond EOF) is caught per thread: a process-wide
 * handler siglongjmp's out when the faulting thread has armed a thread-local jump buffer,
 * otherwise it puts back the previous handler (pytest's faulthandler, SIG_DFL) and lets the
 * fault happen again there. */
#define _GNU_SOURCE
#include "guest.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / 8u)
#define GOLDEN 0x9E3779B97F4A7C15ull

/* ---- SIGBUS catching ------------------------------------------------------------------ */
static __thread sigjmp_buf *volatile vg_jmp;
static struct sigaction vg_prev;
static pthread_mutex_t vg_sig_mu = PTHREAD_MUTEX_INITIALIZER;
static volatile sig_atomic_t vg_chained;

static void vg_sigbus(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    sigjmp_buf *j = vg_jmp;
    if (j) {
        vg_jmp = NULL;
        siglongjmp(*j, 1);
    }
    /* Not ours: hand the signal to whoever had it before. A hardware fault re-executes
     * the faulting instruction after we return and is delivered to the restored handler;
     * a signal sent by kill() would be lost that way, so re-raise it. If we come back
     * here unarmed, the previous handler chained back to us (faulthandler enabled after
     * our first install saved us as ITS previous handler): end the cycle with SIG_DFL. */
    if (vg_chained) {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(sig, &dfl, NULL);
    } else {
        vg_chained = 1;
        sigaction(sig, &vg_prev, NULL);
    }
    if (si == NULL || si->si_code <= 0)
        raise(sig);
}

/* (Re)install the handler if someone (faulthandler.enable) replaced it since. */
static void vg_ensure_handler(void)
{
    struct sigaction cur;
    pthread_mutex_lock(&vg_sig_mu);
    if (sigaction(SIGBUS, NULL, &cur) == 0 &&
        !((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == vg_sigbus)) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = vg_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        vg_prev = cur;
        vg_chained = 0;
        sigaction(SIGBUS, &sa, NULL);
    }
    pthread_mutex_unlock(&vg_sig_mu);
}

/* After siglongjmp (savemask=0, to keep sigsetjmp free of syscalls) SIGBUS is still
 * blocked as it was inside the handler; a blocked synchronous SIGBUS kills the process. */
static void vg_after_sigbus(void)
{
    sigset_t s;
    vg_jmp = NULL;
    sigemptyset(&s);
    sigaddset(&s, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &s, NULL);
}

static void *vg_altstack_on(void)
{
    size_t sz = 65536;
    long min = sysconf(_SC_SIGSTKSZ);
    if (min > 0 && (size_t)min * 4 > sz)
        sz = (size_t)min * 4;
    stack_t st = {.ss_sp = malloc(sz), .ss_size = sz, .ss_flags = 0};
    if (st.ss_sp && sigaltstack(&st, NULL) != 0) {
        free(st.ss_sp);
        return NULL;
    }
    return st.ss_sp;
}

static void vg_altstack_off(void *mem)
{
    if (!mem)
        return;
    stack_t st = {.ss_sp = NULL, .ss_size = 0, .ss_flags = SS_DISABLE};
    sigaltstack(&st, NULL);
    free(mem);
}

static int vg_gettid(void) { return (int)syscall(SYS_gettid); }

static double vg_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- stamps (vmm_tierd/kernel/stamps.py, exactly) ------------------------------------ */
uint64_t vg_stamp_seed(uint64_t index, uint64_t version)
{
    uint64_t s = ((index + 1) * GOLDEN) ^ (version * 0xBF58476D1CE4E5B9ull);
    return s ? s : GOLDEN;
}

static inline uint64_t vg_xs(uint64_t x)
{
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
}

static void vg_stamp_words(volatile uint64_t *pg, uint64_t index, uint64_t version)
{
    uint64_t s = vg_stamp_seed(index, version), x = s;
    pg[0] = index + 1;
    pg[1] = version;
    for (unsigned i = 2; i < 256; i++) {
        x = vg_xs(x);
        pg[i] = x;
    }
    for (unsigned i = 256; i < WORDS; i++)
        pg[i] = s;
}

void vg_stamp_page(void *dst, uint64_t index, uint64_t version)
{
    if (version == 0)
        memset(dst, 0, PAGE);
    else
        vg_stamp_words((volatile uint64_t *)dst, index, version);
}

/* Guarded page operations: 0 = done, -1 = SIGBUS. */
static int vg_guarded_stamp(volatile uint64_t *pg, uint64_t index, uint64_t version)
{
    sigjmp_buf jb;
    if (sigsetjmp(jb, 0)) {
        vg_after_sigbus();
        return -1;
    }
    vg_jmp = &jb;
    vg_stamp_words(pg, index, version);
    vg_jmp = NULL;
    return 0;
}

static int vg_guarded_copy_out(const volatile uint8_t *src, uint8_t *dst, size_t n)
{
    sigjmp_buf jb;
    if (sigsetjmp(jb, 0)) {
        vg_after_sigbus();
        return -1;
    }
    vg_jmp = &jb;
    size_t i = 0;
    if (((uintptr_t)src & 7) == 0)
        for (; i + 8 <= n; i += 8) {
            uint64_t v = *(const volatile uint64_t *)(src + i);
            memcpy(dst + i, &v, 8);
        }
    for (; i < n; i++)
        dst[i] = src[i];
    vg_jmp = NULL;
    return 0;
}

static int vg_guarded_copy_in(volatile uint8_t *dst, const uint8_t *src, size_t n)
{
    sigjmp_buf jb;
    if (sigsetjmp(jb, 0)) {
        vg_after_sigbus();
        return -1;
    }
    vg_jmp = &jb;
    for (size_t i = 0; i < n; i++)
        dst[i] = src[i];
    vg_jmp = NULL;
    return 0;
}

static uint64_t vg_sink;

static int vg_guarded_touch_read(const volatile uint64_t *pg, unsigned word)
{
    sigjmp_buf jb;
    if (sigsetjmp(jb, 0)) {
        vg_after_sigbus();
        return -1;
    }
    vg_jmp = &jb;
    uint64_t v = pg[0] ^ pg[1] ^ pg[word];
    vg_jmp = NULL;
    __atomic_store_n(&vg_sink, v, __ATOMIC_RELAXED);
    return 0;
}

/* ---- one access ------------------------------------------------------------------------ */
struct vg_access {
    int kind;
    uint8_t *addr;
    size_t length;
    uint8_t *data;   /* WRITE input */
    uint8_t *result; /* READ / GUP_READ output */
    size_t result_len;
    int status;
    int err;
    atomic_int tid;
    atomic_int refs;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

static void vg_access_put(vg_access *a)
{
    if (atomic_fetch_sub(&a->refs, 1) == 1) {
        pthread_mutex_destroy(&a->mu);
        pthread_cond_destroy(&a->cv);
        free(a->data);
        free(a->result);
        free(a);
    }
}

static int vg_gup_read(vg_access *a)
{
    /* write() copies from user memory in kernel mode: a uffd-registered page blocks the
     * syscall like a guest access would (EFAULT instead if the uffd is USER_MODE_ONLY), a
     * poisoned page gives EFAULT. One pipe-capacity chunk at a time, so write never blocks. */
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0)
        return errno;
    int err = 0;
    size_t done = 0;
    while (done < a->length) {
        size_t chunk = a->length - done;
        if (chunk > 65536)
            chunk = 65536;
        ssize_t w = write(p[1], a->addr + done, chunk);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            err = errno;
            break;
        }
        size_t got = 0;
        while (got < (size_t)w) {
            ssize_t r = read(p[0], a->result + done + got, (size_t)w - got);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0) {
                err = r < 0 ? errno : EIO;
                break;
            }
            got += (size_t)r;
        }
        done += got;
        if (err)
            break;
    }
    a->result_len = done;
    close(p[0]);
    close(p[1]);
    return err;
}

static void *vg_access_thread(void *arg)
{
    vg_access *a = arg;
    atomic_store(&a->tid, vg_gettid());
    void *alt = vg_altstack_on();
    int status = VG_OK, err = 0;
    if (a->kind == VG_READ) {
        if (vg_guarded_copy_out(a->addr, a->result, a->length) != 0)
            status = VG_SIGBUS;
        else
            a->result_len = a->length;
    } else if (a->kind == VG_WRITE) {
        if (vg_guarded_copy_in(a->addr, a->data, a->length) != 0)
            status = VG_SIGBUS;
    } else {
        err = vg_gup_read(a);
        if (err)
            status = VG_ERROR;
    }
    vg_altstack_off(alt);
    pthread_mutex_lock(&a->mu);
    a->status = status;
    a->err = err;
    pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
    vg_access_put(a);
    return NULL;
}

vg_access *vg_access_start(int kind, uint64_t addr, size_t length, const uint8_t *data)
{
    if (kind < VG_READ || kind > VG_GUP_READ) {
        errno = EINVAL;
        return NULL;
    }
    vg_ensure_handler();
    vg_access *a = calloc(1, sizeof *a);
    if (!a)
        return NULL;
    a->kind = kind;
    a->addr = (uint8_t *)(uintptr_t)addr;
    a->length = length;
    atomic_init(&a->refs, 2);
    atomic_init(&a->tid, 0);
    pthread_mutex_init(&a->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&a->cv, &ca);
    pthread_condattr_destroy(&ca);
    size_t cap = length ? length : 1;
    if (kind == VG_WRITE) {
        a->data = malloc(cap);
        if (a->data && length)
            memcpy(a->data, data, length);
    } else {
        a->result = malloc(cap);
    }
    if (!a->data && !a->result) {
        atomic_store(&a->refs, 1);
        vg_access_put(a);
        errno = ENOMEM;
        return NULL;
    }
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_t th;
    int rc = pthread_create(&th, &at, vg_access_thread, a);
    pthread_attr_destroy(&at);
    if (rc != 0) {
        atomic_store(&a->refs, 1);
        vg_access_put(a);
        errno = rc;
        return NULL;
    }
    return a;
}

int vg_access_wait(vg_access *a, double timeout_s)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    if (timeout_s < 0)
        timeout_s = 0;
    time_t sec = (time_t)timeout_s;
    ts.tv_sec += sec;
    ts.tv_nsec += (long)((timeout_s - (double)sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&a->mu);
    while (a->status == VG_PENDING)
        if (pthread_cond_timedwait(&a->cv, &a->mu, &ts) == ETIMEDOUT)
            break;
    int st = a->status;
    pthread_mutex_unlock(&a->mu);
    return st;
}

int vg_access_status(vg_access *a)
{
    pthread_mutex_lock(&a->mu);
    int st = a->status;
    pthread_mutex_unlock(&a->mu);
    return st;
}

int vg_access_tid(vg_access *a) { return atomic_load(&a->tid); }

int vg_access_err(vg_access *a)
{
    pthread_mutex_lock(&a->mu);
    int e = a->err;
    pthread_mutex_unlock(&a->mu);
    return e;
}

size_t vg_access_result(vg_access *a, uint8_t *out, size_t cap)
{
    pthread_mutex_lock(&a->mu);
    size_t n = 0;
    if (a->status != VG_PENDING && a->result) {
        n = a->result_len < cap ? a->result_len : cap;
        memcpy(out, a->result, n);
    }
    pthread_mutex_unlock(&a->mu);
    return n;
}

/* The Python handle lets go; a thread still blocked in a fault frees it when it ends. */
void vg_access_release(vg_access *a) { vg_access_put(a); }

/* ---- memory for tests ---------------------------------------------------------------- */
void *vg_mmap(size_t length, int fd, uint64_t offset)
{
    void *p = fd < 0 ? mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                            -1, 0)
                     : mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)offset);
    return p == MAP_FAILED ? NULL : p;
}

int vg_munmap(void *addr, size_t length) { return munmap(addr, length) == 0 ? 0 : errno; }

/* ---- workload ------------------------------------------------------------------------ */
typedef struct vg_worker {
    struct vg_workload *w;
    int id;
    pthread_t th;
    int started;
    int joined;
    _Alignas(64) atomic_uint_fast64_t reads;
    atomic_uint_fast64_t writes;
    atomic_uint_fast64_t sigbus;
} vg_worker;

struct vg_workload {
    volatile uint64_t *base;
    uint64_t npages;
    vg_spec spec;
    uint64_t hot;           /* hot-set size in pages */
    uint64_t write_thresh;  /* a draw below this is a write */
    uint8_t *zero;          /* 1 = never written */
    uint64_t *perm;         /* ZIPF: page of each rank */
    double *cdf;            /* ZIPF: cumulative probability per rank */
    uint64_t ncdf;
    _Atomic uint64_t *versions;
    _Atomic uint32_t *counts; /* optional per-page access counters (tests) */
    atomic_int stop;
    atomic_int touched;
    atomic_int running;
    double t0;
    vg_worker *workers;
};

static inline uint64_t vg_splitmix(uint64_t *s)
{
    uint64_t z = (*s += GOLDEN);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline uint64_t vg_below(uint64_t *rng, uint64_t n)
{
    *rng = vg_xs(*rng);
    return (uint64_t)(((unsigned __int128)(*rng * 0x2545F4914F6CDD1Dull) * n) >> 64);
}

static void vg_count(struct vg_workload *w, uint64_t p)
{
    if (w->counts)
        atomic_fetch_add_explicit(&w->counts[p], 1, memory_order_relaxed);
}

/* Only the owning thread writes a page, so read-increment-store of its version is safe;
 * the release store publishes the version after the page content. */
static void vg_write_page(struct vg_workload *w, vg_worker *me, uint64_t p, int counted)
{
    uint64_t v = atomic_load_explicit(&w->versions[p], memory_order_relaxed) + 1;
    if (vg_guarded_stamp(w->base + p * WORDS, p, v) != 0) {
        atomic_fetch_add_explicit(&me->sigbus, 1, memory_order_relaxed);
        return;
    }
    atomic_store_explicit(&w->versions[p], v, memory_order_release);
    atomic_fetch_add_explicit(&me->writes, 1, memory_order_relaxed);
    if (counted)
        vg_count(w, p);
}

static void vg_read_page(struct vg_workload *w, vg_worker *me, uint64_t p, uint64_t *rng)
{
    if (vg_guarded_touch_read(w->base + p * WORDS, 2 + (unsigned)vg_below(rng, WORDS - 2)) != 0) {
        atomic_fetch_add_explicit(&me->sigbus, 1, memory_order_relaxed);
        return;
    }
    atomic_fetch_add_explicit(&me->reads, 1, memory_order_relaxed);
    vg_count(w, p);
}

static uint64_t vg_pick(struct vg_workload *w, vg_worker *me, uint64_t *rng, uint64_t *cursor)
{
    switch (w->spec.pattern) {
    case VG_ZIPF: {
        *rng = vg_xs(*rng);
        double u = (double)((*rng * 0x2545F4914F6CDD1Dull) >> 11) * 0x1.0p-53;
        uint64_t lo = 0, hi = w->ncdf - 1;
        while (lo < hi) {
            uint64_t mid = lo + (hi - lo) / 2;
            if (w->cdf[mid] < u)
                lo = mid + 1;
            else
                hi = mid;
        }
        return w->perm[lo];
    }
    case VG_SHIFTING: {
        double el = vg_now() - w->t0;
        uint64_t k = w->spec.shift_period_s > 0 ? (uint64_t)(el / w->spec.shift_period_s) : 0;
        uint64_t start = (uint64_t)(((unsigned __int128)k * w->hot) % w->npages);
        return (start + vg_below(rng, w->hot)) % w->npages;
    }
    case VG_SEQUENTIAL: {
        /* each thread scans its own pages (p % threads == id) in order */
        uint64_t p = *cursor;
        *cursor = p + (uint64_t)w->spec.threads;
        if (*cursor >= w->npages)
            *cursor = (uint64_t)me->id;
        return p;
    }
    default:
        return vg_below(rng, w->hot);
    }
}

static void vg_pace(struct vg_workload *w, uint64_t ops, double start)
{
    double due = start + (double)ops / w->spec.ops_per_sec;
    for (;;) {
        double left = due - vg_now();
        if (left <= 0 || atomic_load_explicit(&w->stop, memory_order_relaxed))
            return;
        if (left > 0.05)
            left = 0.05; /* stay responsive to stop */
        struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)(left * 1e9)};
        nanosleep(&ts, NULL);
    }
}

static void *vg_worker_main(void *arg)
{
    vg_worker *me = arg;
    struct vg_workload *w = me->w;
    void *alt = vg_altstack_on();
    uint64_t T = (uint64_t)w->spec.threads, id = (uint64_t)me->id;
    uint64_t seedst = w->spec.seed ^ (id + 1) * 0xD6E8FEB86659FD93ull;
    uint64_t rng = vg_splitmix(&seedst);
    if (!rng)
        rng = GOLDEN;
    if (w->spec.touch_all_first)
        for (uint64_t p = id; p < w->npages && !atomic_load(&w->stop); p += T)
            if (!w->zero[p])
                vg_write_page(w, me, p, 0);
    atomic_fetch_add(&w->touched, 1);
    uint64_t cursor = id < w->npages ? id : 0, ops = 0;
    double start = vg_now();
    while (!atomic_load_explicit(&w->stop, memory_order_relaxed) && id < w->npages) {
        if (w->spec.ops_per_sec > 0)
            vg_pace(w, ops, start);
        ops++;
        uint64_t p = vg_pick(w, me, &rng, &cursor);
        rng = vg_xs(rng);
        if (rng * 0x2545F4914F6CDD1Dull < w->write_thresh) {
            /* writes go to the owned page nearest at or below p's thread block */
            uint64_t q = p - p % T + id;
            if (q >= w->npages)
                q = q >= T ? q - T : w->npages;
            if (q < w->npages && !w->zero[q]) {
                vg_write_page(w, me, q, 1);
                continue;
            }
        }
        vg_read_page(w, me, p, &rng);
    }
    vg_altstack_off(alt);
    atomic_fetch_sub(&w->running, 1);
    return NULL;
}

void vg_workload_free(vg_workload *w)
{
    if (!w)
        return;
    free(w->zero);
    free(w->perm);
    free(w->cdf);
    free((void *)w->versions);
    free((void *)w->counts);
    free(w->workers);
    free(w);
}

vg_workload *vg_workload_start(uint64_t addr, uint64_t npages, const vg_spec *spec,
                               const uint8_t *zero_mask, const uint64_t *perm,
                               const double *cdf, uint64_t ncdf)
{
    if (npages == 0 || spec->threads < 1 || spec->threads > 1024 ||
        spec->pattern < VG_UNIFORM || spec->pattern > VG_SEQUENTIAL ||
        (spec->pattern == VG_ZIPF && (!perm || !cdf || ncdf == 0 || ncdf > npages))) {
        errno = EINVAL;
        return NULL;
    }
    vg_ensure_handler();
    struct vg_workload *w = calloc(1, sizeof *w);
    if (!w)
        return NULL;
    w->base = (volatile uint64_t *)(uintptr_t)addr;
    w->npages = npages;
    w->spec = *spec;
    double hot = spec->hot_fraction * (double)npages;
    w->hot = hot < 1 ? 1 : (uint64_t)(hot + 0.5);
    if (w->hot > npages)
        w->hot = npages;
    double wf = spec->write_fraction;
    w->write_thresh = wf <= 0 ? 0 : wf >= 1 ? UINT64_MAX : (uint64_t)(wf * 0x1.0p64);
    w->zero = calloc(npages, 1);
    w->versions = calloc(npages, sizeof *w->versions);
    w->counts = spec->count_accesses ? calloc(npages, sizeof *w->counts) : NULL;
    w->workers = calloc((size_t)spec->threads, sizeof *w->workers);
    if (spec->pattern == VG_ZIPF) {
        w->perm = malloc(ncdf * sizeof *w->perm);
        w->cdf = malloc(ncdf * sizeof *w->cdf);
        if (w->perm && w->cdf) {
            memcpy(w->perm, perm, ncdf * sizeof *w->perm);
            memcpy(w->cdf, cdf, ncdf * sizeof *w->cdf);
            w->ncdf = ncdf;
            for (uint64_t i = 0; i < ncdf; i++)
                if (perm[i] >= npages) {
                    vg_workload_free(w);
                    errno = EINVAL;
                    return NULL;
                }
        }
    }
    if (!w->zero || !w->versions || !w->workers || (spec->count_accesses && !w->counts) ||
        (spec->pattern == VG_ZIPF && !w->ncdf)) {
        vg_workload_free(w);
        errno = ENOMEM;
        return NULL;
    }
    if (zero_mask)
        memcpy(w->zero, zero_mask, npages);
    w->t0 = vg_now();
    for (int i = 0; i < spec->threads; i++) {
        vg_worker *k = &w->workers[i];
        k->w = w;
        k->id = i;
        atomic_fetch_add(&w->running, 1);
        int rc = pthread_create(&k->th, NULL, vg_worker_main, k);
        if (rc != 0) {
            atomic_fetch_sub(&w->running, 1);
            atomic_store(&w->stop, 1);
            for (int j = 0; j < i; j++)
                pthread_join(w->workers[j].th, NULL);
            vg_workload_free(w);
            errno = rc;
            return NULL;
        }
        k->started = 1;
    }
    return w;
}

void vg_workload_stats(vg_workload *w, vg_stats *out)
{
    memset(out, 0, sizeof *out);
    for (int i = 0; i < w->spec.threads; i++) {
        out->reads += atomic_load_explicit(&w->workers[i].reads, memory_order_relaxed);
        out->writes += atomic_load_explicit(&w->workers[i].writes, memory_order_relaxed);
        out->sigbus += atomic_load_explicit(&w->workers[i].sigbus, memory_order_relaxed);
    }
    out->touched_threads = atomic_load(&w->touched);
    out->running_threads = atomic_load(&w->running);
}

void vg_workload_request_stop(vg_workload *w) { atomic_store(&w->stop, 1); }

/* Join what has ended within timeout_s; returns how many threads are still running. */
int vg_workload_join(vg_workload *w, double timeout_s)
{
    double deadline = vg_now() + (timeout_s > 0 ? timeout_s : 0);
    int left = 0;
    for (int i = 0; i < w->spec.threads; i++) {
        vg_worker *k = &w->workers[i];
        if (!k->started || k->joined)
            continue;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts); /* pthread_timedjoin_np takes CLOCK_REALTIME */
        double rem = deadline - vg_now();
        if (rem < 0)
            rem = 0;
        ts.tv_sec += (time_t)rem;
        ts.tv_nsec += (long)((rem - (double)(time_t)rem) * 1e9);
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        if (pthread_timedjoin_np(k->th, NULL, &ts) == 0)
            k->joined = 1;
        else
            left++;
    }
    return left;
}

void vg_workload_versions(vg_workload *w, uint64_t *out)
{
    for (uint64_t p = 0; p < w->npages; p++)
        out[p] = atomic_load_explicit(&w->versions[p], memory_order_acquire);
}

int vg_workload_counts(vg_workload *w, uint32_t *out)
{
    if (!w->counts)
        return -1;
    for (uint64_t p = 0; p < w->npages; p++)
        out[p] = atomic_load_explicit(&w->counts[p], memory_order_relaxed);
    return 0;
}

/* Tests: pretend a write happened (or did not), to check that verify notices. */
int vg_workload_set_version(vg_workload *w, uint64_t page, uint64_t version)
{
    if (page >= w->npages)
        return EINVAL;
    atomic_store_explicit(&w->versions[page], version, memory_order_release);
    return 0;
}

/* ---- verify ---------------------------------------------------------------------------- */
typedef struct vg_vjob {
    struct vg_workload *w;
    int own_thread;
    uint64_t first, end;
    vg_verify_report r;
} vg_vjob;

static int vg_guarded_read_page(const volatile uint64_t *pg, uint64_t *buf)
{
    sigjmp_buf jb;
    if (sigsetjmp(jb, 0)) {
        vg_after_sigbus();
        return -1;
    }
    vg_jmp = &jb;
    for (unsigned i = 0; i < WORDS; i++)
        buf[i] = pg[i];
    vg_jmp = NULL;
    return 0;
}

/* 0 ok, 1 lost write, 2 corrupt */
static int vg_check_page(const uint64_t *b, uint64_t p, uint64_t expect)
{
    uint64_t idx1 = b[0], ver = b[1];
    if (idx1 == 0 && ver == 0) {
        for (unsigned i = 2; i < WORDS; i++)
            if (b[i])
                return 2;
        return expect == 0 ? 0 : 1;
    }
    if (idx1 != p + 1 || ver == 0 || ver > expect)
        return 2;
    uint64_t s = vg_stamp_seed(p, ver), x = s;
    for (unsigned i = 2; i < 256; i++) {
        x = vg_xs(x);
        if (b[i] != x)
            return 2;
    }
    for (unsigned i = 256; i < WORDS; i++)
        if (b[i] != s)
            return 2;
    return ver < expect ? 1 : 0;
}

static void *vg_verify_main(void *arg)
{
    vg_vjob *j = arg;
    void *alt = j->own_thread ? vg_altstack_on() : NULL;
    uint64_t buf[WORDS];
    for (uint64_t p = j->first; p < j->end; p++) {
        uint64_t expect = atomic_load_explicit(&j->w->versions[p], memory_order_acquire);
        int bad;
        if (vg_guarded_read_page(j->w->base + p * WORDS, buf) != 0) {
            j->r.poisoned_pages++;
            bad = 1;
        } else {
            int c = vg_check_page(buf, p, expect);
            if (c == 1)
                j->r.lost_writes++;
            else if (c == 2)
                j->r.corrupt_pages++;
            bad = c != 0;
        }
        if (bad && j->r.nbad < VG_MAX_BAD)
            j->r.bad[j->r.nbad++] = p;
        j->r.pages++;
    }
    vg_altstack_off(alt);
    return NULL;
}

/* Read every page (faults evicted pages back in) and check its stamp against the last
 * recorded version. Call after the workload stopped. */
int vg_workload_verify(vg_workload *w, int nthreads, vg_verify_report *out)
{
    memset(out, 0, sizeof *out);
    vg_ensure_handler();
    if (nthreads < 1)
        nthreads = 1;
    if (nthreads > 8)
        nthreads = 8;
    if ((uint64_t)nthreads > w->npages)
        nthreads = (int)w->npages;
    vg_vjob jobs[8];
    pthread_t th[8];
    int made[8] = {0};
    uint64_t per = w->npages / (uint64_t)nthreads;
    for (int i = 0; i < nthreads; i++) {
        memset(&jobs[i], 0, sizeof jobs[i]);
        jobs[i].w = w;
        jobs[i].first = per * (uint64_t)i;
        jobs[i].end = i == nthreads - 1 ? w->npages : per * (uint64_t)(i + 1);
        jobs[i].own_thread = 1;
        made[i] = pthread_create(&th[i], NULL, vg_verify_main, &jobs[i]) == 0;
        if (!made[i]) {
            jobs[i].own_thread = 0; /* no thread: do it here, leaving our altstack alone */
            vg_verify_main(&jobs[i]);
        }
    }
    for (int i = 0; i < nthreads; i++) {
        if (made[i])
            pthread_join(th[i], NULL);
        vg_verify_report *r = &jobs[i].r;
        out->pages += r->pages;
        out->lost_writes += r->lost_writes;
        out->corrupt_pages += r->corrupt_pages;
        out->poisoned_pages += r->poisoned_pages;
        for (uint64_t k = 0; k < r->nbad && out->nbad < VG_MAX_BAD; k++)
            out->bad[out->nbad++] = r->bad[k];
    }
    return 0;
}
