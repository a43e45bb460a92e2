"""What the real-VM guest holds: a text seed, the file plan, and the initramfs that fills it.

The data (``rig.sh`` writes it) is about ``fill_fraction`` of the guest's RAM in tmpfs files:
80 % text-like (zstd level 1 compresses its pages about 2.4x), 10 % random, 10 % zeros.

Text files are windows of one 4 MiB seed (which has no repeats). A page of a text file is
the seed from some offset on, so two pages are equal only if they start at the same seed
offset. Text file i starts at an offset whose remainder modulo 4096 is (i + 1) * 263, and
each churn of a file moves it on by N * 263 bytes (N text files): generation g of file i
sits at remainder (i + 1 + g * N) * 263 mod 4096, different for every (file, generation)
while i + 1 + g * N < 4096, and never 0 (the seed's own pages). So until then no page of the
data equals any other page of the data, now or earlier: a page served from the wrong place,
or stale, changes some file's sha256. (With 200 text files: 20 generations, i.e. about 100
rounds of ``churn 20``; after that contents may repeat.)
"""

from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

from tests.kernel_vm.image import DIR, FILE, INIT_PROLOGUE, write_busybox_image

PAGE = 4096
SEED_BYTES = 4 << 20
MIX = (("t", 0.8), ("r", 0.1), ("z", 0.1))
MIN_FILE = 64 << 10
MAX_FILE = 4 << 20                       # <= SEED_BYTES: a text window never overlaps itself
PLAN_SEED = 20261201                     # the plan and seed are the same on every run
TEXT_STEP = 263                          # odd: (i * 263) mod 4096 repeats after 4096 steps
RIG_SH = Path(__file__).with_name("rig.sh")
GUEST_DATA, GUEST_STATE = "/data", "/run/rig"
CONTROL_TTY = "/dev/ttyS1"               # the second -serial; ttyS0 is the kernel console
CANARY = "canary"


@dataclass(frozen=True)
class FileSpec:
    name: str
    kind: str        # "t" text, "r" random, "z" zeros
    size: int        # bytes
    offset: int      # text: where in the seed the file starts; else 0


@functools.cache
def seed_text(size: int = SEED_BYTES) -> bytes:
    """Deterministic prose-like text: Zipf-weighted made-up words and numbers."""
    rng = random.Random(PLAN_SEED)
    syllables = ["ka", "ri", "to", "me", "su", "la", "no", "vi", "de", "po", "ran", "tel",
                 "mos", "qui", "ber", "sha", "lo", "gen", "fa", "ux", "ire", "on", "ex", "ta"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)]
    words += [str(rng.randrange(100000)) for _ in range(300)]
    cum = list(itertools.accumulate(1 / (i + 1) for i in range(len(words))))
    picked = rng.choices(words, cum_weights=cum, k=size // 4)
    seps = rng.choices([" ", "\n", ". ", ", "], weights=[85, 8, 4, 3], k=len(picked))
    text = "".join(itertools.chain.from_iterable(zip(picked, seps, strict=True))).encode()
    if len(text) < size:           # cannot happen for the sizes used; never repeat silently
        raise ValueError(f"seed generator produced {len(text)} < {size} bytes")
    return text[:size]


def plan_files(total: int, seed_bytes: int = SEED_BYTES) -> list[FileSpec]:
    """Files of about ``total`` bytes in the MIX proportions, in a shuffled (but fixed)
    order, so that churning or touching consecutive files mixes the kinds."""
    if seed_bytes % PAGE or seed_bytes < MAX_FILE:
        raise ValueError(f"seed of {seed_bytes} bytes: must be a multiple of {PAGE} "
                         f"and at least {MAX_FILE}")
    rng = random.Random(PLAN_SEED)
    files: list[FileSpec] = []
    for kind, share in MIX:
        budget = int(total * share)
        index = 0
        while budget >= MIN_FILE:
            size = min(budget, rng.randrange(MIN_FILE, MAX_FILE + 1, PAGE))
            if kind == "t":
                size -= rng.randrange(PAGE)        # text files end inside a page
                within = ((index + 1) * TEXT_STEP) % PAGE      # see the module doc
                if index + 1 >= PAGE:
                    raise ValueError(f"more than {PAGE - 1} text files: use larger files")
                offset = within + PAGE * rng.randrange(seed_bytes // PAGE)
            else:
                offset = 0
            files.append(FileSpec(f"{kind}{index:04d}", kind, size, offset))
            budget -= size
            index += 1
    rng.shuffle(files)
    return files


def plan_text(files: list[FileSpec]) -> str:
    return "".join(f"{f.name} {f.kind} {f.size} {f.offset}\n" for f in files)


def canary_marker(token: str) -> bytes:
    """The bytes that begin the canary file's page (rig.sh writes them in two halves)."""
    return f"RIGCANARY-{token}={token}-YRANACGIR\n".encode()


def text_stride(files: list[FileSpec]) -> int:
    """How far (bytes) churn moves a text file in the seed (see the module doc)."""
    return TEXT_STEP * sum(f.kind == "t" for f in files)


def rig_env(token: str, data: str, state: str, seed: str, plan: str,
            stride: int) -> dict[str, str]:
    return {"RIG_TOKEN": token, "RIG_DATA": data, "RIG_STATE": state, "RIG_SEED": seed,
            "RIG_PLAN": plan, "RIG_TEXT_STRIDE": str(stride)}


def init_script() -> str:
    """/init: a tmpfs for the data, the control tty in raw mode, then rig.sh on it."""
    return INIT_PROLOGUE + f"""die() {{ echo "realvm: $1" >&2; sync; poweroff -f; sleep 30; }}
. /rig.env
mkdir -p {GUEST_DATA} {GUEST_STATE}
# tmpfs defaults to half of RAM; the fill may take up to 80 %.
mount -t tmpfs -o size=95%,mode=0755 data {GUEST_DATA} || die "mount tmpfs {GUEST_DATA}"
stty -F {CONTROL_TTY} raw -echo || die "stty {CONTROL_TTY}"
echo "realvm: $(uname -r), $(nproc) cpu(s), $(grep MemTotal /proc/meminfo)"
sh /rig.sh <>{CONTROL_TTY} >&0
echo "realvm: rig.sh exited with status $?; powering off"
sync
poweroff -f
sleep 30
"""


def build_image(token: str, files: list[FileSpec], out: Path) -> Path:
    env = rig_env(token, GUEST_DATA, GUEST_STATE, "/seed", "/rig.plan", text_stride(files))
    env_text = "".join(f"export {k}={v}\n" for k, v in env.items())
    extra = [
        ("run", DIR, b""),
        ("seed", FILE, seed_text()),
        ("rig.plan", FILE, plan_text(files).encode()),
        ("rig.sh", FILE, RIG_SH.read_bytes()),
        ("rig.env", FILE, env_text.encode()),
    ]
    return write_busybox_image(init_script(), extra, out)
