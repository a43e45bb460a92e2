"""Obtain and cache a Debian Linux >= 7.3 kernel (vmlinuz + the few modules the guest needs).

A cached kernel is used only if it holds every directory of ``MODULE_DIRS``; one cached by
an older version of this file (fewer modules) is downloaded again and replaced.

apt runs on a PRIVATE sources list with private state and cache dirs (all ``-o`` options), so
the system's sources, lists and dpkg state are never touched. The mirror host is read from the
system's own sources at run time. Versions rotate off the mirror, so the newest image that is
at least ``MIN_VERSION`` is picked each time the cache is cold.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MIN_VERSION = (7, 3)
SUITE = "trixie-backports"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
FLAVOUR = "amd64"
# Modules loaded in the guest, in dependency order after resolution (see initramfs.py).
GUEST_MODULES = ("9p", "9pnet_virtio", "overlay")
# Loaded if they can be: a failure leaves only the tests that need them failing.
# kvm_amd (deps: kvm, irqbypass, ccp) gives the guest /dev/kvm for tests/minivmm: QEMU's
# "-cpu max" under TCG is an AMD CPU with SVM and NPT, so nested KVM works in the guest.
OPTIONAL_MODULES = ("kvm_amd",)
MODULE_DIRS = ("kernel/fs/9p", "kernel/net/9p", "kernel/fs/netfs", "kernel/fs/overlayfs",
               "kernel/arch/x86/kvm", "kernel/virt/lib", "kernel/drivers/crypto/ccp")

LogFn = Callable[[str], None]
_IMAGE_RE = re.compile(
    r"^linux-image-(\d+)\.(\d+)\.(\d+)((?:\+[A-Za-z0-9.~]+)?)-" + FLAVOUR + r"(-unsigned)?$")


class KernelFetchError(RuntimeError):
    """The kernel could not be obtained (mirror, apt, package layout)."""


@dataclass(frozen=True)
class KernelBundle:
    version: str          # the kernel release, e.g. "7.3.4+deb13-amd64" (= uname -r)
    package: str          # the image package it came from
    root: Path            # cache dir of this version
    vmlinuz: Path
    modules: Path         # dir holding the .ko.xz files (tree under usr/lib/modules/<ver>)

    def describe(self) -> str:
        return f"{self.package} -> {self.vmlinuz}"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vmm-tierd" / "kernel"


def parse_mirror(sources: dict[str, str]) -> str:
    """The first Debian archive URI (not -security, not -ports) in apt sources texts.

    ``sources`` maps a file name to its text: one-line ``.list`` or deb822 ``.sources``.
    """
    uris: list[str] = []
    for name, text in sorted(sources.items()):
        if name.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if "deb" in fields.get("types", "").split():
                    uris.extend(fields.get("uris", "").split())
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    uris.append(words[1])
    for uri in uris:
        path = uri.rstrip("/")
        if path.endswith("/debian") and "security" not in path:
            return path
    raise KernelFetchError(
        "no Debian archive mirror (a URI ending in /debian) in /etc/apt/sources.list*; "
        f"found {uris or 'no deb sources'}")


def system_sources(etc: Path = Path("/etc/apt")) -> dict[str, str]:
    files = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list")),
             *sorted((etc / "sources.list.d").glob("*.sources"))]
    return {p.name: p.read_text() for p in files if p.is_file()}


def version_key(pkg: str) -> tuple[int, int, int, str, int] | None:
    """Sort key of a linux-image package name, None if it is not a plain amd64 image."""
    m = _IMAGE_RE.match(pkg)
    if not m or "-dbg" in pkg:
        return None
    # Prefer the signed image over the -unsigned one of the same version.
    return (int(m[1]), int(m[2]), int(m[3]), m[4], 0 if m[5] else 1)


def pick_image(pkgnames: list[str], minimum: tuple[int, int] = MIN_VERSION) -> str | None:
    """The newest ``linux-image-X.Y.Z...-amd64`` package with (X, Y) >= minimum."""
    best: tuple[tuple[int, int, int, str, int], str] | None = None
    for name in pkgnames:
        key = version_key(name.strip())
        if key is None or key[:2] < minimum:
            continue
        if best is None or key > best[0]:
            best = (key, name.strip())
    return best[1] if best else None


def release_of(image_pkg: str) -> str:
    """``linux-image-7.3.4+deb13-amd64[-unsigned]`` -> ``7.3.4+deb13-amd64``."""
    rel = image_pkg.removeprefix("linux-image-")
    return rel.removesuffix("-unsigned")


def parse_depends(text: str) -> list[str]:
    """Package names from ``apt-cache depends`` output (Depends lines only)."""
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*\|?Depends:\s+(\S+)", line)
        if m and not m[1].startswith("<"):
            out.append(m[1])
    return out


class PrivateApt:
    """apt-get/apt-cache on a private sources list and private state, never the system's."""

    def __init__(self, workdir: Path, mirror: str) -> None:
        self.dir = workdir
        for sub in ("lists/partial", "archives/partial", "cache", "prefs.d", "debs"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        self.sources = workdir / "sources.list"
        self.sources.write_text(f"deb [signed-by={KEYRING}] {mirror} {SUITE} main\n")
        self.opts = [
            "-o", f"Dir::Etc::SourceList={self.sources}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={workdir / 'lists'}",
            "-o", "Dir::State::status=/dev/null",
            "-o", f"Dir::Cache={workdir / 'cache'}",
            "-o", f"Dir::Cache::archives={workdir / 'archives'}",
            "-o", "Dir::Etc::Preferences=/dev/null",
            "-o", f"Dir::Etc::PreferencesParts={workdir / 'prefs.d'}",
            "-o", f"APT::Architecture={FLAVOUR}",
            "-o", "APT::Architectures=",
            # The private lists dir is ours alone; the system's locks are not involved.
            "-o", "Debug::NoLocking=1",
            # apt's _apt sandbox user cannot write to a root-owned temp dir.
            "-o", "APT::Sandbox::User=root",
        ]

    def run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        cmd = [tool, *self.opts, *args]
        try:
            proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KernelFetchError(f"{' '.join([tool, *args])}: {exc}") from exc
        if proc.returncode != 0:
            raise KernelFetchError(
                f"{' '.join([tool, *args])} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout


def missing_dirs(bundle: KernelBundle, dirs: tuple[str, ...] = MODULE_DIRS) -> list[str]:
    """The module directories ``bundle`` was cached without."""
    return [d for d in dirs if not (bundle.modules / d).is_dir()]


def cached_bundle(root: Path) -> KernelBundle | None:
    """The newest complete cached kernel >= MIN_VERSION (vmlinuz and every MODULE_DIRS
    directory present), or None."""
    best: tuple[tuple[int, int, int, str, int], KernelBundle] | None = None
    if not root.is_dir():
        return None
    for meta_file in root.glob("*/bundle.json"):
        try:
            meta = json.loads(meta_file.read_text())
            bundle = KernelBundle(meta["version"], meta["package"], meta_file.parent,
                                  meta_file.parent / meta["vmlinuz"],
                                  meta_file.parent / meta["modules"])
        except (OSError, ValueError, KeyError):
            continue
        key = version_key(bundle.package)
        if (key is None or key[:2] < MIN_VERSION or not bundle.vmlinuz.is_file()
                or missing_dirs(bundle)):
            continue
        if best is None or key > best[0]:
            best = (key, bundle)
    return best[1] if best else None


def _extract(deb: Path, dest: Path, members: list[str]) -> None:
    """Extract only ``members`` (tar wildcards) of a .deb's data into dest."""
    dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "-C", str(dest), "--wildcards", *members],
                         stdin=dpkg.stdout, capture_output=True, text=True, timeout=600)
    assert dpkg.stdout is not None
    dpkg.stdout.close()
    if dpkg.wait(timeout=600) != 0 or tar.returncode != 0:
        raise KernelFetchError(f"extracting {deb.name}: {tar.stderr.strip()}")


