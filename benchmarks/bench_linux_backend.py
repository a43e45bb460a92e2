"""Costs of the linux backend's cffi wrappers (prints figures; asserts nothing).

    .venv/bin/python -m benchmarks.bench_linux_backend [--gib N]

- UFFDIO_COPY of one 4 KiB page per call, from Python, vs a cheap ioctl (UFFDIO_WAKE
  with no waiter) that shows the Python+cffi round trip alone.
- PAGEMAP_SCAN per GiB through ``pagemap_scan`` (PAGE_IS_WRITTEN under WP_ASYNC, 20% of
  pages written at random; with and without PM_SCAN_WP_MATCHING; clean region).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vmm_tierd.kernel import uapi
from vmm_tierd.kernel.linux import LinuxKernel, ffi, lib

PS = 4096
MADV_POPULATE_WRITE = 23


def bench_copy(k: LinuxKernel, n: int = 50_000, batch: int = 1000) -> None:
    """Figures are the best batch of ``batch`` calls: the host is shared and noisy."""
    r = k.map_anon(n * PS)
    fd = k.uffd_open()
    k.uffd_api(fd, 0)
    k.uffd_register(fd, r.addr, r.length, uapi.UFFDIO_REGISTER_MODE_MISSING)
    page = b"\x5a" * PS

    def best(fn: Callable[[int], object]) -> float:
        out = 1e30
        for b in range(0, n - batch + 1, batch):
            t0 = time.perf_counter()
            for i in range(b, b + batch):
                fn(i)
            out = min(out, (time.perf_counter() - t0) / batch * 1e6)
        return out

    copy_us = best(lambda i: k.uffd_copy(fd, r.addr + i * PS, page))
    wake_us = best(lambda i: k.uffd_wake(fd, r.addr, PS))
    chunk = 256
    k.madvise(r.addr, r.length, uapi.MADV_DONTNEED)
    big = b"\x5a" * (chunk * PS)
    big_us = 1e30
    for i in range(0, n - chunk + 1, chunk):
        t0 = time.perf_counter()
        k.uffd_copy(fd, r.addr + i * PS, big)
        big_us = min(big_us, (time.perf_counter() - t0) / chunk * 1e6)
    k.uffd_close(fd)
    k.unmap(r)
    c_us = c_copy_us(n, batch)
    print(f"UFFDIO_COPY 1 page/call from Python: {copy_us:.2f} us/page")
    if c_us is not None:
        print(f"UFFDIO_COPY 1 page/call from C:      {c_us:.2f} us/page "
              f"(Python+cffi overhead {copy_us - c_us:.2f} us)")
    print(f"UFFDIO_WAKE (no waiter) from Python: {wake_us:.2f} us/call "
          f"(Python+cffi round trip + trivial ioctl)")
    print(f"UFFDIO_COPY {chunk} pages/call:       {big_us:.2f} us/page")


C_COPY = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
struct api { uint64_t api, features, ioctls; };
struct reg { uint64_t start, len, mode, ioctls; };
struct copy { uint64_t dst, src, len, mode; int64_t copy; };
int main(int argc, char **argv) {
    unsigned long IOC_API = strtoul(argv[1], 0, 0), IOC_REG = strtoul(argv[2], 0, 0);
    unsigned long IOC_COPY = strtoul(argv[3], 0, 0);
    long n = atol(argv[4]), batch = atol(argv[5]);
    int fd = syscall(SYS_userfaultfd, 0);
    struct api a = { 0xAA, 0, 0 };
    if (fd < 0 || ioctl(fd, IOC_API, &a)) return 1;
    char *m = mmap(0, n * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    struct reg r = { (uintptr_t)m, n * 4096, 1, 0 };
    if (ioctl(fd, IOC_REG, &r)) return 2;
    static char page[4096] = { 0x5a };
    double best = 1e30;
    for (long b = 0; b + batch <= n; b += batch) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (long i = b; i < b + batch; i++) {
            struct copy c = { (uintptr_t)m + i * 4096, (uintptr_t)page, 4096, 0, 0 };
            if (ioctl(fd, IOC_COPY, &c)) return 3;
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double us = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / batch / 1e3;
        if (us < best) best = us;
    }
    printf("%f\n", best);
    return 0;
}
"""


