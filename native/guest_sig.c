/* guest_sig: SIGBUS capture for the C threads that touch guest memory.
 *
 * SIGBUS (UFFDIO_POISON'd page, memfd page beyond EOF) is caught per thread: a process-wide
 * handler siglongjmp's out when the faulting thread has armed a thread-local jump buffer,
 * otherwise it puts back the previous handler (pytest's faulthandler, SIG_DFL) and lets the
 * fault happen again there. Every guarded op lives here, next to the jump buffer it arms. */
#define _GNU_SOURCE
#include "guest_internal.h"

#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

static __thread sigjmp_buf *volatile vg_jmp;
static struct sigaction vg_prev;
static pthread_mutex_t vg_sig_mu = PTHREAD_MUTEX_INITIALIZER;
static volatile sig_atomic_t vg_chained;

static void vg_sigbus(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    sigjmp_buf *j = vg_jmp;
    if (j) {
        vg_jmp = NULL;
        siglongjmp(*j, 1);
    }
    /* Not ours: hand the signal to whoever had it before. A hardware fault re-executes
     * the faulting instruction after we return and is delivered to the restored handler;
     * a signal sent by kill() would be lost that way, so re-raise it. If we come back
     * here unarmed, the previous handler chained back to us (faulthandler enabled after
     * our first install saved us as ITS previous handler): end the cycle with SIG_DFL. */
    if (vg_chained) {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(sig, &dfl, NULL);
    } else {
        vg_chained = 1;
        sigaction(sig, &vg_prev, NULL);
    }
    if (si == NULL || si->si_code <= 0)
        raise(sig);
}

/* (Re)install the handler if someone (faulthandler.enable) replaced it since. */
void vg_ensure_handler(void)
{
    struct sigaction cur;
    pthread_mutex_lock(&vg_sig_mu);
    if (sigaction(SIGBUS, NULL, &cur) == 0 &&
        !((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == vg_sigbus)) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = vg_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        vg_prev = cur;
        vg_chained = 0;
        sigaction(SIGBUS, &sa, NULL);
    }
    pthread_mutex_unlock(&vg_sig_mu);
}

/* After siglongjmp (savemask=0, to keep sigsetjmp free of syscalls) SIGBUS is still
 * blocked as it was inside the handler; a blocked synchronous SIGBUS kills the process. */
static void vg_after_sigbus(void)
{
    sigset_t s;
    vg_jmp = NULL;
    sigemptyset(&s);
    sigaddset(&s, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &s, NULL);
}

void *vg_altstack_on(void)
{
    size_t sz = 65536;
    long min = sysconf(_SC_SIGSTKSZ);
    if (min > 0 && (size_t)min * 4 > sz)
        sz = (size_t)min * 4;
    stack_t st = {.ss_sp = malloc(sz), .ss_size = sz, .ss_flags = 0};
    if (st.ss_sp && sigaltstack(&st, NULL) != 0) {
        free(st.ss_sp);
        return NULL;
    }
    return st.ss_sp;
}

void vg_altstack_off(void *mem)
{
    if (!mem)
        return;
    stack_t st = {.ss_sp = NULL, .ss_size = 0, .ss_flags = SS_DISABLE};
    sigaltstack(&st, NULL);
    free(mem);
}

int vg_guarded_stamp(volatile uint64_t *pg, uint64_t index, uint64_t version)
{
    sigjmp_buf jb;
    if (sigsetjmp(jb, 0)) {
        vg_after_sigbus();
        return -1;
    }
    vg_jmp = &jb;
    vg_stamp_words(pg, index, version);
    vg_jmp = NULL;
    return 0;
}

int vg_guarded_copy_out(const volatile uint8_t *src, uint8_t *dst, size_t n)
{
    sigjmp_buf jb;
    if (sigsetjmp(jb, 0)) {
        vg_after_sigbus();
        return -1;
    }
    vg_jmp = &jb;
    size_t i = 0;
    if (((uintptr_t)src & 7) == 0)
        for (; i + 8 <= n; i += 8) {
            uint64_t v = *(const volatile uint64_t *)(src + i);
            memcpy(dst + i, &v, 8);
        }
    for (; i < n; i++)
        dst[i] = src[i];
    vg_jmp = NULL;
    return 0;
}

int vg_guarded_copy_in(volatile uint8_t *dst, const uint8_t *src, size_t n)
{
    sigjmp_buf jb;
    if (sigsetjmp(jb, 0)) {
        vg_after_sigbus();
        return -1;
    }
    vg_jmp = &jb;
    for (size_t i = 0; i < n; i++)
        dst[i] = src[i];
    vg_jmp = NULL;
    return 0;
}

static uint64_t vg_sink;

int vg_guarded_touch_read(const volatile uint64_t *pg, unsigned word)
{
    sigjmp_buf jb;
    if (sigsetjmp(jb, 0)) {
        vg_after_sigbus();
        return -1;
    }
    vg_jmp = &jb;
    uint64_t v = pg[0] ^ pg[1] ^ pg[word];
    vg_jmp = NULL;
    __atomic_store_n(&vg_sink, v, __ATOMIC_RELAXED);
    return 0;
}

int vg_guarded_read_page(const volatile uint64_t *pg, uint64_t *buf)
{
    sigjmp_buf jb;
    if (sigsetjmp(jb, 0)) {
        vg_after_sigbus();
        return -1;
    }
    vg_jmp = &jb;
    for (unsigned i = 0; i < WORDS; i++)
        buf[i] = pg[i];
    vg_jmp = NULL;
    return 0;
}
