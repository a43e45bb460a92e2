#pragma once
/* store_io: the page store's file layer (vmm_tierd/kernel/linux_store.py).
 * Every call returns >= 0 or -errno. */
#include <stddef.h>
#include <stdint.h>

/* SIGBUS containment for LMDB's read-only map of data.mdb (see store_io.c). */
int vs_guard_add(uint64_t base, uint64_t len, int fd, int repairable);
int vs_guard_remove(uint64_t base);
int vs_guard_ensure(void);
uint64_t vs_guard_events(void);
uint64_t vs_guard_range_events(uint64_t base);
uint64_t vs_guard_thread_events(void); /* contained in the calling thread */
int vs_guard_repair(uint64_t base);

/* mincore(2): pages of the map [addr, addr+len) cached (see store_io.c). */
/* cachestat(2) over [off, off+len) (len 0: to EOF): out[0..4] = cached, dirty, writeback,
 * evicted, recently evicted pages. */
int vs_cachestat(int fd, uint64_t off, uint64_t len, uint64_t *out);
int64_t vs_mincore_count(uint64_t addr, uint64_t len);
/* fallocate(PUNCH_HOLE|KEEP_SIZE) each (offset, length) pair of `ranges`. Returns the
 * number of ranges punched, or -errno of the first failure. */
int64_t vs_punch(int fd, const uint64_t *ranges, size_t n);
/* For each (offset, length) pair: MADV_DONTNEED on [map+offset-pad, ...+pad) (clipped to
 * [map, map+map_len)) if map != 0,
 * sync_file_range(flags) when flags != 0, then POSIX_FADV_DONTNEED when drop != 0. */
int64_t vs_writeback(int fd, uint64_t map, uint64_t map_len, const uint64_t *ranges,
                     size_t n, unsigned int flags, int drop, uint64_t pad);
/* Copy n bytes from src (inside a guarded map) to dst; -EFAULT if a SIGBUS was contained
 * during the copy (the bytes read as zeros). */
int vs_copy_guarded(uint8_t *dst, uint64_t src, size_t n);
