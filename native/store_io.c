/* store_io: the page store's file layer.
 *
 * SIGBUS guard. LMDB reads data.mdb through a read-only MAP_SHARED map of the whole map
 * size. A page of that map whose file offset is past EOF (data.mdb truncated under us) or
 * whose read fails (EIO from the disk) raises SIGBUS in whichever thread touched it: an
 * LMDB B-tree walk, py-lmdb's preload of a value, a copy. There is no frame to jump back
 * to (py-lmdb and the interpreter are in between), so the handler instead puts a private
 * zero page over the faulting page and returns: the instruction is restarted and reads
 * zeros. LMDB then fails cleanly (a zero page is neither branch nor leaf:
 * MDB_CORRUPTED), and a payload read as zeros fails its CRC. The overlay must not stay:
 * the page may hold data again later (the file re-extended, an EIO that was transient),
 * so vs_guard_repair() maps the file back over the whole range (cheap: it only drops
 * PTEs) once the failed operation has returned. If the file system refuses that mmap,
 * the zero pages stay (LMDB keeps seeing corruption there, never wrong data).
 *
 * Chaining. The handler is process-wide; faults outside every registered range go to the
 * handler that was installed before ours, called directly (guest_sig.c's handler
 * siglongjmp's out of it when its thread is armed). When the previous handler is SIG_DFL
 * (or SIG_IGN), SIG_DFL is restored and the fault repeats, killing the process as if we
 * had never been there. vs_guard_ensure() re-installs us on top when someone
 * (faulthandler.enable, guest_sig's vg_ensure_handler) replaced us; the store calls it
 * before it touches the map, so a handler installed after ours is always reached through
 * us (never the reverse, which would lose it when it steps aside for a fault it doesn't
 * own). */
#define _GNU_SOURCE
#include "store_io.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define VS_RANGES 16
#define VS_NR_CACHESTAT 451 /* same number on every architecture but alpha; 6.5+ */

struct vs_range {
    _Atomic uintptr_t base; /* 0: free slot */
    size_t len;
    int fd;
    int repairable;
    atomic_int overlaid;
    atomic_uint_fast64_t events;
};

static struct vs_range vs_tab[VS_RANGES];
static atomic_uint_fast64_t vs_events;
static __attribute__((tls_model("initial-exec"))) __thread volatile uint64_t vs_thread_events;
static struct sigaction vs_prev[2];
static atomic_int vs_prev_ix;
static pthread_mutex_t vs_mu = PTHREAD_MUTEX_INITIALIZER;
static uintptr_t vs_pagesz;

static void vs_chain(int sig, siginfo_t *si, void *uc)
{
    struct sigaction p = vs_prev[atomic_load(&vs_prev_ix)];
    if (p.sa_flags & SA_SIGINFO) {
        if (p.sa_sigaction) {
            p.sa_sigaction(sig, si, uc);
            return;
        }
    } else if (p.sa_handler != SIG_DFL && p.sa_handler != SIG_IGN) {
        p.sa_handler(sig);
        return;
    }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(sig, &dfl, NULL);
    if (si == NULL || si->si_code <= 0) /* sent by kill(): it won't repeat by itself */
        raise(sig);
}

static void vs_sigbus(int sig, siginfo_t *si, void *uc)
{
    int saved = errno;
    if (si && si->si_code > 0 && vs_pagesz) {
        uintptr_t a = (uintptr_t)si->si_addr;
        for (int i = 0; i < VS_RANGES; i++) {
            struct vs_range *r = &vs_tab[i];
            uintptr_t b = atomic_load(&r->base);
            if (!b || a < b || a - b >= r->len)
                continue;
            uintptr_t pg = a & ~(vs_pagesz - 1);
            size_t n = r->repairable ? vs_pagesz : b + r->len - pg;
            if (mmap((void *)pg, n, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
                     0) == MAP_FAILED)
                break;
            atomic_store(&r->overlaid, 1);
            atomic_fetch_add(&r->events, 1);
            atomic_fetch_add(&vs_events, 1);
            vs_thread_events++;
            errno = saved;
            return;
        }
    }
    errno = saved;
    vs_chain(sig, si, uc);
}

int vs_guard_ensure(void)
{
    struct sigaction cur;
    int rc = 0;
    pthread_mutex_lock(&vs_mu);
    if (!vs_pagesz)
        vs_pagesz = (uintptr_t)sysconf(_SC_PAGESIZE);
    if (sigaction(SIGBUS, NULL, &cur) != 0) {
        rc = -errno;
    } else if (!((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == vs_sigbus)) {
        int ix = !atomic_load(&vs_prev_ix);
        vs_prev[ix] = cur; /* the slot not in use by a running handler */
        atomic_store(&vs_prev_ix, ix);
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = vs_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, NULL) != 0)
            rc = -errno;
    }
    pthread_mutex_unlock(&vs_mu);
    return rc;
}

int vs_guard_add(uint64_t base, uint64_t len, int fd, int repairable)
{
    int rc = vs_guard_ensure();
    if (rc)
        return rc;
    pthread_mutex_lock(&vs_mu);
    rc = -ENOSPC;
    for (int i = 0; i < VS_RANGES; i++) {
        struct vs_range *r = &vs_tab[i];
        if (atomic_load(&r->base))
            continue;
        r->len = len;
        r->fd = fd;
        r->repairable = repairable;
        atomic_store(&r->overlaid, 0);
        atomic_store(&r->events, 0);
        atomic_store(&r->base, (uintptr_t)base); /* published last */
        rc = 0;
        break;
    }
    pthread_mutex_unlock(&vs_mu);
    return rc;
}

