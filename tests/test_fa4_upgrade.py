"""The FA4 upgrade report (``python -m fa4aot.tools.fa4_upgrade``): against the pinned FA4 itself
it finds nothing; against a copy of it with a changed signature, compile key and selector it
names each change."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import needs_dsl

from fa4aot.core.targets import ARCHES
from fa4aot.tools import fa4_upgrade


def _pinned_package() -> Path:
    spec = importlib.util.find_spec("flash_attn")
    if spec is None:
        pytest.skip("flash-attn-4 is not installed (the build extra)")
    return Path(next(iter(spec.submodule_search_locations)))


def _copy_of_fa4(tmp_path: Path) -> Path:
    """A package root holding only the two files the static sections read."""
    src = _pinned_package() / "cute"
    dst = tmp_path / "fa4" / "flash_attn" / "cute"
    dst.mkdir(parents=True)
    for name in ("interface.py", "config.py"):
        shutil.copy(src / name, dst / name)
    return tmp_path / "fa4"


def test_a_changed_fa4_is_reported_section_by_section(tmp_path):
    root = _copy_of_fa4(tmp_path)
    iface = root / "flash_attn" / "cute" / "interface.py"
    text = iface.read_text()
    # a new positional parameter of flash_attn_func, a new forward key element
    text = text.replace(
        "def flash_attn_func(\n    q: torch.Tensor,",
        "def flash_attn_func(\n    q: torch.Tensor,\n    q_rope: torch.Tensor,",
        1,
    )
    assert "q_rope" in text
    text = text.replace(
        "tensormap_workspace is not None,", "tensormap_workspace is not None,\n        fp4_scales is not None,", 1
    )
    iface.write_text(text)
    cfg = root / "flash_attn" / "cute" / "config.py"
    cfg.write_text(cfg.read_text().replace("def select_bwd_config(", "def choose_bwd_config(", 1))
    rep = fa4_upgrade.report(str(root), calls=0)
    assert "flash_attn_func: adds q_rope (positional 2)" in rep["entry points"]
    assert any(x.startswith("fa4_args.flash_attn_func: positional parameter 2 is k") for x in rep["entry points"])
    assert "_flash_attn_fwd key: adds fp4_scales is not None" in rep["compile keys"]
    assert "_flash_attn_fwd key: fp4_scales is not None is not modeled by fa4aot" in rep["compile keys"]
    assert any("lacks ['select_bwd_config'" in x for x in rep["selector"])
    assert rep["parity"] == ["not run: NEW's selector does not load"]


@pytest.mark.slow
@needs_dsl
def test_the_pinned_fa4_against_itself_has_no_differences():
    rep = fa4_upgrade.report(str(_pinned_package().parent), calls=4)
    assert rep["entry points"] == rep["compile keys"] == rep["selector"] == []
    assert len(rep["parity"]) == len(ARCHES) and all(
        x.split(": ")[1].startswith("4 of 4 calls") for x in rep["parity"]
    ), rep


def test_the_command_refuses_what_it_cannot_read(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "fa4aot.tools.fa4_upgrade", str(tmp_path)], capture_output=True, text=True
    )
    assert p.returncode != 0 and "no flash_attn/cute/interface.py" in p.stderr
    (tmp_path / "x.txt").write_text("")
    p = subprocess.run([sys.executable, "-m", "fa4aot.tools.fa4_upgrade", str(tmp_path / "x.txt")], capture_output=True,
                       text=True)  # fmt: skip
    assert p.returncode != 0 and "not a directory or a .whl" in p.stderr
