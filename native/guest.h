/* guest: types and constants of the guest_* units (C threads that touch guest memory:
 * accessors, workloads, verifier), plus write stamps and test memory. Everything in them
 * may block on a userfaultfd fault; cffi calls it with the GIL released. */
#pragma once
#include <stddef.h>
#include <stdint.h>

#define VG_PENDING 0
#define VG_OK 1
#define VG_SIGBUS 2
#define VG_ERROR 3

#define VG_READ 0
#define VG_WRITE 1
#define VG_GUP_READ 2

#define VG_UNIFORM 0
#define VG_ZIPF 1
#define VG_SHIFTING 2
#define VG_SEQUENTIAL 3
#define VG_HAMMER 4

#define VG_MAX_BAD 16

typedef struct vg_access vg_access;
typedef struct vg_workload vg_workload;

typedef struct vg_spec {
    int pattern;
    int threads;
    double hot_fraction;
    double write_fraction;
    double shift_period_s;
    double ops_per_sec;
    int touch_all_first;
    int count_accesses;
    uint64_t seed;
} vg_spec;

typedef struct vg_stats {
    uint64_t reads;
    uint64_t writes;
    uint64_t sigbus;
    int touched_threads; /* threads done with the touch-all-first phase */
    int running_threads;
} vg_stats;

typedef struct vg_verify_report {
    uint64_t pages;
    uint64_t lost_writes;
    uint64_t corrupt_pages;
    uint64_t poisoned_pages;
    uint64_t nbad;
    uint64_t bad[VG_MAX_BAD];
} vg_verify_report;

uint64_t vg_stamp_seed(uint64_t index, uint64_t version);
void vg_stamp_page(void *dst, uint64_t index, uint64_t version);

void *vg_mmap(size_t length, int fd, uint64_t offset);
int vg_munmap(void *addr, size_t length);
