/* minivmm_server: the C reference for serving minivmm's handed-off uffd (bench_minivmm.py).
 *
 *   minivmm_server SOCKET
 *
 * Listens on SOCKET, accepts one VMM, receives its Firecracker-style message (JSON regions,
 * the uffd and maybe the memfd as SCM_RIGHTS), does UFFDIO_API (no features) and registers
 * every region MISSING, acks with a line, then serves each MISSING fault with UFFDIO_COPY of
 * a zero page: poll() + read() of up to 64 messages, as the Python server does, without
 * Python. stdout: "LISTENING", "SERVING regions=N", and at EOF on stdin
 * "SERVED faults=N reads=N busy_ns=N" (busy: read to last copy done, per batch). */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define MAX_MSGS 64

struct s_api { uint64_t api, features, ioctls; };
struct s_range { uint64_t start, len; };
struct s_register { struct s_range range; uint64_t mode, ioctls; };
struct s_copy { uint64_t dst, src, len, mode; int64_t copy; };
struct s_msg {  /* struct uffd_msg, pagefault member only */
    uint8_t event, r1; uint16_t r2; uint32_t r3;
    uint64_t flags, address, tid;
};
#define S_UFFDIO_API _IOWR(0xAA, 0x3F, struct s_api)
#define S_UFFDIO_REGISTER _IOWR(0xAA, 0x00, struct s_register)
#define S_UFFDIO_WAKE _IOR(0xAA, 0x02, struct s_range)
#define S_UFFDIO_COPY _IOWR(0xAA, 0x03, struct s_copy)
#define EVENT_PAGEFAULT 0x12

static void die(const char *what)
{
    fprintf(stderr, "minivmm_server: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The next number after "key": in the JSON text, from *pos on. */
static int json_u64(const char **pos, const char *key, uint64_t *out)
{
    const char *p = strstr(*pos, key);
    if (!p)
        return -1;
    p = strchr(p + strlen(key), ':');
    if (!p)
        return -1;
    char *end;
    *out = strtoull(p + 1, &end, 10);
    *pos = end;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: minivmm_server SOCKET\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (ls < 0 || strlen(argv[1]) >= sizeof(sa.sun_path))
        die("socket");
    strcpy(sa.sun_path, argv[1]);
    if (bind(ls, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(ls, 1) < 0)
        die("bind/listen");
    printf("LISTENING\n");
    int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
    if (c < 0)
        die("accept");

    char text[4096];
    union { struct cmsghdr h; char buf[CMSG_SPACE(4 * sizeof(int))]; } ctl;
    struct iovec iov = { .iov_base = text, .iov_len = sizeof(text) - 1 };
    struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                        .msg_controllen = sizeof(ctl.buf) };
    ssize_t n = recvmsg(c, &m, MSG_CMSG_CLOEXEC);
    if (n <= 0)
        die("recvmsg");
    text[n] = 0;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    if (!cm || cm->cmsg_type != SCM_RIGHTS || cm->cmsg_len < CMSG_LEN(sizeof(int))) {
        errno = EPROTO;
        die("no fd in the handoff message");
    }
    int uffd;
    memcpy(&uffd, CMSG_DATA(cm), sizeof(int));

    struct s_api api = { .api = 0xAA };
    if (ioctl(uffd, S_UFFDIO_API, &api) < 0)
        die("UFFDIO_API");
    const char *pos = text;
    int regions = 0;
    uint64_t base, size;
    while (json_u64(&pos, "\"base_host_virt_addr\"", &base) == 0 &&
           json_u64(&pos, "\"size\"", &size) == 0) {
        struct s_register r = { .range = { base, size }, .mode = 1 /* MISSING */ };
        if (ioctl(uffd, S_UFFDIO_REGISTER, &r) < 0)
            die("UFFDIO_REGISTER");
        regions++;
    }
    if (write(c, "ok\n", 3) != 3)
        die("ack");
    close(c);
    printf("SERVING regions=%d\n", regions);

    static char zero[PAGE] __attribute__((aligned(4096)));
    struct s_msg msgs[MAX_MSGS];
    uint64_t faults = 0, reads = 0, busy = 0;
    for (;;) {
        struct pollfd p[2] = { { .fd = uffd, .events = POLLIN }, { .fd = 0, .events = POLLIN } };
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (p[1].revents)
            break;
        uint64_t t0 = now_ns();
        ssize_t got = read(uffd, msgs, sizeof(msgs));
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            die("read(uffd)");
        }
        reads++;
        for (size_t i = 0; i < (size_t)got / sizeof(msgs[0]); i++) {
            if (msgs[i].event != EVENT_PAGEFAULT)
                continue;
            uint64_t addr = msgs[i].address & ~(uint64_t)(PAGE - 1);
            struct s_copy cp = { .dst = addr, .src = (uint64_t)(uintptr_t)zero, .len = PAGE };
            if (ioctl(uffd, S_UFFDIO_COPY, &cp) < 0) {
                if (errno != EEXIST)
                    die("UFFDIO_COPY");
                struct s_range w = { addr, PAGE };
                if (ioctl(uffd, S_UFFDIO_WAKE, &w) < 0)
                    die("UFFDIO_WAKE");
            }
            faults++;
        }
        busy += now_ns() - t0;
    }
    printf("SERVED faults=%" PRIu64 " reads=%" PRIu64 " busy_ns=%" PRIu64 "\n", faults, reads,
           busy);
    return 0;
}
