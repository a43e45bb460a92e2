/* guest_internal: what the guest*.c units share. Not part of the cffi module's API. */
#pragma once
#include "guest.h"

#include <pthread.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / 8u)
#define GOLDEN 0x9E3779B97F4A7C15ull

/* Direct calls inside the extension module, no PLT: vg_guarded_* run once per page. */
#define VG_INTERNAL __attribute__((visibility("hidden")))

/* ---- guest_sig.c: SIGBUS capture. Guarded ops return 0 = done, -1 = SIGBUS. ---------- */
VG_INTERNAL void vg_ensure_handler(void);
VG_INTERNAL void *vg_altstack_on(void);
VG_INTERNAL void vg_altstack_off(void *mem);
VG_INTERNAL int vg_guarded_stamp(volatile uint64_t *pg, uint64_t index, uint64_t version);
VG_INTERNAL int vg_guarded_copy_out(const volatile uint8_t *src, uint8_t *dst, size_t n);
VG_INTERNAL int vg_guarded_copy_in(volatile uint8_t *dst, const uint8_t *src, size_t n);
VG_INTERNAL int vg_guarded_touch_read(const volatile uint64_t *pg, unsigned word);
VG_INTERNAL int vg_guarded_read_page(const volatile uint64_t *pg, uint64_t *buf);

static inline int vg_gettid(void) { return (int)syscall(SYS_gettid); }

static inline double vg_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- stamps (vmm_tierd/kernel/stamps.py, exactly) ------------------------------------ */
static inline uint64_t vg_seed(uint64_t index, uint64_t version)
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

static inline void vg_stamp_words(volatile uint64_t *pg, uint64_t index, uint64_t version)
{
    uint64_t s = vg_seed(index, version), x = s;
    pg[0] = index + 1;
    pg[1] = version;
    for (unsigned i = 2; i < 256; i++) {
        x = vg_xs(x);
        pg[i] = x;
    }
    for (unsigned i = 256; i < WORDS; i++)
        pg[i] = s;
}

/* ---- guest_workload.c: the workload, also read by the verifier ------------------------ */
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
