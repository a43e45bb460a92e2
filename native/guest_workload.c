/* guest_workload: workload threads (patterns, pacing, write stamps) on guest memory. */
#define _GNU_SOURCE
#include "guest_workload.h"
#include "guest_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

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

/* HAMMER: write the pages the host has just taken away, found the way a guest feels it
 * (mincore: not mapped), so that writes land on pages in mid-eviction and just evicted.
 * Each round: up to HAMMER_WRITES absent pages this thread owns are written (absent pages
 * of other threads are read now and then), then HAMMER_HOT accesses to the hot set keep a
 * working set (so the rest goes cold), and one round in 8 reads a burst of HAMMER_BURST
 * consecutive pages. */
#define HAMMER_WRITES 64
#define HAMMER_HOT 256
#define HAMMER_BURST 256

static void vg_hammer(struct vg_workload *w, vg_worker *me, uint64_t *rng)
{
    uint64_t T = (uint64_t)w->spec.threads, id = (uint64_t)me->id, n = w->npages;
    unsigned char *vec = malloc(n);
    uint64_t ops = 0;
    double start = vg_now();
    while (!atomic_load_explicit(&w->stop, memory_order_relaxed)) {
        if (vec && mincore((void *)w->base, n * PAGE, vec) == 0) {
            uint64_t p = vg_below(rng, n), done = 0;
            for (uint64_t i = 0; i < n && done < HAMMER_WRITES; i++, p = p + 1 == n ? 0 : p + 1) {
                if (vec[p] & 1)
                    continue;
                if (atomic_load_explicit(&w->stop, memory_order_relaxed))
                    break;
                if (p % T == id && !w->zero[p]) {
                    vg_write_page(w, me, p, 1);
                    done++;
                } else if (vg_below(rng, 4) == 0) {
                    vg_read_page(w, me, p, rng);
                }
            }
        }
        for (int k = 0; k < HAMMER_HOT; k++) {
            if (atomic_load_explicit(&w->stop, memory_order_relaxed))
                break;
            if (w->spec.ops_per_sec > 0)
                vg_pace(w, ops, start);
            ops++;
            uint64_t p = vg_below(rng, w->hot);
            *rng = vg_xs(*rng);
            uint64_t q = p - p % T + id;
            if (*rng * 0x2545F4914F6CDD1Dull < w->write_thresh && q < n && !w->zero[q])
                vg_write_page(w, me, q, 1);
            else
                vg_read_page(w, me, p, rng);
        }
        if (vg_below(rng, 8) == 0) {
            uint64_t s = vg_below(rng, n);
            for (uint64_t j = 0; j < HAMMER_BURST && j < n; j++)
                vg_read_page(w, me, (s + j) % n, rng);
        }
    }
    free(vec);
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
    if (w->spec.pattern == VG_HAMMER)
        vg_hammer(w, me, &rng);
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
        spec->pattern < VG_UNIFORM || spec->pattern > VG_HAMMER ||
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
