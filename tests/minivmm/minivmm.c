/* minivmm: the smallest VMM whose guest memory accesses come from KVM, for testing a
 * memory-tiering daemon beside a VMM (attach by ptrace, or a uffd handed over a socket).
 *
 *   minivmm [--ram-mib N] [--fill-dwords N]
 *           [--handoff SOCKET [--uffd-api FEATURES_HEX] [--register MODE_HEX] [--no-memfd]]
 *
 * Guest RAM is a memfd named "memory-backend-memfd" (as QEMU names it), mapped MAP_SHARED
 * once and given to KVM as memory slot 0 at guest-physical 0. One vCPU thread, named
 * "CPU 0/KVM", runs a 32-bit protected-mode payload (flat segments, no paging, so guest
 * physical = linear address). The main thread, comm "minivmm", waits in ppoll() on stdin for
 * commands; it is the thread a daemon injects syscalls into, so every syscall it waits in
 * restarts after a ptrace stop (EINTR is retried).
 *
 * Layout: RAM [0, RESERVED) holds the payload (at 0x1000) and its stack (below RESERVED); the
 * VMM writes all of it before the vCPU starts, so it is populated before anyone can register
 * the RAM with a uffd. [RESERVED, ram) is the data area, which only the guest touches.
 *
 * Commands on stdin, one per line; PAGE is a page number in RAM (guest-physical / 4096), and
 * FIRST/COUNT default to the whole data area:
 *   write VERSION [FIRST COUNT]   stamp each page: u32 page, u32 VERSION, then FILL_DWORDS
 *                                 u32 fill (--fill-dwords, default 1022: the whole page)
 *   verify VERSION [FIRST COUNT]  count the pages that do not hold that exact stamp
 *   hot FIRST COUNT ROUNDS [read|write]  touch each page ROUNDS times (write: rewrites its
 *                                 version word with itself, content unchanged)
 *   quit                          (or EOF on stdin) halt the guest and exit 0
 * fill = (page * 0x9E3779B1) ^ ((VERSION + 1) * 0x85EBCA77), mod 2^32.
 *
 * Output lines on stdout, all starting "MINIVMM " (ns = wall time of the command in the
 * guest, uffd faults included):
 *   MINIVMM HANDOFF sent=1 uffd=FD memfd=FD|-1 api=0|1 features=0x.. supported=0x..
 *                   registered=0x..   (features: enabled by our UFFDIO_API; 0 if none)
 *   MINIVMM HANDOFF ack=line|eof
 *   MINIVMM READY pid=P ram=BYTES hva=0x.. memfd=FD data_first=PAGE data_pages=N page_size=4096
 *                 fill_dwords=N
 *   MINIVMM WRITE round=R version=V first=F pages=N ns=T
 *   MINIVMM VERIFY round=R version=V first=F pages=N bad=B first_bad=PAGE|-1 ns=T
 *   MINIVMM HOT round=R first=F pages=N rounds=K write=0|1 touches=M bad=B ns=T
 *   MINIVMM ERROR reason text            a command was refused (nothing ran)
 *   MINIVMM FATAL reason text            the VMM gives up (exit 1)
 *   MINIVMM QUIT rounds=R                the last line of a clean exit
 *
 * Handoff (--handoff SOCKET): the VMM creates a uffd itself with userfaultfd(O_CLOEXEC |
 * O_NONBLOCK), never UFFD_USER_MODE_ONLY (KVM's accesses are kernel-mode faults, which such
 * a uffd answers with EFAULT). Optionally it does UFFDIO_API (--uffd-api FEATURES) and
 * UFFDIO_REGISTER of all RAM (--register MODE) itself, as Firecracker does. It connects to
 * SOCKET and sends Firecracker's message: a compact JSON array with one object per region,
 *   [{"base_host_virt_addr":N,"size":N,"offset":0,"page_size":4096,"page_size_kib":4096}]
 * (page_size_kib is Firecracker's deprecated field and holds bytes), with the uffd and, unless
 * --no-memfd, the memfd (e2b's extension) as SCM_RIGHTS fds, in that order, in one control
 * message. It keeps its own copy of the uffd, so if the receiver dies the guest's faults
 * block instead of reading zeros.
 *
 * Decision: the vCPU does not start until the receiver acknowledges, by sending a line
 * (anything up to '\n') or by closing its end. A receiver handed a fresh uffd must do
 * UFFDIO_API and UFFDIO_REGISTER before the guest runs, or the guest's first accesses would
 * populate the RAM unseen; acknowledging after that makes the ordering explicit. The VMM
 * closes the socket after the ack. Until then it reads nothing else (not even stdin): a
 * receiver that never answers leaves it waiting until it is killed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/kvm.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* userfaultfd ABI, defined here (the installed headers may be older than the kernel). */
