/* faulter: see faulter.h. */
#define _GNU_SOURCE
#include "faulter.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u

struct ft_job {
    uint64_t base, n;
    const uint64_t *pages;
    uint64_t *words, *lat_ns;
    int threads, write;
    atomic_int running;
    uint64_t t0, t_end;
    pthread_t tid[64];
    int started;
};

struct ft_arg {
    ft_job *j;
    int t;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void *ft_thread(void *p)
{
    struct ft_arg *a = p;
    ft_job *j = a->j;
    int t = a->t;
    free(a);
    for (uint64_t i = (uint64_t)t; i < j->n; i += (uint64_t)j->threads) {
        volatile uint64_t *w = (volatile uint64_t *)(uintptr_t)(j->base + j->pages[i] * PAGE);
        uint64_t t0 = now_ns();
        uint64_t v = 0;
        if (j->write)
            w[1] = i + 1;
        else
            v = w[0];
        uint64_t t1 = now_ns();
        if (j->lat_ns)
            j->lat_ns[i] = t1 - t0;
        if (j->words)
            j->words[i] = v;
    }
    uint64_t end = now_ns();
    /* the last thread out stamps the end time */
    if (atomic_fetch_sub(&j->running, 1) == 1)
        __atomic_store_n(&j->t_end, end, __ATOMIC_RELEASE);
    return NULL;
}

ft_job *ft_start(uint64_t base, const uint64_t *pages, uint64_t n, int threads, int write,
                 uint64_t *words, uint64_t *lat_ns)
{
    if (threads < 1 || threads > 64) {
        errno = EINVAL;
        return NULL;
    }
    ft_job *j = calloc(1, sizeof *j);
    if (!j)
        return NULL;
    j->base = base;
    j->pages = pages;
    j->n = n;
    j->threads = threads;
    j->write = write;
    j->words = words;
    j->lat_ns = lat_ns;
    atomic_store(&j->running, threads);
    j->t0 = now_ns();
    for (int t = 0; t < threads; t++) {
        struct ft_arg *a = malloc(sizeof *a);
        int rc = a ? 0 : ENOMEM;
        if (a) {
            a->j = j;
            a->t = t;
            rc = pthread_create(&j->tid[t], NULL, ft_thread, a);
            if (rc)
                free(a);
        }
        if (rc) {
            /* threads that did not start count as finished */
            for (int u = t; u < threads; u++)
                atomic_fetch_sub(&j->running, 1);
            for (int u = 0; u < t; u++)
                pthread_join(j->tid[u], NULL);
            free(j);
            errno = rc;
            return NULL;
        }
        j->started++;
    }
    return j;
}

int ft_running(ft_job *j)
{
    return atomic_load(&j->running);
}

uint64_t ft_wall_ns(ft_job *j)
{
    uint64_t end = __atomic_load_n(&j->t_end, __ATOMIC_ACQUIRE);
    return end ? end - j->t0 : 0;
}

void ft_free(ft_job *j)
{
    for (int t = 0; t < j->started; t++)
        pthread_join(j->tid[t], NULL);
    free(j);
}

struct ft_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define FT_PAGEMAP_SCAN _IOWR('f', 16, struct ft_pm_scan_arg)

long ft_pagemap_scan(uint64_t start, uint64_t end, uint64_t flags, uint64_t category_mask,
                     uint64_t return_mask, void *vec, uint64_t vec_len, uint64_t *ns)
{
    static int fd = -1;
    if (fd < 0) {
        fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return -errno;
    }
    return ft_pagemap_scan_fd(fd, start, end, flags, category_mask, return_mask, vec, vec_len,
                              ns);
}

long ft_pagemap_scan_fd(int fd, uint64_t start, uint64_t end, uint64_t flags,
                        uint64_t category_mask, uint64_t return_mask, void *vec,
                        uint64_t vec_len, uint64_t *ns)
{
    struct ft_pm_scan_arg a = {
        .size = sizeof a, .flags = flags, .start = start, .end = end,
        .vec = (uintptr_t)vec, .vec_len = vec_len, .category_mask = category_mask,
        .return_mask = return_mask,
    };
    uint64_t t0 = now_ns();
    long r = ioctl(fd, FT_PAGEMAP_SCAN, &a);
    *ns = now_ns() - t0;
    return r < 0 ? -errno : r;
}
