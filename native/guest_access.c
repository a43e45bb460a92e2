/* guest_access: one-shot accessor threads (READ, WRITE, GUP_READ) on guest memory. */
#define _GNU_SOURCE
#include "guest_access.h"
#include "guest_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>

struct vg_access {
    int kind;
    uint8_t *addr;
    size_t length;
    uint8_t *data;   /* WRITE input */
    uint8_t *result; /* READ / GUP_READ output */
    size_t result_len;
    int status;
    int err;
    atomic_int tid;
    atomic_int refs;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

static void vg_access_put(vg_access *a)
{
    if (atomic_fetch_sub(&a->refs, 1) == 1) {
        pthread_mutex_destroy(&a->mu);
        pthread_cond_destroy(&a->cv);
        free(a->data);
        free(a->result);
        free(a);
    }
}

static int vg_gup_read(vg_access *a)
{
    /* write() copies from user memory in kernel mode: a uffd-registered page blocks the
     * syscall like a guest access would (EFAULT instead if the uffd is USER_MODE_ONLY), a
     * poisoned page gives EFAULT. One pipe-capacity chunk at a time, so write never blocks. */
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0)
        return errno;
    int err = 0;
    size_t done = 0;
    while (done < a->length) {
        size_t chunk = a->length - done;
        if (chunk > 65536)
            chunk = 65536;
        ssize_t w = write(p[1], a->addr + done, chunk);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            err = errno;
            break;
        }
        size_t got = 0;
        while (got < (size_t)w) {
            ssize_t r = read(p[0], a->result + done + got, (size_t)w - got);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0) {
                err = r < 0 ? errno : EIO;
                break;
            }
            got += (size_t)r;
        }
        done += got;
        if (err)
            break;
    }
    a->result_len = done;
    close(p[0]);
    close(p[1]);
    return err;
}

static void *vg_access_thread(void *arg)
{
    vg_access *a = arg;
    atomic_store(&a->tid, vg_gettid());
    void *alt = vg_altstack_on();
    int status = VG_OK, err = 0;
    if (a->kind == VG_READ) {
        if (vg_guarded_copy_out(a->addr, a->result, a->length) != 0)
            status = VG_SIGBUS;
        else
            a->result_len = a->length;
    } else if (a->kind == VG_WRITE) {
        if (vg_guarded_copy_in(a->addr, a->data, a->length) != 0)
            status = VG_SIGBUS;
    } else {
        err = vg_gup_read(a);
        if (err)
            status = VG_ERROR;
    }
    vg_altstack_off(alt);
    pthread_mutex_lock(&a->mu);
    a->status = status;
    a->err = err;
    pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
    vg_access_put(a);
    return NULL;
}

vg_access *vg_access_start(int kind, uint64_t addr, size_t length, const uint8_t *data)
{
    if (kind < VG_READ || kind > VG_GUP_READ) {
        errno = EINVAL;
        return NULL;
    }
    vg_ensure_handler();
    vg_access *a = calloc(1, sizeof *a);
    if (!a)
        return NULL;
    a->kind = kind;
    a->addr = (uint8_t *)(uintptr_t)addr;
    a->length = length;
    atomic_init(&a->refs, 2);
    atomic_init(&a->tid, 0);
    pthread_mutex_init(&a->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&a->cv, &ca);
    pthread_condattr_destroy(&ca);
    size_t cap = length ? length : 1;
    if (kind == VG_WRITE) {
        a->data = malloc(cap);
        if (a->data && length)
            memcpy(a->data, data, length);
    } else {
        a->result = malloc(cap);
    }
    if (!a->data && !a->result) {
        atomic_store(&a->refs, 1);
        vg_access_put(a);
        errno = ENOMEM;
        return NULL;
    }
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_t th;
    int rc = pthread_create(&th, &at, vg_access_thread, a);
    pthread_attr_destroy(&at);
    if (rc != 0) {
        atomic_store(&a->refs, 1);
        vg_access_put(a);
        errno = rc;
        return NULL;
    }
    return a;
}

int vg_access_wait(vg_access *a, double timeout_s)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    if (timeout_s < 0)
        timeout_s = 0;
    time_t sec = (time_t)timeout_s;
    ts.tv_sec += sec;
    ts.tv_nsec += (long)((timeout_s - (double)sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&a->mu);
    while (a->status == VG_PENDING)
        if (pthread_cond_timedwait(&a->cv, &a->mu, &ts) == ETIMEDOUT)
            break;
    int st = a->status;
    pthread_mutex_unlock(&a->mu);
    return st;
}

int vg_access_status(vg_access *a)
{
    pthread_mutex_lock(&a->mu);
    int st = a->status;
    pthread_mutex_unlock(&a->mu);
    return st;
}

int vg_access_tid(vg_access *a) { return atomic_load(&a->tid); }

int vg_access_err(vg_access *a)
{
    pthread_mutex_lock(&a->mu);
    int e = a->err;
    pthread_mutex_unlock(&a->mu);
    return e;
}

size_t vg_access_result(vg_access *a, uint8_t *out, size_t cap)
{
    pthread_mutex_lock(&a->mu);
    size_t n = 0;
    if (a->status != VG_PENDING && a->result) {
        n = a->result_len < cap ? a->result_len : cap;
        memcpy(out, a->result, n);
    }
    pthread_mutex_unlock(&a->mu);
    return n;
}

/* The Python handle lets go; a thread still blocked in a fault frees it when it ends. */
void vg_access_release(vg_access *a) { vg_access_put(a); }