#define UFFD_API_VERSION 0xAAULL
struct mv_uffdio_api { uint64_t api, features, ioctls; };
struct mv_uffdio_register { uint64_t start, len, mode, ioctls; };
#define MV_UFFDIO_API _IOWR(0xAA, 0x3F, struct mv_uffdio_api)
#define MV_UFFDIO_REGISTER _IOWR(0xAA, 0x00, struct mv_uffdio_register)
#define MV_USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#ifndef SYS_userfaultfd
#define SYS_userfaultfd 323
#endif

#define PAGE 4096u
#define RESERVED 0x10000u   /* payload + stack: 16 pages */
#define CODE_GPA 0x1000u

/* Ports between payload and VMM. */
#define PORT_CMD 0x10   /* in: next command (blocks until there is one) */
#define PORT_ARG 0x11   /* in: next argument of the current command */
#define PORT_RES 0x12   /* out: next result value */
#define PORT_DONE 0x13  /* out: command finished (value: its code) */
#define CMD_WRITE 1
#define CMD_VERIFY 2
#define CMD_HOT 3
#define CMD_QUIT 4
#define MAX_ARGS 4
#define MAX_RES 4

/* The payload, assembled by gcc with the rest of this file and copied to CODE_GPA. Only
 * relative jumps and calls, so it runs wherever it is copied. Register use in the loops:
 * esi page, ebx pages left, ebp version (or write flag), edi address, eax/ecx/edx scratch. */
