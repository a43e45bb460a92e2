/* A stand-in for a VMM, for tests of vmm_tierd.kernel.linux_process and remote.
 *
 *   target CTL_FD RAM_BYTES VCPUS NAME
 *
 * Guest RAM is a memfd named NAME (QEMU: "memory-backend-memfd") of RAM_BYTES, mapped
 * MAP_SHARED read-write, every 8-byte word of page p holding pattern(p); a 1 MiB private
 * anonymous area holds the same pattern. VCPUS threads named "CPU n/KVM" access memory
 * on command. Three workers sit in restartable syscalls when idle or on command: a futex
 * wait ("worker-futex"), read then clock_nanosleep ("worker-sleep"), recvfrom
 * ("worker-recv"). The main thread sits in ppoll on the control socket CTL_FD and
 * counts SIGUSR1 (the only thread that does not block it).
 *
 * Protocol: one line per command, tokens separated by spaces, binary data in hex; every
 * reply starts with the command's id. Start-up line:
 *   READY ram_addr=0x.. ram_fd=N anon_addr=0x.. anon_bytes=N vcpus=TID,.. futex=TID sleep=TID recv=TID
 * Commands and replies:
 *   PING id                     -> OK id
 *   SIGCOUNT id                 -> OK id N
 *   COMM id tid hexname         -> OK id | ERR id errno      (renames thread tid)
 *   ACC id vcpu kind addr len hexdata   kind: r (load), w (store), g (write(2) from addr)
 *                               -> ACC id status err hexdata   status: ok, sigbus, error
 *   FWAKE id                    -> OK id ret err early   (futex worker woken; early = returns
 *                                  of its FUTEX_WAIT before the wake, must be 0)
 *   SLEEP id ms                 -> OK id ret err elapsed_ns   (clock_nanosleep by the sleeper)
 *   SEND id hexdata             -> OK id n err hexdata   (n: recvfrom's result less the id)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <linux/futex.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define ANON_BYTES (1 << 20)
#define MAX_VCPUS 16
#define MAX_ACCESS (1 << 20)

static int ctl;
static pthread_mutex_t ctl_lock = PTHREAD_MUTEX_INITIALIZER;
static char *ram, *anon;
static size_t ram_bytes;
static volatile sig_atomic_t usr1_count;

static void die(const char *what)
{
    fprintf(stderr, "target: %s: %s\n", what, strerror(errno));
    exit(2);
}

static uint64_t pattern(uint64_t page)
{
    return (page + 1) * 0x9E3779B97F4A7C15ull;
}

static void fill(char *base, size_t len)
{
    for (size_t p = 0; p < len / PAGE; p++) {
        uint64_t *w = (uint64_t *)(base + p * PAGE), v = pattern(p);
        for (size_t i = 0; i < PAGE / 8; i++)
            w[i] = v;
    }
}

static void send_raw(const char *buf, size_t len)
{
    size_t n = 0;
    while (n < len) {
        ssize_t r = write(ctl, buf + n, len - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            exit(3); /* the driver is gone */
        n += (size_t)r;
    }
}

static void send_line(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void send_line(const char *fmt, ...)
{
    char *s;
    va_list ap;
    va_start(ap, fmt);
    int n = vasprintf(&s, fmt, ap);
    va_end(ap);
    if (n < 0)
        die("vasprintf");
    pthread_mutex_lock(&ctl_lock);
    send_raw(s, (size_t)n);
    send_raw("\n", 1);
    pthread_mutex_unlock(&ctl_lock);
    free(s);
}

/* Lower-case hex of p[0..n), or "-" for no bytes (a token is never empty). */
static char *hex(const unsigned char *p, size_t n)
{
    static const char d[] = "0123456789abcdef";
    char *s = malloc(2 * n + 2);
    if (!s)
        die("malloc");
    for (size_t i = 0; i < n; i++) {
        s[2 * i] = d[p[i] >> 4];
        s[2 * i + 1] = d[p[i] & 15];
    }
    strcpy(s + 2 * n, n ? "" : "-");
    return s;
}

static size_t unhex(const char *s, unsigned char *out, size_t max)
{
    size_t n = 0;
    if (!strcmp(s, "-"))
        return 0;
    for (; s[0] && s[1] && n < max; s += 2)
        out[n++] = (unsigned char)strtoul((char[]){ s[0], s[1], 0 }, NULL, 16);
    return n;
}

static pid_t gettid_(void)
{
    return (pid_t)syscall(SYS_gettid);
}

/* ---- vCPU threads ----------------------------------------------------------------- */
struct job {
    struct job *next;
    char id[32];
    char kind;
    char *addr;
    size_t len;
    unsigned char *data;
};

struct vcpu {
    pthread_t th;
    pid_t tid;
    int pipe[2]; /* for 'g': write(2) reads guest memory through the kernel */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct job *head, *tail;
};

static struct vcpu vcpus[MAX_VCPUS];
static int nvcpus;
static __thread sigjmp_buf access_jmp;
static __thread volatile int in_access;

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
    (void)si;
    (void)uc;
    if (in_access)
        siglongjmp(access_jmp, 1);
    signal(sig, SIG_DFL);
    raise(sig);
}

