#pragma once
/* Thin syscall/ioctl wrappers for vmm_tierd.kernel.linux. Every call returns the
 * syscall's result or -errno. The UAPI structs are defined here, not taken from
 * <linux/userfaultfd.h>: the installed headers are 6.1-era (no MOVE, POISON, WP_ASYNC,
 * PAGEMAP_SCAN) and the 7.3 RWP structs exist nowhere on this host. Ioctl numbers are
 * passed in from vmm_tierd/kernel/uapi.py. */
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct uffdio_api { uint64_t api; uint64_t features; uint64_t ioctls; };
struct uffdio_range { uint64_t start; uint64_t len; };
struct uffdio_register { struct uffdio_range range; uint64_t mode; uint64_t ioctls; };
struct uffdio_copy { uint64_t dst; uint64_t src; uint64_t len; uint64_t mode; int64_t copy; };
struct uffdio_zeropage { struct uffdio_range range; uint64_t mode; int64_t zeropage; };
struct uffdio_writeprotect { struct uffdio_range range; uint64_t mode; };
struct uffdio_continue { struct uffdio_range range; uint64_t mode; int64_t mapped; };
struct uffdio_move { uint64_t dst; uint64_t src; uint64_t len; uint64_t mode; int64_t move; };
struct uffdio_poison { struct uffdio_range range; uint64_t mode; int64_t updated; };
/* Linux 7.3 */
struct uffdio_rwprotect { struct uffdio_range range; uint64_t mode; };
struct uffdio_set_mode { uint64_t enable; uint64_t disable; };
/* struct uffd_msg is __packed with a union; Python decodes the raw 32 bytes. */
struct uffd_msg_raw { uint8_t bytes[32]; };

struct page_region { uint64_t start; uint64_t end; uint64_t categories; };
struct pm_scan_arg {
    uint64_t size; uint64_t flags; uint64_t start; uint64_t end; uint64_t walk_end;
    uint64_t vec; uint64_t vec_len; uint64_t max_pages; uint64_t category_inverted;
    uint64_t category_mask; uint64_t category_anyof_mask; uint64_t return_mask;
};

long vt_ioctl(int fd, unsigned long req, void *arg);
/* Scalar fast paths for the fault path (no struct allocation in Python). They return
 * the struct's result field (bytes done) or -errno; after an error, vt_last_done()
 * (thread-local) holds the result field, itself -errno when nothing was done. */
int64_t vt_uffd_copy(int fd, unsigned long req, uint64_t dst, const char *src, uint64_t len,
                     uint64_t mode);
int64_t vt_uffd_move(int fd, unsigned long req, uint64_t dst, uint64_t src, uint64_t len,
                     uint64_t mode);
int64_t vt_uffd_range_result(int fd, unsigned long req, uint64_t start, uint64_t len,
                             uint64_t mode);
int64_t vt_uffd_range_mode(int fd, unsigned long req, uint64_t start, uint64_t len,
                           uint64_t mode);
int64_t vt_uffd_range(int fd, unsigned long req, uint64_t start, uint64_t len);
int64_t vt_last_done(void);
int vt_uffd_new(unsigned long ioc_new, int flags);
int vt_close(int fd);
int64_t vt_mmap(uint64_t addr, size_t len, int prot, int flags, int fd, int64_t off);
int vt_munmap(uint64_t addr, size_t len);
int vt_madvise(uint64_t addr, size_t len, int advice);
int vt_memfd_create(const char *name, unsigned int flags);
int vt_ftruncate(int fd, int64_t len);
int vt_fallocate(int fd, int mode, int64_t off, int64_t len);
int64_t vt_pread_full(int fd, void *buf, size_t len, int64_t off);
int64_t vt_read(int fd, void *buf, size_t len);
int vt_open(const char *path, int flags);
void vt_memcpy_out(void *dst, uint64_t src, size_t len);