#define STR_(x) #x
#define STR(x) STR_(x)
__asm__(
    ".pushsection .rodata.minivmm_payload,\"a\"\n"
    ".globl mv_payload_start\n.globl mv_payload_end\n"
    "mv_payload_start:\n"
    ".code32\n"
    "  cld\n"
    "main_loop:\n"
    "  inl $" STR(PORT_CMD) ", %eax\n"
    "  cmpl $" STR(CMD_WRITE) ", %eax\n  je do_write\n"
    "  cmpl $" STR(CMD_VERIFY) ", %eax\n  je do_verify\n"
    "  cmpl $" STR(CMD_HOT) ", %eax\n  je do_hot\n"
    "  cmpl $" STR(CMD_QUIT) ", %eax\n  jne main_loop\n"
    "do_quit:\n  hlt\n  jmp do_quit\n"
    /* eax = fill(esi, ebp); clobbers edx */
    "fill:\n"
    "  imull $0x9E3779B1, %esi, %eax\n"
    "  leal 1(%ebp), %edx\n"
    "  imull $0x85EBCA77, %edx, %edx\n"
    "  xorl %edx, %eax\n"
    "  ret\n"
    "do_write:\n"
    "  inl $" STR(PORT_ARG) ", %eax\n  movl %eax, %esi\n"
    "  inl $" STR(PORT_ARG) ", %eax\n  movl %eax, %ebx\n"
    "  inl $" STR(PORT_ARG) ", %eax\n  movl %eax, %ebp\n"
    "  inl $" STR(PORT_ARG) ", %eax\n  pushl %eax\n"   /* (%esp): fill dwords */
    "  testl %ebx, %ebx\n  jz write_done\n"
    "write_page:\n"
    "  movl %esi, %edi\n  shll $12, %edi\n"
    "  movl %esi, %eax\n  stosl\n"
    "  movl %ebp, %eax\n  stosl\n"
    "  call fill\n"
    "  movl (%esp), %ecx\n  rep stosl\n"
    "  incl %esi\n  decl %ebx\n  jnz write_page\n"
    "write_done:\n"
    "  addl $4, %esp\n"
    "  movl $" STR(CMD_WRITE) ", %eax\n  outl %eax, $" STR(PORT_DONE) "\n"
    "  jmp main_loop\n"
    "do_verify:\n"
    "  inl $" STR(PORT_ARG) ", %eax\n  movl %eax, %esi\n"
    "  inl $" STR(PORT_ARG) ", %eax\n  movl %eax, %ebx\n"
    "  inl $" STR(PORT_ARG) ", %eax\n  movl %eax, %ebp\n"
    "  inl $" STR(PORT_ARG) ", %eax\n  pushl %eax\n"   /* 8(%esp): fill dwords */
    "  pushl $0\n"            /* 4(%esp): bad pages */
    "  pushl $-1\n"           /* (%esp): first bad page */
    "  testl %ebx, %ebx\n  jz verify_done\n"
    "verify_page:\n"
    "  movl %esi, %edi\n  shll $12, %edi\n"
    "  cmpl %esi, (%edi)\n  jne verify_bad\n"
    "  cmpl %ebp, 4(%edi)\n  jne verify_bad\n"
    "  call fill\n"
    "  addl $8, %edi\n  movl 8(%esp), %ecx\n"
    "  testl %ecx, %ecx\n  jz verify_next\n"
    "  repe scasl\n  jne verify_bad\n"
    "verify_next:\n"
    "  incl %esi\n  decl %ebx\n  jnz verify_page\n"
    "  jmp verify_done\n"
    "verify_bad:\n"
    "  incl 4(%esp)\n"
    "  cmpl $-1, (%esp)\n  jne verify_next\n"
    "  movl %esi, (%esp)\n  jmp verify_next\n"
    "verify_done:\n"
    "  popl %eax\n  outl %eax, $" STR(PORT_RES) "\n"
    "  popl %eax\n  outl %eax, $" STR(PORT_RES) "\n"
    "  addl $4, %esp\n"
    "  movl $" STR(CMD_VERIFY) ", %eax\n  outl %eax, $" STR(PORT_DONE) "\n"
    "  jmp main_loop\n"
    "do_hot:\n"
    "  inl $" STR(PORT_ARG) ", %eax\n  pushl %eax\n"   /* 4(%esp): first page */
    "  inl $" STR(PORT_ARG) ", %eax\n  pushl %eax\n"   /* (%esp): pages */
    "  inl $" STR(PORT_ARG) ", %eax\n  movl %eax, %edx\n"  /* rounds */
    "  inl $" STR(PORT_ARG) ", %eax\n  movl %eax, %ebp\n"  /* write flag */
    "  xorl %ecx, %ecx\n"     /* bad touches */
    "  testl %edx, %edx\n  jz hot_done\n"
    "  cmpl $0, (%esp)\n  je hot_done\n"
    "hot_round:\n"
    "  movl 4(%esp), %esi\n  movl (%esp), %ebx\n"
    "hot_page:\n"
    "  movl %esi, %edi\n  shll $12, %edi\n"
    "  cmpl %esi, (%edi)\n  je 1f\n  incl %ecx\n1:\n"
    "  testl %ebp, %ebp\n  jz 2f\n  movl 4(%edi), %eax\n  movl %eax, 4(%edi)\n2:\n"
    "  incl %esi\n  decl %ebx\n  jnz hot_page\n"
    "  decl %edx\n  jnz hot_round\n"
    "hot_done:\n"
    "  addl $8, %esp\n"
    "  movl %ecx, %eax\n  outl %eax, $" STR(PORT_RES) "\n"
    "  movl $" STR(CMD_HOT) ", %eax\n  outl %eax, $" STR(PORT_DONE) "\n"
    "  jmp main_loop\n"
    ".code64\n"
    "mv_payload_end:\n"
    ".popsection\n");
