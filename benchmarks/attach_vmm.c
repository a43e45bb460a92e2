/* attach_vmm: a stand-in VMM for bench_attach.py, whose "vCPU" threads time every access.
 *
 *   attach_vmm RAM_BYTES
 *
 * Guest RAM is a memfd named like QEMU's ("memory-backend-memfd"), mapped MAP_SHARED
 * read-write, as `vmm-tierd attach` expects. Guest accesses are faulter.c threads named
 * "CPU 0/KVM" (a thread's name is inherited from the thread that creates it: a launcher
 * thread takes the name first), so the daemon never injects into them; the main thread
 * sits in ppoll on stdin (a restartable syscall, as QEMU's main loop) and is where
 * injections go. It dies with its parent (PR_SET_PDEATHSIG).
 *
 * One command per line on stdin, one answer line on stdout:
 *   populate                  -> OK ns=N   (MADV_POPULATE_WRITE over all RAM: every page
 *                                           mapped in this process, as a running guest's)
 *   touch ORDER OUT THREADS W -> DONE n=N wall_ns=N
 *        THREADS threads touch the RAM pages listed in ORDER (u64 page indexes) as
 *        faulter.c does (W=0: read the page's first u64, W=1: store into its second);
 *        OUT gets u64 lat_ns[n] (each access as the touching thread saw it) then u64
 *        words[n] (the values read).
 *   quit (or EOF)             -> exit 0
 * Start-up line: READY pid=N ram_addr=0x.. memfd=N ram_bytes=N
 * Errors: "ERROR what: why" on stdout, then exit 2. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "faulter.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#define PAGE 4096u

static char *ram;
static size_t ram_bytes;

static void die(const char *what)
{
    printf("ERROR %s: %s\n", what, strerror(errno));
    fflush(stdout);
    exit(2);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

struct touch {
    uint64_t *order, *lat, *words, n, wall;
    int threads, write, done_fd;
};

static void *launcher(void *arg)
{
    struct touch *t = arg;
    prctl(PR_SET_NAME, "CPU 0/KVM", 0, 0, 0); /* the faulter threads inherit it */
    ft_job *j = ft_start((uintptr_t)ram, t->order, t->n, t->threads, t->write, t->words,
                         t->lat);
    if (!j)
        die("ft_start");
    while (ft_running(j)) {
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
    t->wall = ft_wall_ns(j);
    ft_free(j);
    if (write(t->done_fd, "x", 1) != 1)
        die("write(done)");
    return NULL;
}

/* Wait in ppoll (the main thread's one blocking call: where injections find it). */
static int wait_readable(int fd)
{
    struct pollfd p = {fd, POLLIN, 0};
    for (;;) {
        int r = ppoll(&p, 1, NULL, NULL);
        if (r > 0)
            return p.revents;
        if (r < 0 && errno != EINTR)
            die("ppoll");
    }
}

static void touch(const char *order_file, const char *out_file, int threads, int wr)
{
    FILE *f = fopen(order_file, "rb");
    if (!f)
        die(order_file);
    fseek(f, 0, SEEK_END);
    uint64_t n = (uint64_t)ftell(f) / 8;
    fseek(f, 0, SEEK_SET);
    struct touch t = {malloc(n * 8 + 8), calloc(n + 1, 8), calloc(n + 1, 8), n, 0, threads,
                      wr, -1};
    if (!t.order || !t.lat || !t.words || fread(t.order, 8, n, f) != n)
        die("reading the page order");
    fclose(f);
    for (uint64_t i = 0; i < n; i++)
        if (t.order[i] >= ram_bytes / PAGE) {
            errno = ERANGE;
            die("page index beyond the RAM");
        }
    int done[2];
    if (pipe2(done, O_CLOEXEC))
        die("pipe");
    t.done_fd = done[1];
    pthread_t th;
    if ((errno = pthread_create(&th, NULL, launcher, &t)))
        die("pthread_create");
    wait_readable(done[0]);
    pthread_join(th, NULL);
    close(done[0]);
    close(done[1]);
    f = fopen(out_file, "wb");
    if (!f || fwrite(t.lat, 8, n, f) != n || fwrite(t.words, 8, n, f) != n || fclose(f))
        die(out_file);
    printf("DONE n=%lu wall_ns=%lu\n", (unsigned long)n, (unsigned long)t.wall);
    free(t.order);
    free(t.lat);
    free(t.words);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: attach_vmm RAM_BYTES\n");
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (getppid() == 1)
        return 3; /* the parent is gone already */
    ram_bytes = strtoull(argv[1], NULL, 0);
    if (!ram_bytes || ram_bytes % PAGE) {
        errno = EINVAL;
        die("RAM_BYTES");
    }
    int fd = memfd_create("memory-backend-memfd", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)ram_bytes))
        die("memfd");
    ram = mmap(NULL, ram_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (ram == MAP_FAILED)
        die("mmap");
    printf("READY pid=%d ram_addr=%p memfd=%d ram_bytes=%zu\n", getpid(), (void *)ram, fd,
           ram_bytes);
    char line[8192], a[4096], b[4096];
    for (;;) {
        wait_readable(0);
        if (!fgets(line, sizeof line, stdin) || !strncmp(line, "quit", 4))
            return 0;
        int threads, wr;
        if (!strncmp(line, "populate", 8)) {
            uint64_t t0 = now_ns();
            if (madvise(ram, ram_bytes, MADV_POPULATE_WRITE))
                die("madvise(MADV_POPULATE_WRITE)");
            printf("OK ns=%lu\n", (unsigned long)(now_ns() - t0));
        } else if (sscanf(line, "touch %4095s %4095s %d %d", a, b, &threads, &wr) == 4) {
            touch(a, b, threads, wr);
        } else {
            errno = EINVAL;
            die("command");
        }
    }
}
