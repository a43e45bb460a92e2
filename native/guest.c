/* guest: the guest-side C threads' shared public part: write stamps and test memory.
 *
 * The guest*.c units touch (possibly uffd-registered) guest memory from C threads. Nothing
 * there is ever called with the GIL held (cffi releases it), so a thread may block on a
 * userfaultfd fault that the trio loop of this same process serves. guest_sig.c catches
 * SIGBUS, guest_access.c runs one-shot accesses, guest_workload.c the workload threads,
 * guest_verify.c the verifier. */
#define _GNU_SOURCE
#include "guest_internal.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>

/* ---- stamps (vmm_tierd/kernel/stamps.py, exactly; see guest_internal.h) -------------- */
uint64_t vg_stamp_seed(uint64_t index, uint64_t version) { return vg_seed(index, version); }

void vg_stamp_page(void *dst, uint64_t index, uint64_t version)
{
    if (version == 0)
        memset(dst, 0, PAGE);
    else
        vg_stamp_words((volatile uint64_t *)dst, index, version);
}

/* ---- memory for tests ---------------------------------------------------------------- */
void *vg_mmap(size_t length, int fd, uint64_t offset)
{
    void *p = fd < 0 ? mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                            -1, 0)
                     : mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)offset);
    return p == MAP_FAILED ? NULL : p;
}

int vg_munmap(void *addr, size_t length) { return munmap(addr, length) == 0 ? 0 : errno; }