extern const unsigned char mv_payload_start[], mv_payload_end[];

struct cmd {
    uint32_t code;
    uint32_t args[MAX_ARGS];
};

static struct {
    size_t ram;
    uint8_t *mem;
    int memfd, kvm, vm, vcpu, uffd;
    struct kvm_run *run;
    int cmd_pipe[2];          /* main thread -> vCPU thread, struct cmd records */
    uint32_t data_first, data_pages;
    uint32_t fill_dwords;     /* dwords of fill after the 2-dword header, 0..1022 */
    uint64_t rounds;
} vm = { .fill_dwords = PAGE / 4 - 2, .memfd = -1, .kvm = -1, .vm = -1, .vcpu = -1, .uffd = -1 };

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    va_list ap;
    flockfile(stdout);
    fputs("MINIVMM ", stdout);
    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
    funlockfile(stdout);
}

static void fatal(const char *what) __attribute__((noreturn));
static void fatal(const char *what)
{
    say("FATAL %s: %s", what, errno ? strerror(errno) : "failed");
    exit(1);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- setup ------------------------------------------------------------------------- */

static void setup_memory(void)
{
    /* First fd after stdio, so it is fd 3 as QEMU's is. */
    vm.memfd = memfd_create("memory-backend-memfd", MFD_CLOEXEC);
    if (vm.memfd < 0)
        fatal("memfd_create");
    if (ftruncate(vm.memfd, (off_t)vm.ram) < 0)
        fatal("ftruncate(memfd)");
    vm.mem = mmap(NULL, vm.ram, PROT_READ | PROT_WRITE, MAP_SHARED, vm.memfd, 0);
    if (vm.mem == MAP_FAILED)
        fatal("mmap(memfd)");
    /* Populate the whole reserved area (zeros), then the payload. */
    memset(vm.mem, 0, RESERVED);
    memcpy(vm.mem + CODE_GPA, mv_payload_start, (size_t)(mv_payload_end - mv_payload_start));
    vm.data_first = RESERVED / PAGE;
    vm.data_pages = (uint32_t)(vm.ram / PAGE) - vm.data_first;
}

static void setup_kvm(void)
{
    vm.kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (vm.kvm < 0)
        fatal("open /dev/kvm");
    if (ioctl(vm.kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
        fatal("KVM_GET_API_VERSION is not 12");
    vm.vm = ioctl(vm.kvm, KVM_CREATE_VM, 0);
    if (vm.vm < 0)
        fatal("KVM_CREATE_VM");
    /* VMX wants a TSS page for real mode; unused here, and refused harmlessly elsewhere. */
    (void)ioctl(vm.vm, KVM_SET_TSS_ADDR, 0xfffbd000ul);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = vm.ram,
        .userspace_addr = (uint64_t)(uintptr_t)vm.mem,
    };
    if (ioctl(vm.vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        fatal("KVM_SET_USER_MEMORY_REGION");
    vm.vcpu = ioctl(vm.vm, KVM_CREATE_VCPU, 0);
    if (vm.vcpu < 0)
        fatal("KVM_CREATE_VCPU");
    int size = ioctl(vm.kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (size < (int)sizeof(struct kvm_run))
        fatal("KVM_GET_VCPU_MMAP_SIZE");
    vm.run = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, vm.vcpu, 0);
    if (vm.run == MAP_FAILED)
        fatal("mmap(vcpu)");

    struct kvm_sregs sregs;
    if (ioctl(vm.vcpu, KVM_GET_SREGS, &sregs) < 0)
        fatal("KVM_GET_SREGS");
    struct kvm_segment seg = {
        .base = 0, .limit = 0xffffffff, .selector = 0x08, .type = 11, .present = 1,
        .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1,
    };
    sregs.cs = seg;
    seg.type = 3;
    seg.selector = 0x10;
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = seg;
    sregs.cr0 = 0x11;         /* PE | ET: protected mode, no paging, caches enabled */
    sregs.cr4 = 0;
    sregs.efer = 0;
    if (ioctl(vm.vcpu, KVM_SET_SREGS, &sregs) < 0)
        fatal("KVM_SET_SREGS");
    struct kvm_regs regs = { .rip = CODE_GPA, .rsp = RESERVED, .rflags = 0x2 };
    if (ioctl(vm.vcpu, KVM_SET_REGS, &regs) < 0)
        fatal("KVM_SET_REGS");
}

/* ---- handoff ----------------------------------------------------------------------- */

static int open_uffd(void)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0)
        return fd;
    /* Unprivileged with vm.unprivileged_userfaultfd=0: /dev/userfaultfd may still work. */
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        fatal("userfaultfd and /dev/userfaultfd");
    fd = ioctl(dev, MV_USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    close(dev);
    if (fd < 0)
        fatal("USERFAULTFD_IOC_NEW");
    return fd;
}

static void handoff(const char *path, int api, uint64_t features, int reg, uint64_t mode,
                    int send_memfd)
{
    uint64_t supported = 0;
    vm.uffd = open_uffd();
    if (api) {
        struct mv_uffdio_api a = { .api = UFFD_API_VERSION, .features = features };
        if (ioctl(vm.uffd, MV_UFFDIO_API, &a) < 0)
            fatal("UFFDIO_API");
        supported = a.features;
    }
    if (reg) {
        struct mv_uffdio_register r = {
            .start = (uint64_t)(uintptr_t)vm.mem, .len = vm.ram, .mode = mode };
        if (ioctl(vm.uffd, MV_UFFDIO_REGISTER, &r) < 0)
            fatal("UFFDIO_REGISTER");
    }
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        fatal("socket");
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof(sa.sun_path)) {
        errno = ENAMETOOLONG;
        fatal("handoff socket path");
    }
    strcpy(sa.sun_path, path);
    while (connect(s, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        if (errno != EINTR)
            fatal("connect(handoff socket)");

    char json[256];
    int n = snprintf(json, sizeof(json),
                     "[{\"base_host_virt_addr\":%" PRIu64 ",\"size\":%zu,\"offset\":0,"
                     "\"page_size\":%u,\"page_size_kib\":%u}]",
                     (uint64_t)(uintptr_t)vm.mem, vm.ram, PAGE, PAGE);
    int fds[2] = { vm.uffd, vm.memfd };
    int nfds = send_memfd ? 2 : 1;
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(fds))]; } ctl;
    memset(&ctl, 0, sizeof(ctl));
    struct iovec iov = { .iov_base = json, .iov_len = (size_t)n };
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
        .msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds),
    };
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    while (sendmsg(s, &msg, MSG_NOSIGNAL) < 0)
        if (errno != EINTR)
            fatal("sendmsg(handoff)");
    say("HANDOFF sent=1 uffd=%d memfd=%d api=%d features=0x%" PRIx64 " supported=0x%" PRIx64
        " registered=0x%" PRIx64, vm.uffd, send_memfd ? vm.memfd : -1, api, api ? features : 0,
        supported, reg ? mode : 0);

    /* Wait for the ack: a line, or EOF. */
    const char *how = "eof";
    for (;;) {
        char ch;
        ssize_t r = read(s, &ch, 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            fatal("read(handoff ack)");
        if (r == 0)
            break;
        if (ch == '\n') {
            how = "line";
            break;
        }
    }
    close(s);
    say("HANDOFF ack=%s", how);
}