int vs_guard_remove(uint64_t base)
{
    int rc = -ENOENT;
    pthread_mutex_lock(&vs_mu);
    for (int i = 0; i < VS_RANGES; i++)
        if (atomic_load(&vs_tab[i].base) == (uintptr_t)base) {
            atomic_store(&vs_tab[i].base, 0);
            rc = 0;
        }
    pthread_mutex_unlock(&vs_mu);
    return rc;
}

uint64_t vs_guard_events(void)
{
    return atomic_load(&vs_events);
}

uint64_t vs_guard_range_events(uint64_t base)
{
    for (int i = 0; i < VS_RANGES; i++)
        if (atomic_load(&vs_tab[i].base) == (uintptr_t)base)
            return atomic_load(&vs_tab[i].events);
    return 0;
}

uint64_t vs_guard_thread_events(void)
{
    return vs_thread_events;
}

/* Map the file back over a repairable range that has overlays: 1 if it did, 0 if there
 * was nothing to repair. The same protection and flags as LMDB's own map (PROT_READ,
 * MAP_SHARED, MADV_RANDOM for MDB_NORDAHEAD). The new map is made elsewhere first and
 * then moved over the old one with mremap: mmap(MAP_FIXED) straight over it would unmap
 * the old range before the file system had a chance to refuse (an ext4 that was shut
 * down fails mmap with EIO), leaving a hole where LMDB expects its map. */
int vs_guard_repair(uint64_t base)
{
    int rc = -ENOENT;
    pthread_mutex_lock(&vs_mu);
    for (int i = 0; i < VS_RANGES; i++) {
        struct vs_range *r = &vs_tab[i];
        if (atomic_load(&r->base) != (uintptr_t)base)
            continue;
        rc = 0;
        if (!r->repairable || !atomic_exchange(&r->overlaid, 0))
            break;
        void *fresh = mmap(NULL, r->len, PROT_READ, MAP_SHARED, r->fd, 0);
        if (fresh == MAP_FAILED) {
            rc = -errno;
        } else if (mremap(fresh, r->len, r->len, MREMAP_MAYMOVE | MREMAP_FIXED,
                          (void *)(uintptr_t)base) == MAP_FAILED) {
            rc = -errno;
            munmap(fresh, r->len);
        } else {
            madvise((void *)(uintptr_t)base, r->len, MADV_RANDOM);
            rc = 1;
        }
        if (rc < 0)
            atomic_store(&r->overlaid, 1);
        break;
    }
    pthread_mutex_unlock(&vs_mu);
    return rc;
}

int vs_copy_guarded(uint8_t *dst, uint64_t src, size_t n)
{
    uint64_t before = vs_thread_events;
    const volatile uint8_t *s = (const volatile uint8_t *)(uintptr_t)src;
    for (size_t i = 0; i < n; i++)
        dst[i] = s[i];
    return vs_thread_events == before ? 0 : -EFAULT;
}

/* Pages of [addr, addr+len) (a file map) whose file page is in the page cache, by
 * mincore(2) in 64 MiB steps. -errno on failure (EPERM under a seccomp filter without
 * mincore, ENOMEM outside any mapping). */
int64_t vs_mincore_count(uint64_t addr, uint64_t len)
{
    enum { STEP = 16384 };
    unsigned char vec[STEP];
    uint64_t pg = (uint64_t)sysconf(_SC_PAGESIZE), n = 0;
    for (uint64_t off = 0; off < len; off += STEP * pg) {
        uint64_t chunk = len - off < STEP * pg ? len - off : STEP * pg;
        if (mincore((void *)(uintptr_t)(addr + off), chunk, vec) != 0)
            return -errno;
        for (uint64_t i = 0; i < (chunk + pg - 1) / pg; i++)
            n += vec[i] & 1;
    }
    return (int64_t)n;
}

int vs_cachestat(int fd, uint64_t off, uint64_t len, uint64_t *out)
{
    struct { uint64_t off, len; } range = {off, len};
    uint64_t cs[5] = {0};
    if (syscall(VS_NR_CACHESTAT, fd, &range, cs, 0) != 0)
        return -errno;
    memcpy(out, cs, sizeof cs);
    return 0;
}

int64_t vs_punch(int fd, const uint64_t *ranges, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)ranges[2 * i],
                      (off_t)ranges[2 * i + 1]) != 0)
            return -errno;
    return (int64_t)n;
}

/* Fault-around maps up to fault_around_bytes (64 KiB) of cached pages around each read
 * fault of a file map: a B-tree walk or py-lmdb's preload next to a segment maps that
 * segment's pages too, and POSIX_FADV_DONTNEED skips mapped pages. So the MADV_DONTNEED
 * covers `pad` bytes more on each side than the range itself. */
int64_t vs_writeback(int fd, uint64_t map, uint64_t map_len, const uint64_t *ranges,
                     size_t n, unsigned int flags, int drop, uint64_t pad)
{
    uint64_t pg = (uint64_t)sysconf(_SC_PAGESIZE);
    for (size_t i = 0; i < n; i++) {
        uint64_t off = ranges[2 * i], len = ranges[2 * i + 1];
        /* never past the map: MADV_DONTNEED there would zero whatever is mapped next */
        uint64_t lo = (off > pad ? off - pad : 0) & ~(pg - 1);
        uint64_t hi = (off + len + pad + pg - 1) & ~(pg - 1);
        if (hi > map_len)
            hi = map_len & ~(pg - 1);
        if (map && lo < hi && madvise((void *)(uintptr_t)(map + lo), hi - lo,
                                      MADV_DONTNEED) != 0)
            return -errno;
        if (flags && sync_file_range(fd, (off_t)off, (off_t)len, flags) != 0)
            return -errno;
        if (drop && (errno = posix_fadvise(fd, (off_t)off, (off_t)len, POSIX_FADV_DONTNEED)))
            return -errno;
    }
    return (int64_t)n;
}
