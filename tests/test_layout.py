"""Package layout: methods depend only on the core, the core loads methods only through the
registry, the moved modules are gone, and the product text names no issue numbers."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import adapterkit

SRC = Path(adapterkit.__file__).parent
REPO = SRC.parent.parent


def _imports(path: Path, top_level_only: bool = False) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
    return [m for m in out if m == "adapterkit" or m.startswith("adapterkit.")]


def test_methods_import_only_the_core():
    allowed = ("adapterkit.core.", "adapterkit.methods.", "adapterkit.errors")
    files = sorted((SRC / "methods").glob("*.py"))
    assert len(files) > 10
    bad = [(f.name, m) for f in files for m in _imports(f) if not m.startswith(allowed)]
    assert not bad, f"method files importing outside adapterkit.core / errors: {bad}"


def test_core_imports_methods_only_lazily():
    """No core module imports ``adapterkit.methods`` at module level (that would be the cycle
    core -> methods -> core); the registry loads them on first use."""
    bad = [(f.name, m) for f in sorted((SRC / "core").glob("*.py"))
           for m in _imports(f, top_level_only=True) if m.startswith("adapterkit.methods")]
    assert not bad, bad


def test_generative_adapter_lives_with_the_methods():
    from adapterkit.core.config import method_entry
    from adapterkit.methods import generative

    cls, builder = method_entry("generative_adapter")
    assert cls is generative.GenerativeAdapterConfig and builder is generative.GenerativeAdapterSet
    assert callable(generative.completion_loss) and callable(generative.split_documents)
    for gone in ("adapterkit.generative", "adapterkit.data", "adapterkit.data.fashionvl"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(gone)


def test_fashionvl_lives_with_the_vl_data_and_its_command_is_registered():
    from adapterkit.cli import COMMANDS, build_parser
    from adapterkit.vl.datasets import fashionvl

    assert "adapterkit.vl.datasets.fashionvl" in COMMANDS
    assert callable(fashionvl.build_fashionvl)
    args = build_parser().parse_args(["fashionvl", "stats", "--out", "somewhere"])
    assert args.out == "somewhere"


_ISSUE_REF = re.compile(r"\b[Ii]ssues? #?\d+|\b[Ii]ssue's\b|(?<![\w&/])#\d{1,4}\b(?![0-9a-fA-F])")


def test_product_text_names_no_issue_numbers():
    roots = [REPO / "src", REPO / "docs", REPO / "examples", REPO / "scripts", REPO / "README.md"]
    if not (REPO / "docs").is_dir():
        pytest.skip("not a source checkout")
    suffixes = {".py", ".md", ".yaml", ".yml", ".json", ".txt", ".toml"}
    hits = []
    for root in roots:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.suffix in suffixes]
        for p in files:
            if "egg-info" in str(p) or not p.is_file():
                continue
            for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if _ISSUE_REF.search(line):
                    hits.append(f"{p.relative_to(REPO)}:{i}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)
