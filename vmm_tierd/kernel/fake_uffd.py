"""userfaultfd contexts of the fake kernel: open/API/close, (un)register, read, events,
SET_MODE. Semantics follow fs/userfaultfd.c (6.18) plus the RWP series (7.3) or the RFC."""

from __future__ import annotations

import errno
import os

from . import uapi
from .api import ApiInfo, Dialect, KernelError, RemoveEvent, UffdEvent, UnmapEvent
from .fake_state import (
    F_PROTNONE,
    F_RWP,
    F_WP,
    MODE_MINOR,
    MODE_MISSING,
    MODE_RWP,
    MODE_WP,
    PAGE,
    FakeState,
    Mapping,
    Mm,
    Uffd,
    Waiter,
    check_range,
    clear_bits,
)

FEATURES_618 = (1 << 17) - 1  # every bit up to UFFD_FEATURE_MOVE
FEATURES_ALL = (1 << 19) - 1  # + bits 17/18 (RWP/RWP_ASYNC or MINOR_ANON/MINOR_ASYNC)


def _bit(name: str) -> int:
    return 1 << uapi.IOCTL_BIT[name]


API_IOCTLS = _bit("REGISTER") | _bit("UNREGISTER") | _bit("API")
RANGE_IOCTLS = (_bit("WAKE") | _bit("COPY") | _bit("ZEROPAGE") | _bit("MOVE")
                | _bit("WRITEPROTECT") | _bit("CONTINUE") | _bit("POISON"))