/* ---- vCPU -------------------------------------------------------------------------- */

static int32_t as_signed(uint32_t v) { return (int32_t)v; }

static void report(const struct cmd *c, const uint32_t *res, uint64_t ns)
{
    uint64_t r = ++vm.rounds;
    switch (c->code) {
    case CMD_WRITE:
        say("WRITE round=%" PRIu64 " version=%u first=%u pages=%u ns=%" PRIu64,
            r, c->args[2], c->args[0], c->args[1], ns);
        break;
    case CMD_VERIFY:
        say("VERIFY round=%" PRIu64 " version=%u first=%u pages=%u bad=%u first_bad=%d"
            " ns=%" PRIu64, r, c->args[2], c->args[0], c->args[1], res[1], as_signed(res[0]),
            ns);
        break;
    case CMD_HOT:
        say("HOT round=%" PRIu64 " first=%u pages=%u rounds=%u write=%u touches=%" PRIu64
            " bad=%u ns=%" PRIu64, r, c->args[0], c->args[1], c->args[2], c->args[3] ? 1 : 0,
            (uint64_t)c->args[1] * c->args[2], res[0], ns);
        break;
    }
}

static void vcpu_fatal(const char *what, uint32_t reason)
{
    struct kvm_regs regs;
    memset(&regs, 0, sizeof(regs));
    (void)ioctl(vm.vcpu, KVM_GET_REGS, &regs);
    say("FATAL vcpu %s: exit_reason=%u rip=0x%llx rsp=0x%llx rax=0x%llx", what, reason,
        regs.rip, regs.rsp, regs.rax);
    exit(1);
}

