#define _GNU_SOURCE
#include "process.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Kernel-internal restart codes (include/linux/errno.h); userspace never sees them,
 * except a tracer reading rax at a stop inside the syscall's exit path. */
#define VT_ERESTARTSYS 512
#define VT_ERESTARTNOINTR 513
#define VT_ERESTARTNOHAND 514
#define VT_ERESTART_RESTARTBLOCK 516
#define VT_MAX_RESTARTS 16
#define VT_MAX_STOPS 100000

int vt_pidfd_open(int pid, unsigned int flags)
{
    long r = syscall(VT_NR_PIDFD_OPEN, pid, flags);
    return r < 0 ? -errno : (int)r;
}

/* The new fd always has FD_CLOEXEC (the kernel sets it; flags must be 0). */
int vt_pidfd_getfd(int pidfd, int fd, unsigned int flags)
{
    long r = syscall(VT_NR_PIDFD_GETFD, pidfd, fd, flags);
    return r < 0 ? -errno : (int)r;
}

/* process_vm_readv/writev until len bytes or an error. A call stops short at the first
 * page it cannot access (the next one then fails with EFAULT), so *done is what really
 * was transferred. */
int vt_process_vm_rw(int pid, int write, void *buf, uint64_t addr, uint64_t len,
                     int64_t *done)
{
    uint64_t n = 0;
    while (n < len) {
        struct iovec local = { (char *)buf + n, len - n };
        struct iovec remote = { (void *)(uintptr_t)(addr + n), len - n };
        ssize_t r = write ? process_vm_writev(pid, &local, 1, &remote, 1, 0)
                          : process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            *done = (int64_t)n;
            return -errno;
        }
        if (r == 0) {
            *done = (int64_t)n;
            return -EFAULT;
        }
        n += (uint64_t)r;
    }
    *done = (int64_t)n;
    return 0;
}

/* ---- syscall injection -------------------------------------------------------------
 *
 * Everything runs in this one call on this one thread: ptrace requests are only
 * accepted from the thread that attached (the tracer is a thread, not a process).
 *
 * Registers: PTRACE_GETREGS/SETREGS (struct user_regs_struct) are all a syscall
 * instruction can change. `syscall` itself writes rcx and r11 (saved there); the kernel
 * preserves the FPU/SSE/AVX state across every syscall (it saves and restores it if it
 * uses it), and no signal handler runs while we hold the thread (every signal is held
 * back), so the extended state is never touched and GETREGS suffices.
 *
 * Why a thread blocked in ppoll/futex/nanosleep/recvfrom restarts correctly: the
 * interrupt stops it inside get_signal() on its way out of the interrupted syscall,
 * with rax = -ERESTART* and orig_rax = its syscall number, *before* the restart fixup
 * (arch_do_signal_or_restart rewinds rip by 2 and reloads rax when orig_rax >= 0 and
 * rax is a restart code). We save exactly that state, run our calls with orig_rax = -1
 * so that the fixup never applies to our registers (rax = our syscall number is never a
 * restart code anyway, so this is belt and braces: a test cannot tell the difference),
 * and restore the saved state before
 * detaching: the fixup then runs on the original registers as if we had never been
 * there. One thing the registers do not carry is current->restart_block (nanosleep and
 * timed futex waits that return -ERESTART_RESTARTBLOCK resume through it): injected
 * calls must not be ones that set it (none of mmap, munmap, close, userfaultfd,
 * pidfd_open, process_madvise, ioctl, socket, connect, recvmsg do).
 *
 * ppoll/pselect leave their temporary signal mask in place until the fixup; our first
 * resume (with orig_rax = -1) restores the thread's normal mask instead, so a signal the
 * temporary mask allowed may stay pending until the restarted ppoll installs it again.
 * It is delivered then, once, exactly as without us.
 */

struct inject_ctx {
    int pid, tid;
    struct vt_inject_report *rep;
    siginfo_t first;  /* siginfo of the first held-back signal */
    int stopped;      /* in a ptrace-stop: registers may be read/set, detach works */
    int sigstop;      /* ...and it is a signal-delivery-stop: detach can deliver a signal */
    int gone;         /* the thread exited (reaped by our waitpid) */
};

static int fail(struct inject_ctx *c, const char *op, int err)
{
    if (!c->rep->err) {
        c->rep->err = err;
        snprintf(c->rep->op, sizeof c->rep->op, "%s", op);
    }
    return -err;
}

static int fail_ptrace(struct inject_ctx *c, const char *op)
{
    int err = errno;
    if (err == ESRCH) /* not stopped any more: killed out of its stop */
        c->stopped = 0;
    return fail(c, op, err);
}

