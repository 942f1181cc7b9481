"""Two FashionVL compare folders that differ in one setting, run by run: a - b per preset, seed
and task with 95% paired bootstrap intervals over the same test examples (e.g. `--bf16` against
fp32 on the same seeds).

    python scripts/fashionvl_paired.py runs/fashionvl_bf16 runs/fashionvl_seeds [--out docs/results/x]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adapterkit.errors import AdapterKitError
from adapterkit.safeio import atomic_write_json, atomic_write_text
from adapterkit.vl import benchmark as B


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--out", default=None, help="folder for paired.json and paired.md")
    a = ap.parse_args()
    try:
        res = B.paired_folders(a.a, a.b)
    except AdapterKitError as e:
        raise SystemExit(f"error: {e}") from None
    md = B.paired_table(res)
    print(md)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "paired.json", res)
        atomic_write_text(out / "paired.md", md + "\n")


if __name__ == "__main__":
    main()