def download(root: Path, log: LogFn) -> KernelBundle:
    mirror = parse_mirror(system_sources())
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="apt-", dir=root) as tmp:
        apt = PrivateApt(Path(tmp), mirror)
        log(f"apt-get update on a private list: {mirror} {SUITE}")
        apt.run("apt-get", "-q", "update")
        names = apt.run("apt-cache", "pkgnames", "linux-image-").split()
        image = pick_image(names)
        if image is None:
            raise KernelFetchError(
                f"no linux-image >= {'.'.join(map(str, MIN_VERSION))} for {FLAVOUR} in "
                f"{mirror} {SUITE} (saw {len(names)} linux-image packages)")
        release = release_of(image)
        deps = parse_depends(apt.run("apt-cache", "depends", image))
        binary = next((d for d in deps if d.startswith("linux-binary-")), None)
        modules = next((d for d in deps if d.startswith("linux-modules-")), None)
        if binary is None or modules is None:
            raise KernelFetchError(f"{image} has no linux-binary-/linux-modules- dependency: "
                                   f"{deps}")
        log(f"picked {image}; downloading {binary} and {modules}")
        debs = Path(tmp) / "debs"
        apt.run("apt-get", "-q", "download", binary, modules, cwd=debs)
        staging = Path(tempfile.mkdtemp(prefix=f"{release}.", dir=root))
        try:
            mod_root = f"./usr/lib/modules/{release}"
            for deb in debs.glob("*.deb"):
                if deb.name.startswith("linux-binary-"):
                    _extract(deb, staging, [f"{mod_root}/vmlinuz"])
                else:
                    _extract(deb, staging, [f"{mod_root}/{d}/*" for d in MODULE_DIRS])
            vmlinuz = Path(mod_root) / "vmlinuz"
            if not (staging / vmlinuz).is_file():
                raise KernelFetchError(f"{binary} has no {vmlinuz}")
            (staging / "bundle.json").write_text(json.dumps({
                "version": release, "package": image, "vmlinuz": str(vmlinuz),
                "modules": mod_root, "mirror": mirror, "suite": SUITE,
                "debs": sorted(d.name for d in debs.glob("*.deb"))}, indent=1))
            final = root / release
            # Replace an older copy with two renames, not rmtree-then-rename: a run that
            # is reading the old copy meanwhile finds it complete or not at all.
            old = root / f".old.{release}.{os.getpid()}"
            if final.exists():
                final.rename(old)
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    bundle = cached_bundle(root)
    if bundle is None or bundle.version != release:
        raise KernelFetchError(f"cache at {root} is unusable after downloading {image}")
    return bundle


def ensure_kernel(root: Path, log: LogFn, refresh: bool = False) -> KernelBundle:
    """A cached kernel if there is one (no network), else download the newest."""
    if not refresh:
        bundle = cached_bundle(root)
        if bundle is not None:
            log(f"kernel from cache: {bundle.describe()}")
            return bundle
        for meta in sorted(root.glob("*/bundle.json")) if root.is_dir() else []:
            try:
                rel = json.loads(meta.read_text())["modules"]
            except (OSError, ValueError, KeyError):
                continue
            old = KernelBundle("", "", meta.parent, meta.parent, meta.parent / rel)
            if missing_dirs(old):
                log(f"cached kernel in {meta.parent} lacks {', '.join(missing_dirs(old))}: "
                    "downloading again")
    return download(root, log)