def c_copy_us(n: int, batch: int) -> float | None:
    cc = shutil.which("cc")
    if cc is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        Path(d, "c.c").write_text(C_COPY)
        subprocess.run([cc, "-O2", "-o", f"{d}/c", f"{d}/c.c"], check=True)
        out = subprocess.run([f"{d}/c", hex(uapi.UFFDIO_API), hex(uapi.UFFDIO_REGISTER),
                              hex(uapi.UFFDIO_COPY), str(n), str(batch)], check=True,
                             capture_output=True, text=True).stdout
    return float(out)


def bench_scan(k: LinuxKernel, gib: int, reps: int = 5) -> None:
    size = gib << 30
    r = k.map_anon(size)
    k.madvise(r.addr, size, uapi.MADV_NOHUGEPAGE)
    fd = k.uffd_open()
    k.uffd_api(fd, uapi.UFFD_FEATURE_WP_ASYNC | uapi.UFFD_FEATURE_WP_UNPOPULATED)
    k.uffd_register(fd, r.addr, size, uapi.UFFDIO_REGISTER_MODE_WP)
    k.madvise(r.addr, size, MADV_POPULATE_WRITE)
    t0 = time.perf_counter()
    k.uffd_writeprotect(fd, r.addr, size, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
    wp_ms = (time.perf_counter() - t0) * 1e3 / gib
    end = r.addr + size
    kw = {"category_mask": uapi.PAGE_IS_WRITTEN, "return_mask": uapi.PAGE_IS_WRITTEN}

    def timed(flags: int) -> tuple[float, int, int]:
        t0 = time.perf_counter()
        res = k.pagemap_scan(r.addr, end, flags=flags, **kw)
        return (time.perf_counter() - t0) * 1e3 / gib, len(res.regions), res.calls

    raw_vec = ffi.new("struct page_region[]", size // PS // 2 + 1)
    raw_arg = ffi.new("struct pm_scan_arg *")

    def raw(flags: int) -> float:
        """One bare ioctl with a vector big enough for any result: the kernel's cost."""
        raw_arg.size, raw_arg.flags, raw_arg.start, raw_arg.end = 96, flags, r.addr, end
        raw_arg.vec, raw_arg.vec_len = int(ffi.cast("uintptr_t", raw_vec)), len(raw_vec)
        raw_arg.category_mask = raw_arg.return_mask = uapi.PAGE_IS_WRITTEN
        fd_pm = os.open("/proc/self/pagemap", os.O_RDONLY)
        t0 = time.perf_counter()
        ret = lib.vt_ioctl(fd_pm, uapi.PAGEMAP_SCAN, raw_arg)
        ms = (time.perf_counter() - t0) * 1e3 / gib
        os.close(fd_pm)
        assert ret >= 0
        return ms

    clean = min(timed(0)[0] for _ in range(reps))
    rng = np.random.default_rng(1)
    plain: list[float] = []
    matching: list[float] = []
    raw_plain: list[float] = []
    info = (0, 0)
    for _ in range(reps):
        pages = np.flatnonzero(rng.random(size // PS) < 0.2)
        for p in pages.tolist():  # the kernel writes (async WP resolves each in-kernel)
            k.madvise(r.addr + p * PS, PS, MADV_POPULATE_WRITE)
        ms, nreg, calls = timed(0)
        plain.append(ms)
        raw_plain.append(raw(0))
        ms, nreg, calls = timed(uapi.PM_SCAN_WP_MATCHING)
        matching.append(ms)
        info = (nreg, calls)
    k.uffd_close(fd)
    k.unmap(r)
    print(f"UFFDIO_WRITEPROTECT: {wp_ms:.1f} ms/GiB")
    print(f"PAGEMAP_SCAN clean region:          {clean:.2f} ms/GiB")
    print(f"PAGEMAP_SCAN 20% written:           {min(plain):.2f} ms/GiB "
          f"(one bare ioctl: {min(raw_plain):.2f} ms/GiB)")
    print(f"PAGEMAP_SCAN 20% written + WP_MATCH: {min(matching):.2f} ms/GiB "
          f"({info[0]} regions, {info[1]} ioctl calls)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=int, default=1)
    args = ap.parse_args()
    k = LinuxKernel()
    bench_copy(k)
    bench_scan(k, args.gib)
    k.close()


if __name__ == "__main__":
    main()