static void hold_signal(struct inject_ctx *c, const siginfo_t *si)
{
    struct vt_inject_report *rep = c->rep;
    if (rep->nsignals >= VT_INJECT_MAX_SIGNALS) {
        rep->lost_signals++;
        return;
    }
    if (rep->nsignals == 0)
        c->first = *si;
    rep->signals[rep->nsignals++] = si->si_signo;
}

/* Next stop of the tracee. A thread that exits while traced is reported to us (not to
 * its parent) and must be reaped here, or its process could never be waited for. */
static int wait_stop(struct inject_ctx *c, int *status)
{
    for (;;) {
        pid_t r = waitpid(c->tid, status, __WALL);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            c->stopped = 0;
            c->gone = 1; /* ECHILD: not our tracee any more */
            return -ESRCH;
        }
        if (WIFSTOPPED(*status)) {
            c->stopped = 1;
            c->sigstop = (*status >> 16) == 0;
            return 0;
        }
        c->stopped = 0;
        c->gone = 1;
        return -ESRCH;
    }
}

/* A signal-delivery-stop for a signal that is not our single-step trap: hold it back
 * (the thread resumes without it) and remember it for re-delivery at detach. */
static int hold_current(struct inject_ctx *c, int *is_step_trap)
{
    siginfo_t si;
    if (ptrace(PTRACE_GETSIGINFO, c->tid, 0, &si) < 0)
        return fail_ptrace(c, "ptrace(GETSIGINFO)");
    /* The trap after a single-stepped syscall is a kernel-generated SIGTRAP (si_code
     * > 0: TRAP_BRKPT, from the syscall-exit single-step report on x86); a SIGTRAP
     * someone sent has si_code <= 0 (SI_USER, SI_TKILL...). */
    *is_step_trap = si.si_signo == SIGTRAP && si.si_code > 0;
    if (!*is_step_trap)
        hold_signal(c, &si);
    return 0;
}

/* Stop the thread for PTRACE_INTERRUPT: its PTRACE_EVENT_STOP. A signal-delivery-stop
 * may come first (a signal dequeued between SEIZE and INTERRUPT); it is held back and
 * the thread resumed, and the still-pending interrupt stops it at once. */
static int wait_interrupt_stop(struct inject_ctx *c)
{
    int status, r, trap;
    for (int n = 0; n < VT_MAX_STOPS; n++) {
        if ((r = wait_stop(c, &status)) < 0)
            return fail(c, "waitpid", -r);
        if (!c->sigstop)
            return 0;
        if ((r = hold_current(c, &trap)) < 0)
            return r;
        if (ptrace(PTRACE_CONT, c->tid, 0, 0) < 0)
            return fail_ptrace(c, "ptrace(CONT)");
        c->stopped = 0;
    }
    return fail(c, "waitpid", EIO);
}

/* Single-step the thread until the trap that follows the syscall instruction. */
static int step_syscall(struct inject_ctx *c)
{
    int status, r, trap;
    for (int n = 0; n < VT_MAX_STOPS; n++) {
        if (ptrace(PTRACE_SINGLESTEP, c->tid, 0, 0) < 0)
            return fail_ptrace(c, "ptrace(SINGLESTEP)");
        c->stopped = 0;
        if ((r = wait_stop(c, &status)) < 0)
            return fail(c, "waitpid", -r);
        if (!c->sigstop)
            continue; /* a group-stop (SIGSTOP to the process): step on */
        if ((r = hold_current(c, &trap)) < 0)
            return r;
        if (trap)
            return 0;
    }
    return fail(c, "ptrace(SINGLESTEP)", EIO);
}

static int is_restart(int64_t ret)
{
    return ret == -VT_ERESTARTSYS || ret == -VT_ERESTARTNOINTR
        || ret == -VT_ERESTARTNOHAND || ret == -VT_ERESTART_RESTARTBLOCK;
}

