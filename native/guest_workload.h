/* guest_workload: workload threads over a guest range. */
#pragma once
#include "guest.h"

vg_workload *vg_workload_start(uint64_t addr, uint64_t npages, const vg_spec *spec,
                               const uint8_t *zero_mask, const uint64_t *perm,
                               const double *cdf, uint64_t ncdf);
void vg_workload_stats(vg_workload *w, vg_stats *out);
void vg_workload_request_stop(vg_workload *w);
int vg_workload_join(vg_workload *w, double timeout_s);
void vg_workload_versions(vg_workload *w, uint64_t *out);
int vg_workload_counts(vg_workload *w, uint32_t *out);
int vg_workload_set_version(vg_workload *w, uint64_t page, uint64_t version);
void vg_workload_free(vg_workload *w);
