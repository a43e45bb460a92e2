"""Page ioctls of the fake kernel: COPY, ZEROPAGE, CONTINUE, POISON, MOVE, WRITEPROTECT,
RWPROTECT (7.3), DEACTIVATE (RFC). Semantics follow mm/userfaultfd.c.

Kernel quirks kept on purpose:
- every page op fails with EAGAIN while a non-pagefault event is unread (mmap_changing);
- a partial fill/move reports the bytes done and fails with EAGAIN; the op's own error
  (EEXIST, ENOENT, ...) is only seen when nothing was done;
- COPY/ZEROPAGE/CONTINUE overwrite PTE markers (uffd-wp, poison): pte_none_mostly();
  POISON and MOVE need a truly none destination PTE.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import numpy as np

from . import uapi
from .api import Dialect, KernelError
from .fake_state import (
    F_POISON,
    F_PRESENT,
    F_PROTNONE,
    F_PT,
    F_RWP,
    F_WP,
    F_ZERO,
    MODE_MINOR,
    MODE_RWP,
    MODE_WP,
    PAGE,
    Mapping,
    Seg,
    Uffd,
    check_range,
    clear_bits,
    copy_bit,
    spans,
)
from .fake_uffd import UffdMixin

MARKERS = F_WP | F_POISON


class OpsMixin(UffdMixin):
    def _dst(self, op: str, u: Uffd, dst: int, length: int) -> tuple[Mapping, int, int, Seg]:
        """find_dst_vma(): [dst, dst+len) inside one registered VMA, else ENOENT."""
        m = u.mm.find(dst)
        if m is None or dst + length > m.end:
            raise KernelError(op, errno.ENOENT, 0, f"0x{dst:x}+{length} not in one mapping")
        lo = (dst - m.addr) // PAGE
        hi = lo + length // PAGE
        s = m.seg_at(lo)
        if s.hi < hi or s.ctx is None:
            raise KernelError(op, errno.ENOENT, 0, f"0x{dst:x}+{length} not in one uffd VMA")
        return m, lo, hi, s

    def _fill(self, op: str, fd: int, dst: int, length: int, mode: int, allowed: int,
              dontwake: int, page_op: Callable[[Mapping, Seg, int, int], int],
              wp_mode: int = 0) -> int:
        with self.lock:
            self.enter(op)
            u = self.ctx(op, fd)
            if u.mmap_changing:
                raise KernelError(op, errno.EAGAIN, 0, "event pending (mmap_changing)")
            check_range(op, dst, length)
            if mode & ~allowed:
                raise KernelError(op, errno.EINVAL, 0, f"mode 0x{mode:x}")
            self.mm_gone(op, u)
            m, lo, hi, s = self._dst(op, u, dst, length)
            if mode & wp_mode and not s.mode & MODE_WP:
                raise KernelError(op, errno.EINVAL, 0, "MODE_WP on a range not registered WP")
            done = 0
            err = 0
            for pg in range(lo, hi):
                err = page_op(m, s, pg, pg - lo)
                if err:
                    break
                done += PAGE
            if done == 0:
                raise KernelError(op, err)
            if not mode & dontwake:
                self.wake_range(u, dst, done)
            if done != length:
                raise KernelError(op, errno.EAGAIN, done, f"stopped: {errno.errorcode[err]}")
            return done

    def _install(self, m: Mapping, pg: int, new: int) -> None:
        m.flags[pg] = (int(m.flags[pg]) & F_PT) | new
        m.set_pt(pg, pg + 1)

    # -- COPY / ZEROPAGE
    def uffd_copy(self, fd: int, dst: int, src: bytes | bytearray | memoryview,
                  mode: int = 0) -> int:
        data = bytes(src)
        wp = F_WP if mode & uapi.UFFDIO_COPY_MODE_WP else 0

        def one(m: Mapping, s: Seg, pg: int, i: int) -> int:
            if m.flags[pg] & F_PRESENT or m.cached(pg):
                return errno.EEXIST
            chunk = data[i * PAGE:(i + 1) * PAGE]
            if m.file is not None:
                m.file.cached[m.fpgoff + pg] = True
            m.set_content(pg, chunk if any(chunk) else None)
            self._install(m, pg, F_PRESENT | wp)
            return 0

        if len(data) == 0 or len(data) % PAGE:
            with self.lock:
                self.enter("UFFDIO_COPY")
            raise KernelError("UFFDIO_COPY", errno.EINVAL, 0, f"src length {len(data)}")
        return self._fill("UFFDIO_COPY", fd, dst, len(data), mode,
                          uapi.UFFDIO_COPY_MODE_DONTWAKE | uapi.UFFDIO_COPY_MODE_WP,
                          uapi.UFFDIO_COPY_MODE_DONTWAKE, one, uapi.UFFDIO_COPY_MODE_WP)

    def uffd_zeropage(self, fd: int, start: int, length: int, mode: int = 0) -> int:
        def one(m: Mapping, s: Seg, pg: int, i: int) -> int:
            if m.flags[pg] & F_PRESENT or m.cached(pg):
                return errno.EEXIST
            if m.file is not None:  # shmem: a zeroed page-cache page, not the zero pfn
                m.file.cached[m.fpgoff + pg] = True
                m.set_content(pg, None)
                self._install(m, pg, F_PRESENT)
            else:
                m.set_content(pg, None)
                self._install(m, pg, F_PRESENT | F_ZERO)
            return 0

        d = uapi.UFFDIO_ZEROPAGE_MODE_DONTWAKE
        return self._fill("UFFDIO_ZEROPAGE", fd, start, length, mode, d, d, one)

    # -- CONTINUE / POISON
    def uffd_continue(self, fd: int, start: int, length: int, mode: int = 0) -> int:
        op = "UFFDIO_CONTINUE"
        wp = F_WP if mode & uapi.UFFDIO_CONTINUE_MODE_WP else 0

        def one(m: Mapping, s: Seg, pg: int, i: int) -> int:
            f = int(m.flags[pg])
            if m.anon:
                if self.dialect is not Dialect.RFC:
                    return errno.EINVAL
                # RFC: restore the permissions of a protnone (deactivated) PTE
                if not (f & F_PRESENT and f & F_PROTNONE):
                    return errno.EFAULT
                m.flags[pg] = (f & ~F_PROTNONE) | wp
                return 0
            if not m.cached(pg):
                return errno.EFAULT  # shmem_get_folio(SGP_NOALLOC) found no page
            if f & F_PRESENT:
                return errno.EEXIST
            self._install(m, pg, F_PRESENT | wp)
            return 0

        with self.lock:
            u0 = self.uffds.get(fd)
            m0 = (u0.mm if u0 is not None else self.mm).find(start)
            if (m0 is not None and m0.anon and self.dialect is not Dialect.RFC
                    and start % PAGE == 0 and length > 0 and length % PAGE == 0):
                self.enter(op)
                u = self.ctx(op, fd)
                if u.mmap_changing:
                    raise KernelError(op, errno.EAGAIN)
                self._dst(op, u, start, length)
                raise KernelError(op, errno.EINVAL, 0, "CONTINUE on anonymous memory")
            return self._fill(op, fd, start, length, mode,
                              uapi.UFFDIO_CONTINUE_MODE_DONTWAKE | uapi.UFFDIO_CONTINUE_MODE_WP,
                              uapi.UFFDIO_CONTINUE_MODE_DONTWAKE, one,
                              uapi.UFFDIO_CONTINUE_MODE_WP)

    def uffd_poison(self, fd: int, start: int, length: int, mode: int = 0) -> int:
        def one(m: Mapping, s: Seg, pg: int, i: int) -> int:
            if int(m.flags[pg]) & ~F_PT:
                return errno.EEXIST  # refuses to overwrite any PTE, even a marker
            self._install(m, pg, F_POISON)
            return 0

        d = uapi.UFFDIO_POISON_MODE_DONTWAKE
        return self._fill("UFFDIO_POISON", fd, start, length, mode, d, d, one)

    # -- MOVE
    def uffd_move(self, fd: int, dst: int, src: int, length: int, mode: int = 0) -> int:
        op = "UFFDIO_MOVE"
        with self.lock:
            self.enter(op)
            u = self.ctx(op, fd)
            if u.mmap_changing:
                raise KernelError(op, errno.EAGAIN, 0, "event pending (mmap_changing)")
            if u.mm is not self.mm:
                # userfaultfd_move(): "Do not allow cross-mm moves", before the ranges
                raise KernelError(op, errno.EINVAL, 0, "the uffd's context is another mm")
            allow = uapi.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES | uapi.UFFDIO_MOVE_MODE_DONTWAKE
            if mode & ~allow:
                raise KernelError(op, errno.EINVAL, 0, f"mode 0x{mode:x}")
            check_range(op, dst, length)
            check_range(op, src, length)
            dm, sm = u.mm.find(dst), u.mm.find(src)
            if dm is None:
                raise KernelError(op, errno.ENOENT, 0, f"dst 0x{dst:x} not mapped")
            if sm is None:
                raise KernelError(op, errno.ENOENT, 0, f"src 0x{src:x} not mapped")
            slo, dlo = (src - sm.addr) // PAGE, (dst - dm.addr) // PAGE
            n = length // PAGE
            ss, ds = sm.seg_at(slo), dm.seg_at(dlo)
            if not sm.anon or src + length > sm.end or ss.hi < slo + n:
                raise KernelError(op, errno.EINVAL, 0, "src shared or not in one VMA")
            if not dm.anon or dst + length > dm.end or ds.hi < dlo + n:
                raise KernelError(op, errno.EINVAL, 0, "dst shared or not in one VMA")
            if ds.ctx is not u:
                raise KernelError(op, errno.EINVAL, 0, "dst not registered with this uffd")
            done = 0
            err = 0
            # 7.3: a page moved into an RWP VMA arrives RWP-protected ("re-arm RWP on
            # the moved PTE"), so the next access there re-faults RWP.
            rearm = F_RWP if self.dialect is Dialect.RWP and ds.mode & MODE_RWP else 0
            for i in range(n):
                err = self._move_one(dm, dlo + i, sm, slo + i, mode, rearm)
                if err:
                    break
                done += PAGE
            if done == 0:
                raise KernelError(op, err)
            if not mode & uapi.UFFDIO_MOVE_MODE_DONTWAKE:
                self.wake_range(u, dst, done)
            if done != length:
                raise KernelError(op, errno.EAGAIN, done, f"stopped: {errno.errorcode[err]}")
            return done

    def _move_one(self, dm: Mapping, dpg: int, sm: Mapping, spg: int, mode: int,
                  rearm: int) -> int:
        sf, df = int(sm.flags[spg]), int(dm.flags[dpg])
        holes_ok = mode & uapi.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES
        if not sf & F_PT and not holes_ok:
            return errno.ENOENT  # no PTE table at the source at all
        if df & ~F_PT:
            return errno.EEXIST  # any dst PTE, even a marker
        if not sf & ~F_PT:
            return 0 if holes_ok else errno.ENOENT
        if not sf & F_PRESENT:
            return errno.EFAULT  # a PTE marker (uffd-wp, poison) cannot move
        # The page (or zero-page PTE) moves; the new PTE gets the VMA's plain
        # permissions: no uffd-wp bit, no protnone (RWP only by re-arming, see above).
        dm.set_content(dpg, sm.get_content(spg))
        sm.set_content(spg, None)
        self._install(dm, dpg, F_PRESENT | (sf & F_ZERO) | rearm)
        sm.flags[spg] = F_PT  # the source PTE is cleared, its table stays
        return 0

    # -- WRITEPROTECT
    def uffd_writeprotect(self, fd: int, start: int, length: int, mode: int) -> None:
        op = "UFFDIO_WRITEPROTECT"
        with self.lock:
            self.enter(op)
            u = self.ctx(op, fd)
            if u.mmap_changing:
                raise KernelError(op, errno.EAGAIN, 0, "event pending (mmap_changing)")
            check_range(op, start, length)
            wpb, dw = uapi.UFFDIO_WRITEPROTECT_MODE_WP, uapi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
            if mode & ~(wpb | dw) or (mode & wpb and mode & dw):
                raise KernelError(op, errno.EINVAL, 0, f"mode 0x{mode:x}")
            self.mm_gone(op, u)
            found = False
            for m, lo, hi in u.mm.maps_in(start, start + length):
                for s, a, b in m.segs_in(lo, hi):
                    if not s.mode & MODE_WP:
                        raise KernelError(op, errno.ENOENT, 0, "range not registered WP")
                    found = True
                    fl = m.flags[a:b]
                    if mode & wpb:
                        markers = m.file is not None or (
                            s.ctx is not None and s.ctx.has(uapi.UFFD_FEATURE_WP_UNPOPULATED))
                        if markers:  # none PTEs get uffd-wp markers, PTE tables allocated
                            for x, y in spans(0, len(fl)):
                                sub = fl[x:y]
                                sub |= F_WP
                                poison = np.flatnonzero((sub & (F_PRESENT | F_POISON))
                                                        == F_POISON)
                                sub[poison] &= ~F_WP & 0xFF  # poison markers are left alone
                            m.set_pt(a, b)
                        else:
                            copy_bit(fl, F_PRESENT, F_WP)
                    else:
                        clear_bits(fl, F_WP)
            if not found:
                raise KernelError(op, errno.ENOENT, 0, "no registered VMA in range")
            if not mode & wpb and not mode & dw:
                self.wake_range(u, start, length)

    # -- RWPROTECT (7.3) / DEACTIVATE (RFC)
    def uffd_rwprotect(self, fd: int, start: int, length: int, mode: int) -> None:
        op = "UFFDIO_RWPROTECT"
        with self.lock:
            self.enter(op)
            if self.dialect is not Dialect.RWP:
                # an ioctl the uffd switch does not know: its default answer is EINVAL
                raise KernelError(op, errno.EINVAL, 0, f"no RWPROTECT in the {self.name} dialect")
            u = self.ctx(op, fd)
            if u.mmap_changing:
                raise KernelError(op, errno.EAGAIN, 0, "event pending (mmap_changing)")
            check_range(op, start, length)
            rwp, dw = uapi.UFFDIO_RWPROTECT_MODE_RWP, uapi.UFFDIO_RWPROTECT_MODE_DONTWAKE
            if mode & ~(rwp | dw) or (mode & rwp and mode & dw):
                raise KernelError(op, errno.EINVAL, 0, f"mode 0x{mode:x}")
            self.mm_gone(op, u)
            parts = [(m, s, a, b) for m, lo, hi in u.mm.maps_in(start, start + length)
                     for s, a, b in m.segs_in(lo, hi)]
            # Pre-scan: every VMA must be RWP-registered before anything changes.
            if not parts or any(not s.mode & MODE_RWP for _m, s, _a, _b in parts):
                raise KernelError(op, errno.ENOENT, 0, "range not registered RWP")
            for m, _s, a, b in parts:
                if mode & rwp:
                    copy_bit(m.flags[a:b], F_PRESENT, F_RWP)
                else:
                    clear_bits(m.flags[a:b], F_RWP)
            if not mode & rwp and not mode & dw:
                self.wake_range(u, start, length)

    def uffd_deactivate(self, fd: int, start: int, length: int) -> None:
        op = "UFFDIO_DEACTIVATE"
        with self.lock:
            self.enter(op)
            if self.dialect is not Dialect.RFC:
                raise KernelError(op, errno.ENOTTY, 0, f"no DEACTIVATE in the {self.name} dialect")
            u = self.ctx(op, fd)
            if u.mmap_changing:
                raise KernelError(op, errno.EAGAIN, 0, "event pending (mmap_changing)")
            check_range(op, start, length)
            self.mm_gone(op, u)
            err = errno.ENOENT
            for m, lo, hi in u.mm.maps_in(start, start + length):
                for s, a, b in m.segs_in(lo, hi):
                    if not s.mode & MODE_MINOR:
                        raise KernelError(op, errno.ENOENT, 0, "range not registered MINOR")
                    if m.anon:  # protnone: pages stay resident
                        copy_bit(m.flags[a:b], F_PRESENT, F_PROTNONE)
                    else:  # shmem: zap PTEs, pages stay in the page cache
                        self.zap_shmem(m, s, a, b)
                    err = 0
            if err:
                raise KernelError(op, err, 0, "no registered VMA in range")

    def zap_shmem(self, m: Mapping, s: Seg, a: int, b: int) -> None:
        """Zap shmem PTEs; a wr-protected PTE leaves a uffd-wp marker behind."""
        fl = m.flags[a:b]
        keep = F_PT | (F_WP if s.mode & MODE_WP else 0)
        fl &= keep
        m.set_pt(a, b)
