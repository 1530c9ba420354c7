"""How much of its experts' accuracy the MoE of recipes/moe.yaml keeps, and where it routes.

    .venv/bin/python bench/moe_quality.py [--n 500]

Trains the recipe's two experts from builtin:tiny-base, assembles the MoE with the recipe's
settings, and prints each task's accuracy for its expert and for the MoE (as a ratio) beside the
share of the task's tokens routed to its own expert. Targets: ratio >= 0.95, routing >= 70%.
About 4 minutes on 2 cores. (Too slow for `make test`; the tests check routing on short runs.)
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import yaml

os.environ.setdefault("TQDM_DISABLE", "1")
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "moe.yaml"


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from align.sft import SFTSettings
    from align.sft import run as sft
    from merge.moe import MoESettings
    from merge.moe import run as moe
    from polm.evaluate import evaluate_checkpoint
    from polm.importer import import_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500, help="test examples per task")
    a = p.parse_args()
    stages = yaml.safe_load(RECIPE.read_text())["stages"]
    work = Path(tempfile.mkdtemp(prefix="polm-bench-moe-"))
    base = import_model("builtin:tiny-base", work / "base")
    experts = {
        task: sft([base], SFTSettings(**stages[sid]["with"]), work / sid)
        for task, sid in (("add", "add_expert"), ("reverse", "reverse_expert"))
    }
    out = moe([base, *experts.values()], MoESettings(**stages["moe"]["with"]), work / "moe")
    table = Table(title=f"recipes/moe.yaml, {a.n} test examples per task")
    for col in ("task", "expert acc", "MoE acc", "MoE / expert", "routed to own expert"):
        table.add_column(col, justify="right")
    for task, expert in experts.items():
        acc = [
            evaluate_checkpoint(c, [task], n=a.n, with_perplexity=False)[f"eval.{task}.accuracy"]
            for c in (expert, out)
        ]
        routed = out.manifest.metrics[f"moe.routing.{task}.{expert.path.name}"]
        table.add_row(
            task, f"{acc[0]:.1%}", f"{acc[1]:.1%}", f"{acc[1] / acc[0]:.3f}", f"{routed:.1%}"
        )
    Console().print(table)


if __name__ == "__main__":
    main()