static void run_job(struct vcpu *v, struct job *j)
{
    unsigned char *buf = malloc(j->len ? j->len : 1);
    const char *volatile status = "ok";
    volatile int err = 0;
    volatile size_t out = 0;
    if (!buf)
        die("malloc");
    if (sigsetjmp(access_jmp, 1) == 0) {
        in_access = 1;
        if (j->kind == 'r') {
            memcpy(buf, j->addr, j->len);
            out = j->len;
        } else if (j->kind == 'w') {
            memcpy(j->addr, j->data, j->len);
        } else {
            ssize_t w = write(v->pipe[1], j->addr, j->len);
            if (w < 0) {
                status = "error";
                err = errno;
            } else {
                ssize_t r = read(v->pipe[0], buf, (size_t)w);
                out = r > 0 ? (size_t)r : 0;
            }
        }
        in_access = 0;
    } else {
        in_access = 0;
        status = "sigbus";
        out = 0;
    }
    char *h = hex(buf, out);
    send_line("ACC %s %s %d %s", j->id, status, err, h);
    free(h);
    free(buf);
}

static void *vcpu_main(void *arg)
{
    struct vcpu *v = arg;
    char name[16];
    snprintf(name, sizeof name, "CPU %d/KVM", (int)(v - vcpus));
    pthread_setname_np(pthread_self(), name);
    pthread_mutex_lock(&v->lock);
    v->tid = gettid_();
    pthread_cond_broadcast(&v->cond);
    for (;;) {
        while (!v->head)
            pthread_cond_wait(&v->cond, &v->lock);
        struct job *j = v->head;
        v->head = j->next;
        if (!v->head)
            v->tail = NULL;
        pthread_mutex_unlock(&v->lock);
        run_job(v, j);
        free(j->data);
        free(j);
        pthread_mutex_lock(&v->lock);
    }
    return NULL;
}

static int in_memory(const char *a, size_t len)
{
    return (a >= ram && len <= ram_bytes && a - ram <= (ptrdiff_t)(ram_bytes - len))
        || (a >= anon && len <= ANON_BYTES && a - anon <= (ptrdiff_t)(ANON_BYTES - len));
}

static void cmd_access(const char *id, char **tok, int ntok)
{
    if (ntok < 5) {
        send_line("ERR %s %d", id, EINVAL);
        return;
    }
    int cpu = atoi(tok[0]);
    char kind = tok[1][0];
    char *addr = (char *)(uintptr_t)strtoull(tok[2], NULL, 0);
    size_t len = strtoull(tok[3], NULL, 0);
    if (cpu < 0 || cpu >= nvcpus || !strchr("rwg", kind) || len > MAX_ACCESS
        || (kind == 'g' && len > 65536) || !in_memory(addr, len)) {
        send_line("ACC %s error %d -", id, EINVAL);
        return;
    }
    struct job *j = calloc(1, sizeof *j);
    if (!j)
        die("calloc");
    snprintf(j->id, sizeof j->id, "%s", id);
    j->kind = kind;
    j->addr = addr;
    j->len = len;
    if (kind == 'w') {
        j->data = malloc(len ? len : 1);
        if (!j->data || unhex(tok[4], j->data, len) != len) {
            send_line("ACC %s error %d -", id, EINVAL);
            free(j->data);
            free(j);
            return;
        }
    }
    struct vcpu *v = &vcpus[cpu];
    pthread_mutex_lock(&v->lock);
    if (v->tail)
        v->tail->next = j;
    else
        v->head = j;
    v->tail = j;
    pthread_cond_signal(&v->cond);
    pthread_mutex_unlock(&v->lock);
}

/* ---- workers in restartable syscalls ------------------------------------------------ */
static _Atomic uint32_t fword;
static char futex_id[32];
static pid_t futex_tid, sleep_tid, recv_tid;
static int sleep_pipe[2], recv_sock[2];
static pthread_mutex_t start_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t start_cond = PTHREAD_COND_INITIALIZER;

