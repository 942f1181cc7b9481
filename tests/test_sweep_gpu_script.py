"""scripts/gpu_bench.sh (run on a lent GPU machine, never here): it is valid bash, every
``python3 -m adapterkit...`` module it names exists, and every flag it passes is one that
module's argument parser knows, so a GPU session is not lost to a typo."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_bench.sh"


def _commands() -> list[tuple[str, str]]:
    """(module, its argument text) of every ``python3 -m adapterkit...`` command of the script."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for m in re.finditer(r"python3 -m (adapterkit[\w.]*)(.*?)(?=2>&1|\||>|$)", line):
            out.append((m.group(1), m.group(2)))
    return out


def _help(module: str) -> str:
    mod = importlib.import_module(module)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0, module
    return buf.getvalue()


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_named_module_and_flag_exists():
    cmds = _commands()
    mods = {m for m, _ in cmds}
    # the main bench, the sweep / serving runs (through the bench cli) and the fused-branch comparison
    assert {"adapterkit.bench.cli", "adapterkit.bench.fusedbench"} <= mods, mods
    args = " ".join(a for _, a in cmds)
    assert "--sweep " in args and "--serve " in args and "llama-1b" in args
    helps = {m: _help(m) for m in mods}
    for module, a in cmds:
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", a):
            assert re.search(rf"{re.escape(flag)}\b", helps[module]), f"{module} has no {flag}"


def test_every_step_is_skippable():
    text = SCRIPT.read_text()
    for var in ("BENCH_TESTS", "BENCH_PROFILE", "BENCH_SWEEP", "BENCH_SERVE", "BENCH_FUSED"):
        assert f'"${{{var}:-1}}" != 0' in text, var


def test_sweep_sizes_of_the_script_are_known_shapes():
    from adapterkit.bench.sweep import LLAMA_SIZES

    m = re.search(r"--sweep-sizes ([\w,.-]+)", SCRIPT.read_text())
    assert m
    for name in m.group(1).split(","):
        assert name in LLAMA_SIZES, name
