/* guest_verify: reads every page of a stopped workload back and checks its stamp. */
#define _GNU_SOURCE
#include "guest_verify.h"
#include "guest_internal.h"

#include <string.h>

typedef struct vg_vjob {
    struct vg_workload *w;
    int own_thread;
    uint64_t first, end;
    vg_verify_report r;
} vg_vjob;

/* 0 ok, 1 lost write, 2 corrupt */
static int vg_check_page(const uint64_t *b, uint64_t p, uint64_t expect)
{
    uint64_t idx1 = b[0], ver = b[1];
    if (idx1 == 0 && ver == 0) {
        for (unsigned i = 2; i < WORDS; i++)
            if (b[i])
                return 2;
        return expect == 0 ? 0 : 1;
    }
    if (idx1 != p + 1 || ver == 0 || ver > expect)
        return 2;
    uint64_t s = vg_seed(p, ver), x = s;
    for (unsigned i = 2; i < 256; i++) {
        x = vg_xs(x);
        if (b[i] != x)
            return 2;
    }
    for (unsigned i = 256; i < WORDS; i++)
        if (b[i] != s)
            return 2;
    return ver < expect ? 1 : 0;
}

static void *vg_verify_main(void *arg)
{
    vg_vjob *j = arg;
    void *alt = j->own_thread ? vg_altstack_on() : NULL;
    uint64_t buf[WORDS];
    for (uint64_t p = j->first; p < j->end; p++) {
        uint64_t expect = atomic_load_explicit(&j->w->versions[p], memory_order_acquire);
        int bad;
        if (vg_guarded_read_page(j->w->base + p * WORDS, buf) != 0) {
            j->r.poisoned_pages++;
            bad = 1;
        } else {
            int c = vg_check_page(buf, p, expect);
            if (c == 1)
                j->r.lost_writes++;
            else if (c == 2)
                j->r.corrupt_pages++;
            bad = c != 0;
        }
        if (bad && j->r.nbad < VG_MAX_BAD)
            j->r.bad[j->r.nbad++] = p;
        j->r.pages++;
    }
    vg_altstack_off(alt);
    return NULL;
}

/* Read every page (faults evicted pages back in) and check its stamp against the last
 * recorded version. Call after the workload stopped. */
int vg_workload_verify(vg_workload *w, int nthreads, vg_verify_report *out)
{
    memset(out, 0, sizeof *out);
    vg_ensure_handler();
    if (nthreads < 1)
        nthreads = 1;
    if (nthreads > 8)
        nthreads = 8;
    if ((uint64_t)nthreads > w->npages)
        nthreads = (int)w->npages;
    vg_vjob jobs[8];
    pthread_t th[8];
    int made[8] = {0};
    uint64_t per = w->npages / (uint64_t)nthreads;
    for (int i = 0; i < nthreads; i++) {
        memset(&jobs[i], 0, sizeof jobs[i]);
        jobs[i].w = w;
        jobs[i].first = per * (uint64_t)i;
        jobs[i].end = i == nthreads - 1 ? w->npages : per * (uint64_t)(i + 1);
        jobs[i].own_thread = 1;
        made[i] = pthread_create(&th[i], NULL, vg_verify_main, &jobs[i]) == 0;
        if (!made[i]) {
            jobs[i].own_thread = 0; /* no thread: do it here, leaving our altstack alone */
            vg_verify_main(&jobs[i]);
        }
    }
    for (int i = 0; i < nthreads; i++) {
        if (made[i])
            pthread_join(th[i], NULL);
        vg_verify_report *r = &jobs[i].r;
        out->pages += r->pages;
        out->lost_writes += r->lost_writes;
        out->corrupt_pages += r->corrupt_pages;
        out->poisoned_pages += r->poisoned_pages;
        for (uint64_t k = 0; k < r->nbad && out->nbad < VG_MAX_BAD; k++)
            out->bad[out->nbad++] = r->bad[k];
    }
    return 0;
}
