#pragma once
/* Another process's memory, for vmm_tierd.kernel.linux_process: pidfds, cross-process
 * reads and writes, and ptrace syscall injection. Every call returns 0 (or a result) or
 * -errno. Syscall numbers are x86_64 (syscall_64.tbl) and defined here: the installed
 * headers may predate them. */
#include <stddef.h>
#include <stdint.h>

#define VT_NR_PIDFD_OPEN 434
#define VT_NR_PIDFD_GETFD 438

#define VT_INJECT_MAX_SIGNALS 64

/* One syscall to inject: number and six arguments (unused ones 0). */
struct vt_syscall {
    int64_t nr;
    uint64_t args[6];
};

/* What vt_inject did; filled in on success and on failure. */
struct vt_inject_report {
    int64_t pause_ns;     /* PTRACE_SEIZE to PTRACE_DETACH, CLOCK_MONOTONIC */
    int32_t calls_done;   /* results[0..calls_done) are valid */
    int32_t nsignals;     /* signals that arrived meanwhile, in arrival order */
    int32_t signals[VT_INJECT_MAX_SIGNALS];
    int32_t lost_signals; /* arrived beyond the array: neither listed nor re-sent */
    int32_t err;          /* errno of the failed step, 0 on success */
    int32_t restored;     /* registers were saved, restored, and the thread detached */
    char op[32];          /* the failed step, e.g. "ptrace(SINGLESTEP)" */
};

int vt_pidfd_open(int pid, unsigned int flags);
int vt_pidfd_getfd(int pidfd, int fd, unsigned int flags);
int vt_process_vm_rw(int pid, int write, void *buf, uint64_t addr, uint64_t len,
                     int64_t *done);
int vt_inject(int pid, int tid, uint64_t insn, const struct vt_syscall *calls, int ncalls,
              int64_t *results, struct vt_inject_report *rep);