static void *vcpu_main(void *unused)
{
    (void)unused;
    struct cmd cur = { 0 };
    uint32_t res[MAX_RES];
    unsigned argi = 0, resi = 0;
    uint64_t t0 = 0;
    for (;;) {
        if (ioctl(vm.vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            fatal("KVM_RUN");
        }
        struct kvm_run *run = vm.run;
        switch (run->exit_reason) {
        case KVM_EXIT_IO: {
            uint32_t *data = (uint32_t *)((char *)run + run->io.data_offset);
            if (run->io.size != 4 || run->io.count != 1)
                vcpu_fatal("unexpected I/O width", run->exit_reason);
            if (run->io.direction == KVM_EXIT_IO_IN && run->io.port == PORT_CMD) {
                size_t got = 0;
                while (got < sizeof(cur)) {
                    ssize_t r = read(vm.cmd_pipe[0], (char *)&cur + got, sizeof(cur) - got);
                    if (r < 0 && errno == EINTR)
                        continue;
                    if (r <= 0)
                        fatal("read(command pipe)");
                    got += (size_t)r;
                }
                argi = resi = 0;
                t0 = now_ns();
                *data = cur.code;
            } else if (run->io.direction == KVM_EXIT_IO_IN && run->io.port == PORT_ARG) {
                *data = argi < MAX_ARGS ? cur.args[argi++] : 0;
            } else if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == PORT_RES) {
                if (resi < MAX_RES)
                    res[resi++] = *data;
            } else if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == PORT_DONE) {
                report(&cur, res, now_ns() - t0);
            } else {
                vcpu_fatal("I/O on an unknown port", run->io.port);
            }
            break;
        }
        case KVM_EXIT_HLT:
            if (cur.code == CMD_QUIT)
                return NULL;
            vcpu_fatal("guest halted unexpectedly", run->exit_reason);
            break;
        case KVM_EXIT_SHUTDOWN:
            vcpu_fatal("guest shutdown (triple fault)", run->exit_reason);
            break;
        case KVM_EXIT_FAIL_ENTRY:
            vcpu_fatal("entry failed", (uint32_t)run->fail_entry.hardware_entry_failure_reason);
            break;
        case KVM_EXIT_INTERNAL_ERROR:
            vcpu_fatal("internal error", run->internal.suberror);
            break;
        default:
            vcpu_fatal("unexpected exit", run->exit_reason);
        }
    }
}