static int run_call(struct inject_ctx *c, const struct user_regs_struct *saved,
                    uint64_t insn, const struct vt_syscall *sc, int64_t *result)
{
    struct user_regs_struct regs;
    int r;
    for (int attempt = 0;; attempt++) {
        regs = *saved;
        regs.rip = insn;
        regs.rax = (unsigned long long)sc->nr;
        regs.orig_rax = (unsigned long long)-1;
        regs.rdi = sc->args[0];
        regs.rsi = sc->args[1];
        regs.rdx = sc->args[2];
        regs.r10 = sc->args[3];
        regs.r8 = sc->args[4];
        regs.r9 = sc->args[5];
        if (ptrace(PTRACE_SETREGS, c->tid, 0, &regs) < 0)
            return fail_ptrace(c, "ptrace(SETREGS)");
        if ((r = step_syscall(c)) < 0)
            return r;
        if (ptrace(PTRACE_GETREGS, c->tid, 0, &regs) < 0)
            return fail_ptrace(c, "ptrace(GETREGS)");
        if (regs.rip != insn + 2) /* the trap is not after our instruction */
            return fail(c, "ptrace(SINGLESTEP)", EIO);
        /* A signal interrupted our own call: its trap comes first (synchronous signals
         * are dequeued before others), with the restart code still in rax; run it
         * again, as the kernel's fixup would have (but from the start: a call that
         * resumes through restart_block, e.g. nanosleep, runs its full time again). */
        if (is_restart((int64_t)regs.rax) && attempt < VT_MAX_RESTARTS)
            continue;
        *result = (int64_t)regs.rax;
        return 0;
    }
}

/* Restore, detach and re-deliver. A thread that cannot be restored is dying (ESRCH):
 * it is reaped instead, so that its process can be waited for. */
static void finish(struct inject_ctx *c, const struct user_regs_struct *saved)
{
    struct vt_inject_report *rep = c->rep;
    int status, sent = 0, sig = 0;
    if (!c->stopped && !c->gone) {
        /* A ptrace call found the thread running (killed out of its stop): wait for
         * its exit, or for the stop the pending interrupt still causes. */
        ptrace(PTRACE_INTERRUPT, c->tid, 0, 0);
        while (!c->stopped && !c->gone)
            wait_stop(c, &status);
        if (c->stopped && c->sigstop) {
            int trap;
            hold_current(c, &trap);
        }
    }
    if (c->gone)
        return;
    int restored = 0;
    if (saved) {
        if (ptrace(PTRACE_SETREGS, c->tid, 0, saved) == 0) {
            restored = 1;
        } else {
            int err = errno;
            fail(c, "ptrace(SETREGS)", err);
            if (err == ESRCH) { /* killed: reap it */
                while (!c->gone && wait_stop(c, &status) == 0)
                    ptrace(PTRACE_CONT, c->tid, 0, 0);
                return;
            }
        }
    }
    if (c->sigstop && rep->nsignals) {
        /* Detaching from a signal-delivery-stop delivers the signal given; with its
         * own siginfo put back first, the handler sees the real sender, not us. */
        if (ptrace(PTRACE_SETSIGINFO, c->tid, 0, &c->first) == 0) {
            sig = c->first.si_signo;
            sent = 1;
        }
    }
    if (ptrace(PTRACE_DETACH, c->tid, 0, sig) < 0) {
        fail_ptrace(c, "ptrace(DETACH)");
        return;
    }
    rep->restored = restored;
    for (int i = sent; i < rep->nsignals; i++)
        if (syscall(SYS_tgkill, c->pid, c->tid, rep->signals[i]) < 0)
            fail(c, "tgkill", errno);
}

static int64_t elapsed_ns(const struct timespec *a, const struct timespec *b)
{
    return (int64_t)(b->tv_sec - a->tv_sec) * 1000000000 + (b->tv_nsec - a->tv_nsec);
}

int vt_inject(int pid, int tid, uint64_t insn, const struct vt_syscall *calls, int ncalls,
              int64_t *results, struct vt_inject_report *rep)
{
    struct inject_ctx c = { .pid = pid, .tid = tid, .rep = rep };
    struct user_regs_struct saved;
    struct timespec t0, t1;
    int r = 0, have_saved = 0;

    memset(rep, 0, sizeof *rep);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    /* No PTRACE_O_EXITKILL: if this process dies the thread is detached, not killed. */
    if (ptrace(PTRACE_SEIZE, tid, 0, 0) < 0)
        return fail(&c, "ptrace(SEIZE)", errno);
    if (ptrace(PTRACE_INTERRUPT, tid, 0, 0) < 0) {
        r = fail_ptrace(&c, "ptrace(INTERRUPT)");
        goto out;
    }
    if ((r = wait_interrupt_stop(&c)) < 0)
        goto out;
    if (ptrace(PTRACE_GETREGS, tid, 0, &saved) < 0) {
        r = fail_ptrace(&c, "ptrace(GETREGS)");
        goto out;
    }
    have_saved = 1;
    for (int i = 0; i < ncalls; i++) {
        if ((r = run_call(&c, &saved, insn, &calls[i], &results[i])) < 0)
            goto out;
        rep->calls_done = i + 1;
    }
out:
    finish(&c, have_saved ? &saved : NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    rep->pause_ns = elapsed_ns(&t0, &t1);
    return rep->err ? -rep->err : 0;
}
