/* guest_verify: check a stopped workload's pages against their recorded versions. */
#pragma once
#include "guest.h"

int vg_workload_verify(vg_workload *w, int nthreads, vg_verify_report *out);
