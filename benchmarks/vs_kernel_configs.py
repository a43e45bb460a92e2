"""The configurations benchmarks/vs_kernel.py compares, and the vmm-tierd config file it
writes for the daemon's ones (the embedded default with a few keys changed)."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

DAMOS_MIN_AGE_S = 6.0  # = vmm-tierd's default: min_age 2 intervals of 3 s


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    kind: str  # none | daemon | zram | damos
    tracking: dict[str, Any] = field(default_factory=dict)
    limit_from: str | None = None
    store: dict[str, Any] = field(default_factory=dict)


CONFIGS = (
    Config("none", "no tiering", "none"),
    Config("tierd", "vmm-tierd default", "daemon"),
    Config("tierd-aggr", "vmm-tierd aggressive (1s, min_age 1)", "daemon",
           {"interval": "1s", "min_age": 1}),
    Config("tierd-keep", "vmm-tierd default, store page cache kept", "daemon",
           store={"page_cache": "keep"}),
    Config("zram", "zram lz4, limit = default's anon", "zram", limit_from="tierd"),
    Config("zram-aggr", "zram lz4, limit = aggressive's anon", "zram", limit_from="tierd-aggr"),
    Config("damos", f"DAMOS pageout (cold {DAMOS_MIN_AGE_S:g} s) + zram", "damos"),
)
PACES = {"paced": 20000.0, "unpaced": 0.0}



def dump_toml(doc: dict[str, Any]) -> str:
    """TOML for a config document of tables, arrays of tables and scalars."""
    out: list[str] = []

    def val(v: Any) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else (
            json.dumps(v) if isinstance(v, str) else repr(v))

    def tab(name: str, d: dict[str, Any], array: bool = False) -> None:
        out.append(f"[[{name}]]" if array else f"[{name}]")
        out.extend(f"{k} = {val(v)}" for k, v in d.items() if not isinstance(v, dict))
        for k, v in d.items():
            if isinstance(v, dict):
                tab(f"{name}.{k}", v)

    for k, v in doc.items():
        if isinstance(v, dict):
            tab(k, v)
        elif isinstance(v, list):
            for item in v:
                tab(k, item, array=True)
        else:
            out.insert(0, f"{k} = {val(v)}")
    return "\n".join(out) + "\n"


def daemon_config(cfg: Config, pace: str, run_dir: Path, size_mib: int) -> Path:
    """The embedded default (vmm_tierd/defaults/default.toml) with its store in run_dir,
    metrics on a free loopback port, the configuration's tracking and the pace."""
    text = resources.files("vmm_tierd").joinpath("defaults/default.toml").read_text("utf-8")
    doc = tomllib.loads(text)
    doc["daemon"]["metrics_listen"] = "127.0.0.1:0"
    doc["store"]["path"] = str(run_dir / "store")
    doc["tracking"].update(cfg.tracking)
    doc["store"].update(cfg.store)
    region = doc["region"][0]
    region["size"] = f"{size_mib}MiB"
    region["workload"]["ops_per_sec"] = PACES[pace]
    path = run_dir / "vmm-tierd.toml"
    path.write_text(dump_toml(doc))
    return path
