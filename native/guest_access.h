/* guest_access: one-shot accessor threads; vg_access_* may be released while blocked. */
#pragma once
#include "guest.h"

vg_access *vg_access_start(int kind, uint64_t addr, size_t length, const uint8_t *data);
int vg_access_wait(vg_access *a, double timeout_s);
int vg_access_status(vg_access *a);
int vg_access_tid(vg_access *a);
int vg_access_err(vg_access *a);
size_t vg_access_result(vg_access *a, uint8_t *out, size_t cap);
void vg_access_release(vg_access *a);
