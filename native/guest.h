/* guest: C threads that touch guest memory (accessors, workloads, verifier).
 * Everything here may block on a userfaultfd fault; cffi calls it with the GIL released. */
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

vg_access *vg_access_start(int kind, uint64_t addr, size_t length, const uint8_t *data);
int vg_access_wait(vg_access *a, double timeout_s);
int vg_access_status(vg_access *a);
int vg_access_tid(vg_access *a);
int vg_access_err(vg_access *a);
size_t vg_access_result(vg_access *a, uint8_t *out, size_t cap);
void vg_access_release(vg_access *a);

vg_workload *vg_workload_start(uint64_t addr, uint64_t npages, const vg_spec *spec,
                               const uint8_t *zero_mask, const uint64_t *perm,
                               const double *cdf, uint64_t ncdf);
void vg_workload_stats(vg_workload *w, vg_stats *out);
void vg_workload_request_stop(vg_workload *w);
int vg_workload_join(vg_workload *w, double timeout_s);
int vg_workload_verify(vg_workload *w, int nthreads, vg_verify_report *out);
void vg_workload_versions(vg_workload *w, uint64_t *out);
int vg_workload_counts(vg_workload *w, uint32_t *out);
int vg_workload_set_version(vg_workload *w, uint64_t page, uint64_t version);
void vg_workload_free(vg_workload *w);

void *vg_mmap(size_t length, int fd, uint64_t offset);
int vg_munmap(void *addr, size_t length);