class UffdMixin(FakeState):
    # -- helpers
    def async_minor(self, u: Uffd | None) -> bool:
        """RFC MINOR_ASYNC: minor faults auto-resolve (anon protnone and shmem)."""
        return (u is not None and self.dialect is Dialect.RFC
                and u.has(uapi.UFFD_FEATURE_MINOR_ASYNC))

    def api_ioctls(self) -> int:
        # The RWP series adds SET_MODE to UFFD_API_IOCTLS; the RFC as posted did not.
        return API_IOCTLS | (_bit("SET_MODE") if self.dialect is Dialect.RWP else 0)

    def _unprotect(self, m: Mapping, lo: int, hi: int, mode: int) -> None:
        """userfaultfd_clear_vma(): drop wp bits/markers, RWP and RFC protnone."""
        bits = ((F_WP if mode & MODE_WP else 0) | (F_RWP if mode & MODE_RWP else 0)
                | (F_PROTNONE if mode & MODE_MINOR and m.anon else 0))
        if bits:
            clear_bits(m.flags[lo:hi], bits)

    # -- open/API/close
    def uffd_open(self, *, user_mode_only: bool = False) -> int:
        with self.lock:
            self.enter("userfaultfd")
            u = self.new_uffd(self.mm, user_mode_only, nonblock=True)
            fd = os.dup(u.fd)  # O_CLOEXEC (non-inheritable)
            self.uffds[fd] = u
            return fd

    @staticmethod
    def new_uffd(mm: Mm, user_mode_only: bool, nonblock: bool) -> Uffd:
        """A context bound to ``mm`` (the creator's), with no fd yet: the caller puts
        one (a dup of ``Uffd.fd``, refs already 1) in some process's fd table."""
        return Uffd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC), user_mode_only, mm,
                    nonblock=nonblock)

    def uffd_api(self, fd: int, features: int) -> ApiInfo:
        op = "UFFDIO_API"
        with self.lock:
            self.enter(op)
            u = self.ctx(op, fd, need_api=False)
            avail = FEATURES_ALL if self.dialect is not Dialect.NONE else FEATURES_618
            if u.features is not None:
                raise KernelError(op, errno.EINVAL, 0, "UFFDIO_API already done on this fd")
            if features & ~avail:
                raise KernelError(op, errno.EINVAL, 0, f"unknown features 0x{features & ~avail:x}")
            if self.dialect is Dialect.RFC:
                minors = (uapi.UFFD_FEATURE_MINOR_ANON | uapi.UFFD_FEATURE_MINOR_SHMEM
                          | uapi.UFFD_FEATURE_MINOR_HUGETLBFS)
                if features & uapi.UFFD_FEATURE_MINOR_ASYNC and not features & minors:
                    raise KernelError(op, errno.EINVAL, 0, "MINOR_ASYNC needs a minor feature")
            elif self.dialect is Dialect.RWP:
                if features & uapi.UFFD_FEATURE_RWP_ASYNC and not features & uapi.UFFD_FEATURE_RWP:
                    raise KernelError(op, errno.EINVAL, 0, "RWP_ASYNC needs RWP")
            if features & uapi.UFFD_FEATURE_WP_ASYNC:
                # WP_ASYNC relies on WP_UNPOPULATED; the kernel turns it on unconditionally
                features |= uapi.UFFD_FEATURE_WP_UNPOPULATED
            u.features = features
            return ApiInfo(features=avail, ioctls=self.api_ioctls())

    def uffd_features(self, fd: int) -> int | None:
        with self.lock:
            return self.ctx("fdinfo", fd, need_api=False).features

    def uffd_close(self, fd: int) -> None:
        """Close this process's ``fd``; the context goes only with its last fd (another
        process may hold one: a uffd made inside a VMM and copied with pidfd_getfd)."""
        with self.lock:
            self.enter("close")
            u = self.uffds.pop(fd, None)
            if u is None:
                raise KernelError("close", errno.EBADF)
            os.close(fd)
            self.unref(u)

    def release(self, u: Uffd) -> None:
        """userfaultfd_release(): unregister everything, wake every blocked thread."""
        for m in u.mm.maps:
            for s in list(m.segs):
                if s.ctx is u:
                    self._unprotect(m, s.lo, s.hi, s.mode)
                    m.set_reg(s.lo, s.hi, None, 0)
        u.released = True
        for w in [*u.pending, *u.waiting, *u.events]:
            w.woken = True
        u.pending.clear()
        u.waiting.clear()
        u.events.clear()
        u.mmap_changing = 0
        u.readable = False
        self.cv.notify_all()

    def mm_gone(self, op: str, u: Uffd, err: int = errno.ESRCH) -> None:
        """mmget_not_zero(ctx->mm) failed: the creator of the uffd has exited."""
        if u.mm.dead:
            raise KernelError(op, err, 0, "the uffd's address space has exited")

    # -- register/unregister
    def uffd_register(self, fd: int, start: int, length: int, mode: int) -> int:
        op = "UFFDIO_REGISTER"
        with self.lock:
            self.enter(op)
            u = self.ctx(op, fd)
            allowed = MODE_MISSING | MODE_WP | MODE_MINOR
            if self.dialect is Dialect.RWP:
                allowed |= MODE_RWP
            if not mode or mode & ~allowed:
                raise KernelError(op, errno.EINVAL, 0, f"mode 0x{mode:x}")
            if mode & MODE_RWP:
                if not u.has(uapi.UFFD_FEATURE_RWP):
                    raise KernelError(op, errno.EINVAL, 0, "MODE_RWP without UFFD_FEATURE_RWP")
                if mode & MODE_WP:
                    # WP and RWP share the uffd PTE bit: never both on one VMA
                    raise KernelError(op, errno.EINVAL, 0, "MODE_WP with MODE_RWP")
            check_range(op, start, length)
            self.mm_gone(op, u, errno.ENOMEM)
            parts = u.mm.maps_in(start, start + length)
            if not parts:
                raise KernelError(op, errno.EINVAL, 0, "no mapping in range")
            minor_anon = self.dialect is Dialect.RFC and u.has(uapi.UFFD_FEATURE_MINOR_ANON)
            for m, lo, hi in parts:
                if mode & MODE_MINOR and m.anon and not minor_anon:
                    raise KernelError(op, errno.EINVAL, 0, "MODE_MINOR on anonymous memory")
                for s, _a, _b in m.segs_in(lo, hi):
                    if s.ctx is not None and s.ctx is not u:
                        raise KernelError(op, errno.EBUSY, 0, "registered with another uffd")
                    if s.ctx is u and s.mode & MODE_RWP and not mode & MODE_RWP:
                        # 7.3: re-registering must not drop a marker-installing mode
                        raise KernelError(op, errno.EBUSY, 0, "re-register drops MODE_RWP")
            for m, lo, hi in parts:
                m.set_reg(lo, hi, u, mode)
            ioctls = RANGE_IOCTLS
            if not mode & MODE_MINOR:
                ioctls &= ~_bit("CONTINUE")
            if not mode & MODE_WP:
                ioctls &= ~_bit("WRITEPROTECT")
            if self.dialect is Dialect.RWP and mode & MODE_RWP:
                ioctls |= _bit("RWPROTECT")
            if self.dialect is Dialect.RFC and mode & MODE_MINOR:
                ioctls |= 1 << uapi._UFFDIO_RWPROTECT  # DEACTIVATE shares nr 0x09
            return ioctls

    def uffd_unregister(self, fd: int, start: int, length: int) -> None:
        op = "UFFDIO_UNREGISTER"
        with self.lock:
            self.enter(op)
            u = self.ctx(op, fd)
            check_range(op, start, length)
            self.mm_gone(op, u, errno.ENOMEM)
            parts = u.mm.maps_in(start, start + length)
            if not parts:
                raise KernelError(op, errno.EINVAL, 0, "no mapping in range")
            for m, lo, hi in parts:
                for s, _a, _b in m.segs_in(lo, hi):
                    if s.ctx is not None and s.ctx is not u:
                        raise KernelError(op, errno.EINVAL, 0, "registered with another uffd")
            for m, lo, hi in parts:
                for s, a, b in m.segs_in(lo, hi):
                    if s.ctx is not u:
                        continue
                    self._unprotect(m, a, b, s.mode)
                    if s.mode & MODE_MISSING:
                        # Only MISSING VMAs wake their blocked faults; one blocked on a
                        # WP/MINOR(/RWP) VMA stays blocked until WAKE or close (6.18).
                        self.wake_range(u, m.addr + a * PAGE, (b - a) * PAGE)
                    m.set_reg(a, b, None, 0)

    # -- reading messages
    def uffd_read(self, fd: int, max_msgs: int = 64) -> list[UffdEvent]:
        op = "read(uffd)"
        with self.lock:
            self.enter(op)
            u = self.ctx(op, fd)
            if not u.nonblock:
                # a copy of a uffd its creator opened without O_NONBLOCK: read() sleeps
                # until a message arrives (the file's flags are shared by every copy)
                u.readers += 1
                try:
                    while not (u.pending or u.events or u.released):
                        self.cv.wait()
                finally:
                    u.readers -= 1
            out: list[UffdEvent] = []
            # userfaultfd_ctx_read(): page faults first (oldest first), then events.
            while len(out) < max_msgs and u.pending:
                w = u.pending.pop(0)
                u.waiting.append(w)
                out.append(w.msg)
            while len(out) < max_msgs and u.events:
                w = u.events.popleft()
                out.append(w.msg)
                # Reading the event completes it: the madvise/munmap caller resumes and
                # mmap_changing drops, so page ops stop failing with EAGAIN.
                w.woken = True
                u.mmap_changing -= 1
                self.cv.notify_all()
            u.sync_readiness()
            return out

    def post_events(self, events: list[tuple[Uffd, UffdEvent]]) -> None:
        """Queue non-pagefault events and block until each one was read (or the uffd
        closed), exactly like userfaultfd_event_wait_completion(). Caller holds the lock."""
        waiters = []
        for u, msg in events:
            if u.released:
                continue
            w = Waiter(0, msg)
            u.events.append(w)
            u.mmap_changing += 1
            self.queued(u)
            waiters.append((u, w))
        for u, w in waiters:
            while not w.woken and not u.released:
                self.cv.wait()

    def remove_events(self, m: Mapping, lo: int, hi: int) -> list[tuple[Uffd, UffdEvent]]:
        out: list[tuple[Uffd, UffdEvent]] = []
        for s, a, b in m.segs_in(lo, hi):
            if s.ctx is not None and s.ctx.has(uapi.UFFD_FEATURE_EVENT_REMOVE):
                out.append((s.ctx, RemoveEvent(m.addr + a * PAGE, m.addr + b * PAGE)))
        return out

    def unmap_events(self, m: Mapping, start: int, end: int) -> list[tuple[Uffd, UffdEvent]]:
        seen: list[Uffd] = []
        for s in m.segs:
            u = s.ctx
            if u is not None and u.has(uapi.UFFD_FEATURE_EVENT_UNMAP) and u not in seen:
                seen.append(u)
        return [(u, UnmapEvent(start, end)) for u in seen]

    # -- wake and set_mode
    def uffd_wake(self, fd: int, start: int, length: int) -> None:
        op = "UFFDIO_WAKE"
        with self.lock:
            self.enter(op)
            u = self.ctx(op, fd)
            check_range(op, start, length)
            self.wake_range(u, start, length)

    def uffd_set_mode(self, fd: int, enable: int, disable: int) -> None:
        op = "UFFDIO_SET_MODE"
        with self.lock:
            self.enter(op)
            if self.dialect is Dialect.NONE:
                raise KernelError(op, errno.EINVAL, 0, "no SET_MODE before 7.3")
            u = self.ctx(op, fd)
            toggle = (uapi.UFFD_FEATURE_RWP_ASYNC if self.dialect is Dialect.RWP
                      else uapi.UFFD_FEATURE_MINOR_ASYNC)
            if enable & disable:
                raise KernelError(op, errno.EINVAL, 0, "enable and disable overlap")
            if (enable | disable) & ~toggle:
                raise KernelError(op, errno.EINVAL, 0, "only the async bit can be toggled")
            if (self.dialect is Dialect.RWP and enable & toggle
                    and not u.has(uapi.UFFD_FEATURE_RWP)):
                raise KernelError(op, errno.EINVAL, 0, "RWP_ASYNC on a uffd without RWP")
            self.mm_gone(op, u)
            assert u.features is not None
            u.features = (u.features | enable) & ~disable
            if enable & toggle:
                # Blocked sync faults retry and auto-resolve under the async mode.
                self.wake_range(u, 0, 0)
