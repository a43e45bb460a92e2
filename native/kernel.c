#define _GNU_SOURCE
#include "kernel.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define RET(x) ((x) < 0 ? -errno : (x))

long vt_ioctl(int fd, unsigned long req, void *arg)
{
    long r = ioctl(fd, req, arg);
    return RET(r);
}

static __thread int64_t vt_done;

int64_t vt_last_done(void)
{
    return vt_done;
}

/* COPY and MOVE share {dst, src, len, mode, s64 result}. */
int64_t vt_uffd_copy(int fd, unsigned long req, uint64_t dst, const char *src, uint64_t len,
                     uint64_t mode)
{
    struct uffdio_copy a = { .dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len,
                             .mode = mode, .copy = 0 };
    if (ioctl(fd, req, &a) < 0) {
        int err = errno;
        vt_done = a.copy;
        return -err;
    }
    return a.copy;
}

int64_t vt_uffd_move(int fd, unsigned long req, uint64_t dst, uint64_t src, uint64_t len,
                     uint64_t mode)
{
    struct uffdio_move a = { .dst = dst, .src = src, .len = len, .mode = mode, .move = 0 };
    if (ioctl(fd, req, &a) < 0) {
        int err = errno;
        vt_done = a.move;
        return -err;
    }
    return a.move;
}

/* ZEROPAGE, CONTINUE and POISON share {range, mode, s64 result}. */
int64_t vt_uffd_range_result(int fd, unsigned long req, uint64_t start, uint64_t len,
                             uint64_t mode)
{
    struct uffdio_zeropage a = { .range = { start, len }, .mode = mode, .zeropage = 0 };
    if (ioctl(fd, req, &a) < 0) {
        int err = errno;
        vt_done = a.zeropage;
        return -err;
    }
    return a.zeropage;
}

/* WRITEPROTECT and RWPROTECT: {range, mode}. */
int64_t vt_uffd_range_mode(int fd, unsigned long req, uint64_t start, uint64_t len,
                           uint64_t mode)
{
    struct uffdio_writeprotect a = { .range = { start, len }, .mode = mode };
    return ioctl(fd, req, &a) < 0 ? -errno : 0;
}

/* WAKE and UNREGISTER: a bare range. */
int64_t vt_uffd_range(int fd, unsigned long req, uint64_t start, uint64_t len)
{
    struct uffdio_range a = { start, len };
    return ioctl(fd, req, &a) < 0 ? -errno : 0;
}

/* /dev/userfaultfd (5.11+) works for unprivileged users under the device's
 * permissions; the syscall is the fallback where the device is absent. */
int vt_uffd_new(unsigned long ioc_new, int flags)
{
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        int fd = ioctl(dev, ioc_new, (unsigned long)flags);
        int err = errno;
        close(dev);
        if (fd >= 0)
            return fd;
        if (err != ENOTTY && err != EINVAL)
            return -err;
    }
    long fd = syscall(SYS_userfaultfd, flags);
    return (int)RET(fd);
}

int vt_close(int fd)
{
    int r = close(fd);
    return RET(r);
}

/* Addresses are below 2^47 on x86_64, so a negative result is unambiguously -errno. */
int64_t vt_mmap(uint64_t addr, size_t len, int prot, int flags, int fd, int64_t off)
{
    void *p = mmap((void *)(uintptr_t)addr, len, prot, flags, fd, (off_t)off);
    if (p == MAP_FAILED)
        return -errno;
    return (int64_t)(uintptr_t)p;
}

int vt_munmap(uint64_t addr, size_t len)
{
    int r = munmap((void *)(uintptr_t)addr, len);
    return RET(r);
}

int vt_madvise(uint64_t addr, size_t len, int advice)
{
    int r = madvise((void *)(uintptr_t)addr, len, advice);
    return RET(r);
}

int vt_memfd_create(const char *name, unsigned int flags)
{
    int r = memfd_create(name, flags);
    return RET(r);
}

int vt_ftruncate(int fd, int64_t len)
{
    int r = ftruncate(fd, (off_t)len);
    return RET(r);
}

int vt_fallocate(int fd, int mode, int64_t off, int64_t len)
{
    int r = fallocate(fd, mode, (off_t)off, (off_t)len);
    return RET(r);
}

/* Reads until len bytes or EOF; returns bytes read, or -errno if nothing was read. */
int64_t vt_pread_full(int fd, void *buf, size_t len, int64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(fd, (char *)buf + done, len - done, (off_t)off + (off_t)done);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return done ? (int64_t)done : -errno;
        }
        if (r == 0)
            break;
        done += (size_t)r;
    }
    return (int64_t)done;
}

int64_t vt_read(int fd, void *buf, size_t len)
{
    ssize_t r = read(fd, buf, len);
    return RET(r);
}

int vt_open(const char *path, int flags)
{
    int r = open(path, flags);
    return RET(r);
}

/* Runs with the GIL released: if the source were registered and not present, this
 * thread would block on the fault without stalling the fault server. */
void vt_memcpy_out(void *dst, uint64_t src, size_t len)
{
    memcpy(dst, (const void *)(uintptr_t)src, len);
}