/* ---- commands (main thread) ----------------------------------------------------------- */

static int parse_u32(const char *s, uint32_t *out)
{
    char *end;
    if (!s)
        return -1;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end || end == s || v > UINT32_MAX || s[0] == '-')
        return -1;
    *out = (uint32_t)v;
    return 0;
}

static void send_cmd(const struct cmd *c)
{
    /* A pipe write of at most PIPE_BUF bytes is atomic. */
    while (write(vm.cmd_pipe[1], c, sizeof(*c)) < 0)
        if (errno != EINTR)
            fatal("write(command pipe)");
}

/* Returns 1 on quit. */
static int handle_line(char *line)
{
    char *argv[8];
    int argc = 0;
    for (char *tok = strtok(line, " \t\r"); tok && argc < 8; tok = strtok(NULL, " \t\r"))
        argv[argc++] = tok;
    if (argc == 0)
        return 0;
    struct cmd c = { 0 };
    uint32_t first = vm.data_first, count = vm.data_pages;
    if (!strcmp(argv[0], "quit") && argc == 1) {
        c.code = CMD_QUIT;
        send_cmd(&c);
        return 1;
    }
    if ((!strcmp(argv[0], "write") || !strcmp(argv[0], "verify")) && (argc == 2 || argc == 4)) {
        c.code = argv[0][0] == 'w' ? CMD_WRITE : CMD_VERIFY;
        if (parse_u32(argv[1], &c.args[2]) < 0) {
            say("ERROR bad version %s", argv[1]);
            return 0;
        }
        if (argc == 4 && (parse_u32(argv[2], &first) < 0 || parse_u32(argv[3], &count) < 0)) {
            say("ERROR bad page range %s %s", argv[2], argv[3]);
            return 0;
        }
    } else if (!strcmp(argv[0], "hot") && (argc == 4 || argc == 5)) {
        c.code = CMD_HOT;
        if (parse_u32(argv[1], &first) < 0 || parse_u32(argv[2], &count) < 0 ||
            parse_u32(argv[3], &c.args[2]) < 0) {
            say("ERROR bad hot arguments");
            return 0;
        }
        if (argc == 5 && strcmp(argv[4], "read") && strcmp(argv[4], "write")) {
            say("ERROR hot mode must be read or write, got %s", argv[4]);
            return 0;
        }
        c.args[3] = argc == 5 && !strcmp(argv[4], "write");
    } else {
        say("ERROR unknown command or wrong arguments: %s (argc %d)", argv[0], argc);
        return 0;
    }
    uint64_t end = (uint64_t)vm.data_first + vm.data_pages;
    if (first < vm.data_first || (uint64_t)first + count > end) {
        say("ERROR pages [%u, %" PRIu64 ") outside the data area [%u, %" PRIu64 ")",
            first, (uint64_t)first + count, vm.data_first, end);
        return 0;
    }
    c.args[0] = first;
    c.args[1] = count;
    if (c.code != CMD_HOT)
        c.args[3] = vm.fill_dwords;
    send_cmd(&c);
    return 0;
}

/* Reads stdin in ppoll() until quit or EOF. */
static void command_loop(void)
{
    char buf[4096];
    size_t len = 0;
    for (;;) {
        struct pollfd p = { .fd = 0, .events = POLLIN };
        int r = ppoll(&p, 1, NULL, NULL);
        if (r < 0 && errno == EINTR)
            continue;       /* also what a ptrace stop with injected syscalls may leave */
        if (r < 0)
            fatal("ppoll(stdin)");
        ssize_t n = read(0, buf + len, sizeof(buf) - 1 - len);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n <= 0) {     /* EOF or error: the driver is gone, do not outlive it */
            struct cmd c = { .code = CMD_QUIT };
            send_cmd(&c);
            return;
        }
        len += (size_t)n;
        char *start = buf, *nl;
        while ((nl = memchr(start, '\n', (size_t)(buf + len - start)))) {
            *nl = 0;
            if (handle_line(start))
                return;
            start = nl + 1;
        }
        len = (size_t)(buf + len - start);
        memmove(buf, start, len);
        if (len == sizeof(buf) - 1) {
            say("ERROR command line too long");
            len = 0;
        }
    }
}