static void started(pid_t *slot, const char *name)
{
    pthread_setname_np(pthread_self(), name);
    pthread_mutex_lock(&start_lock);
    *slot = gettid_();
    pthread_cond_broadcast(&start_cond);
    pthread_mutex_unlock(&start_lock);
}

static void *futex_main(void *arg)
{
    (void)arg;
    started(&futex_tid, "worker-futex");
    for (;;) {
        uint32_t seen = atomic_load(&fword);
        int early = 0;
        long r;
        int err;
        for (;;) {
            r = syscall(SYS_futex, &fword, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
            err = r < 0 ? errno : 0;
            if (atomic_load(&fword) != seen)
                break;
            early++; /* returned without a wake: a broken restart would show here */
        }
        send_line("OK %s %ld %d %d", futex_id, r, err, early);
    }
    return NULL;
}

static void *sleep_main(void *arg)
{
    (void)arg;
    started(&sleep_tid, "worker-sleep");
    for (;;) {
        char cmd[64] = { 0 }, id[32];
        long ms;
        size_t n = 0;
        while (n < sizeof cmd - 1) { /* one line: "id ms\n" */
            ssize_t r = read(sleep_pipe[0], cmd + n, 1);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                return NULL;
            if (cmd[n++] == '\n')
                break;
        }
        if (sscanf(cmd, "%31s %ld", id, &ms) != 2)
            continue;
        struct timespec ts = { ms / 1000, (ms % 1000) * 1000000 }, t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        int r = clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL); /* returns the error */
        clock_gettime(CLOCK_MONOTONIC, &t1);
        int64_t el = (int64_t)(t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec);
        send_line("OK %s %d %d %" PRId64, id, r, r, el);
    }
    return NULL;
}

static void *recv_main(void *arg)
{
    (void)arg;
    started(&recv_tid, "worker-recv");
    unsigned char buf[4096];
    for (;;) {
        ssize_t r = recvfrom(recv_sock[0], buf, sizeof buf, 0, NULL, NULL);
        int err = r < 0 ? errno : 0;
        /* The sender put "id " in front of the data. */
        size_t n = r > 0 ? (size_t)r : 0, sp = 0;
        while (sp < n && buf[sp] != ' ')
            sp++;
        char id[32];
        snprintf(id, sizeof id, "%.*s", (int)(sp < 31 ? sp : 31), (char *)buf);
        size_t dn = sp < n ? n - sp - 1 : 0;
        char *h = hex(buf + (sp < n ? sp + 1 : n), dn);
        send_line("OK %s %zd %d %s", id, r < 0 ? r : (ssize_t)dn, err, h);
        free(h);
    }
    return NULL;
}

/* ---- main thread: ppoll on the control socket -------------------------------------- */
static void on_usr1(int sig)
{
    (void)sig;
    usr1_count++;
}

