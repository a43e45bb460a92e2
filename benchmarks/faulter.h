/* faulter: guest-like C threads that touch one word of each listed page and time it.
 * Linked into ref_handler (the C side) and loaded as a shared object by bench_faults.py /
 * bench_cycle.py (the engine side), so both sides measure faults the same way. */
#pragma once
#include <stdint.h>

typedef struct ft_job ft_job;

/* Thread t touches pages[i] for every i = t (mod threads), in order: a read of the page's
 * first u64 (stored in words[i] when words != NULL), or with write != 0 a store of
 * (i + 1) into its second u64. lat_ns[i] (when not NULL) is the access's duration measured
 * with CLOCK_MONOTONIC around the access. Returns NULL with errno set on failure. */
ft_job *ft_start(uint64_t base, const uint64_t *pages, uint64_t n, int threads, int write,
                 uint64_t *words, uint64_t *lat_ns);
/* Threads still running. */
int ft_running(ft_job *j);
/* ns from ft_start until the last thread finished (0 while running). */
uint64_t ft_wall_ns(ft_job *j);
/* Join and free (the threads must have finished). */
void ft_free(ft_job *j);

/* One PAGEMAP_SCAN ioctl on /proc/self/pagemap over [start, end) with a caller vector;
 * returns the ioctl's result (regions, or -errno) and its duration in *ns. */
long ft_pagemap_scan(uint64_t start, uint64_t end, uint64_t flags, uint64_t category_mask,
                     uint64_t return_mask, void *vec, uint64_t vec_len, uint64_t *ns);
/* The same on an open pagemap file, e.g. /proc/PID/pagemap of another process. */
long ft_pagemap_scan_fd(int fd, uint64_t start, uint64_t end, uint64_t flags,
                        uint64_t category_mask, uint64_t return_mask, void *vec,
                        uint64_t vec_len, uint64_t *ns);