static void usage(void) __attribute__((noreturn));
static void usage(void)
{
    fprintf(stderr, "usage: minivmm [--ram-mib N] [--fill-dwords N] [--handoff SOCKET "
                    "[--uffd-api HEX] [--register HEX] [--no-memfd]]\n");
    exit(2);
}

static uint64_t parse_hex(const char *s)
{
    char *end;
    if (!s)
        usage();
    errno = 0;
    unsigned long long v = strtoull(s, &end, 16);
    if (errno || *end || end == s)
        usage();
    return v;
}

int main(int argc, char **argv)
{
    unsigned long ram_mib = 64;
    const char *sock = NULL;
    int api = 0, reg = 0, send_memfd = 1;
    uint64_t features = 0, mode = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--ram-mib") && v) {
            char *end;
            ram_mib = strtoul(v, &end, 10);
            if (*end || ram_mib < 1 || ram_mib > 3072)
                usage();
            i++;
        } else if (!strcmp(a, "--fill-dwords") && v) {
            char *end;
            unsigned long f = strtoul(v, &end, 10);
            if (*end || end == v || f > PAGE / 4 - 2)
                usage();
            vm.fill_dwords = (uint32_t)f;
            i++;
        } else if (!strcmp(a, "--handoff") && v) {
            sock = v;
            i++;
        } else if (!strcmp(a, "--uffd-api")) {
            features = parse_hex(v);
            api = 1;
            i++;
        } else if (!strcmp(a, "--register")) {
            mode = parse_hex(v);
            reg = 1;
            i++;
        } else if (!strcmp(a, "--no-memfd")) {
            send_memfd = 0;
        } else {
            usage();
        }
    }
    if (!sock && (api || reg || !send_memfd))
        usage();
    if (reg && !api) {
        fprintf(stderr, "minivmm: --register needs --uffd-api (UFFDIO_API comes first)\n");
        exit(2);
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    prctl(PR_SET_NAME, "minivmm");
    vm.ram = (size_t)ram_mib << 20;

    setup_memory();
    setup_kvm();
    if (pipe2(vm.cmd_pipe, O_CLOEXEC) < 0)
        fatal("pipe2");
    if (sock)
        handoff(sock, api, features, reg, mode, send_memfd);

    pthread_t vcpu;
    if ((errno = pthread_create(&vcpu, NULL, vcpu_main, NULL)))
        fatal("pthread_create");
    pthread_setname_np(vcpu, "CPU 0/KVM");
    say("READY pid=%d ram=%zu hva=0x%" PRIxPTR " memfd=%d data_first=%u data_pages=%u "
        "page_size=%u fill_dwords=%u", getpid(), vm.ram, (uintptr_t)vm.mem, vm.memfd,
        vm.data_first, vm.data_pages, PAGE, vm.fill_dwords);

    command_loop();
    /* The vCPU finishes the commands queued before quit, then halts. A vCPU blocked for
     * good (a fault nobody serves) is not waited for. */
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += 60;
    int rc;
    while ((rc = pthread_timedjoin_np(vcpu, NULL, &deadline)) == EINTR)
        ;
    if (rc) {
        say("QUIT rounds=%" PRIu64 " forced=1", vm.rounds);
        _exit(3);
    }
    say("QUIT rounds=%" PRIu64, vm.rounds);
    return 0;
}
