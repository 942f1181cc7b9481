"""``adapterkit bench``: training-step and inference benchmarks of adapter methods and peers.

See docs/benchmarks.md. Programmatic use::

    from adapterkit.bench import Settings, get_shape, run_bench, select_cases, to_markdown
    rep = run_bench(get_shape("tiny"), Settings("cpu", "fp32", 8, 32, 8, steps=5, warmup=2),
                    select_cases("single_*"))
    print(to_markdown(rep))
"""

from adapterkit.bench.cases import CASES, PRESETS, select_cases
from adapterkit.bench.report import check_targets, to_markdown
from adapterkit.bench.runner import Settings, run_bench
from adapterkit.bench.shapes import SHAPES, get_shape

__all__ = ["CASES", "PRESETS", "SHAPES", "Settings", "check_targets", "get_shape", "run_bench", "select_cases",
           "to_markdown"]