static void command(char *line)
{
    char *tok[8];
    int n = 0;
    for (char *save, *t = strtok_r(line, " ", &save); t && n < 8; t = strtok_r(NULL, " ", &save))
        tok[n++] = t;
    if (n < 2)
        return;
    const char *c = tok[0], *id = tok[1];
    if (!strcmp(c, "PING")) {
        send_line("OK %s", id);
    } else if (!strcmp(c, "SIGCOUNT")) {
        send_line("OK %s %d", id, (int)usr1_count);
    } else if (!strcmp(c, "COMM") && n >= 4) {
        unsigned char name[16] = { 0 };
        size_t len = unhex(tok[3], name, 15);
        char path[64];
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", tok[2]);
        FILE *f = fopen(path, "w");
        int ok = f && fwrite(name, 1, len, f) == len;
        int err = errno;
        if (f && fclose(f) != 0)
            ok = 0;
        if (ok)
            send_line("OK %s", id);
        else
            send_line("ERR %s %d", id, err);
    } else if (!strcmp(c, "ACC")) {
        cmd_access(id, tok + 2, n - 2);
    } else if (!strcmp(c, "FWAKE")) {
        snprintf(futex_id, sizeof futex_id, "%s", id);
        atomic_fetch_add(&fword, 1);
        syscall(SYS_futex, &fword, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    } else if (!strcmp(c, "SLEEP") && n >= 3) {
        char buf[64];
        int len = snprintf(buf, sizeof buf, "%s %s\n", id, tok[2]);
        if (write(sleep_pipe[1], buf, (size_t)len) != len)
            die("write(sleep pipe)");
    } else if (!strcmp(c, "SEND") && n >= 3) {
        unsigned char data[2048];
        size_t len = unhex(tok[2], data, sizeof data);
        char buf[4096];
        int hl = snprintf(buf, sizeof buf, "%s ", id);
        memcpy(buf + hl, data, len);
        if (send(recv_sock[1], buf, (size_t)hl + len, 0) < 0)
            die("send(recv socket)");
    } else {
        send_line("ERR %s %d", id, ENOSYS);
    }
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: target CTL_FD RAM_BYTES VCPUS NAME\n");
        return 2;
    }
    ctl = atoi(argv[1]);
    ram_bytes = strtoull(argv[2], NULL, 0);
    nvcpus = atoi(argv[3]);
    if (nvcpus < 1 || nvcpus > MAX_VCPUS || ram_bytes % PAGE || !ram_bytes) {
        fprintf(stderr, "target: bad arguments\n");
        return 2;
    }
    int ram_fd = memfd_create(argv[4], MFD_CLOEXEC);
    if (ram_fd < 0 || ftruncate(ram_fd, (off_t)ram_bytes) < 0)
        die("memfd");
    ram = mmap(NULL, ram_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, ram_fd, 0);
    anon = mmap(NULL, ANON_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ram == MAP_FAILED || anon == MAP_FAILED)
        die("mmap");
    fill(ram, ram_bytes);
    fill(anon, ANON_BYTES);

    struct sigaction sa = { 0 };
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGBUS, &sa, NULL);
    struct sigaction su = { 0 };
    su.sa_handler = on_usr1; /* no SA_RESTART: ppoll returns EINTR */
    sigaction(SIGUSR1, &su, NULL);

    /* Every thread but this one blocks SIGUSR1, so kill(pid, SIGUSR1) lands here. */
    sigset_t usr1, old;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &usr1, &old);
    if (pipe(sleep_pipe) < 0 || socketpair(AF_UNIX, SOCK_DGRAM, 0, recv_sock) < 0)
        die("pipe");
    for (int i = 0; i < nvcpus; i++) {
        struct vcpu *v = &vcpus[i];
        pthread_mutex_init(&v->lock, NULL);
        pthread_cond_init(&v->cond, NULL);
        if (pipe(v->pipe) < 0)
            die("pipe");
        pthread_mutex_lock(&v->lock);
        if (pthread_create(&v->th, NULL, vcpu_main, v))
            die("pthread_create");
        while (!v->tid)
            pthread_cond_wait(&v->cond, &v->lock);
        pthread_mutex_unlock(&v->lock);
    }
    pthread_t th;
    if (pthread_create(&th, NULL, futex_main, NULL) || pthread_create(&th, NULL, sleep_main, NULL)
        || pthread_create(&th, NULL, recv_main, NULL))
        die("pthread_create");
    pthread_mutex_lock(&start_lock);
    while (!futex_tid || !sleep_tid || !recv_tid)
        pthread_cond_wait(&start_cond, &start_lock);
    pthread_mutex_unlock(&start_lock);
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    char tids[MAX_VCPUS * 12] = { 0 };
    for (int i = 0; i < nvcpus; i++)
        snprintf(tids + strlen(tids), sizeof tids - strlen(tids), "%s%d", i ? "," : "",
                 (int)vcpus[i].tid);
    send_line("READY ram_addr=%p ram_fd=%d anon_addr=%p anon_bytes=%d vcpus=%s futex=%d "
              "sleep=%d recv=%d", (void *)ram, ram_fd, (void *)anon, ANON_BYTES, tids,
              (int)futex_tid, (int)sleep_tid, (int)recv_tid);

    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    if (!buf)
        die("malloc");
    struct pollfd pfd = { .fd = ctl, .events = POLLIN };
    for (;;) {
        int r = ppoll(&pfd, 1, NULL, &old);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            die("ppoll");
        }
        if (cap - len < 4096) {
            cap *= 2;
            if (!(buf = realloc(buf, cap)))
                die("realloc");
        }
        ssize_t got = read(ctl, buf + len, cap - len - 1);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return 0; /* the driver closed the socket */
        len += (size_t)got;
        char *start = buf, *nl;
        while ((nl = memchr(start, '\n', len - (size_t)(start - buf)))) {
            *nl = 0;
            command(start);
            start = nl + 1;
        }
        len -= (size_t)(start - buf);
        memmove(buf, start, len);
    }
}
