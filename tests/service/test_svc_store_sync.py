"""store.sync has one default, "none": the settings' and PageStore's own; and every
PageStore the package opens is given sync explicitly all the same."""

from __future__ import annotations

import ast
from pathlib import Path

from vmm_tierd.service.config import default_settings
from vmm_tierd.settings import StoreSettings

PACKAGE = Path(__file__).resolve().parents[2] / "vmm_tierd"


def test_every_page_store_in_the_package_is_opened_with_an_explicit_sync() -> None:
    calls = []
    for f in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "PageStore":
                calls.append((f.relative_to(PACKAGE), node.lineno,
                              {k.arg for k in node.keywords}))
    assert calls, "no PageStore( call found: the test looks in the wrong place"
    missing = [(str(f), line) for f, line, kws in calls if "sync" not in kws]
    assert missing == []


def test_the_settings_default_is_the_documented_one() -> None:
    assert StoreSettings().sync == "none"
    assert default_settings().store.sync == "none"


def test_the_store_and_the_settings_share_one_default() -> None:
    import inspect

    from vmm_tierd.engine.store import PageStore

    default = inspect.signature(PageStore.__init__).parameters["sync"].default
    assert default == StoreSettings().sync == "none"
