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
import shutil
import tempfile
from pathlib import Path

import yaml

os.environ.setdefault("TQDM_DISABLE", "1")
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "moe.yaml"


def measure(n: int = 500) -> list[dict]:
    """Per task: the expert's and the MoE's accuracy on ``n`` test examples, and the share of
    the task's tokens routed to its own expert."""
    from align.sft import SFTSettings
    from align.sft import run as sft
    from merge.moe import MoESettings
    from merge.moe import run as moe
    from polm.evaluate import evaluate_checkpoint
    from polm.importer import import_model

    stages = yaml.safe_load(RECIPE.read_text())["stages"]
    work = Path(tempfile.mkdtemp(prefix="polm-bench-moe-"))
    base = import_model("builtin:tiny-base", work / "base")
    experts = {
        task: sft([base], SFTSettings(**stages[sid]["with"]), work / sid)
        for task, sid in (("add", "add_expert"), ("reverse", "reverse_expert"))
    }
    out = moe([base, *experts.values()], MoESettings(**stages["moe"]["with"]), work / "moe")
    rows = []
    for task, expert in experts.items():
        expert_acc, moe_acc = (
            evaluate_checkpoint(c, [task], n=n, with_perplexity=False)[f"eval.{task}.accuracy"]
            for c in (expert, out)
        )
        routed = out.manifest.metrics[f"moe.routing.{task}.{expert.path.name}"]
        rows.append({"task": task, "expert": expert_acc, "moe": moe_acc, "routed": routed})
    shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500, help="test examples per task")
    a = p.parse_args()
    table = Table(title=f"recipes/moe.yaml, {a.n} test examples per task")
    for col in ("task", "expert acc", "MoE acc", "MoE / expert", "routed to own expert"):
        table.add_column(col, justify="right")
    for r in measure(a.n):
        table.add_row(
            r["task"],
            f"{r['expert']:.1%}",
            f"{r['moe']:.1%}",
            f"{r['moe'] / r['expert']:.3f}",
            f"{r['routed']:.1%}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
