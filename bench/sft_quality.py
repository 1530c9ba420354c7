"""How far SFT takes builtin:tiny-base on `add` within a fixed step budget, per seed.

    .venv/bin/python bench/sft_quality.py [--seeds 0 1] [--full-steps 400] [--lora-steps 600]

Prints held-out exact-match accuracy (500 test examples) and wall time of each run beside the
base model's, so the budgets in recipes and tests can be checked on any machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from align.sft import SFTSettings, run
    from polm.evaluate import evaluate_checkpoint
    from polm.importer import import_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--full-steps", type=int, default=400)
    p.add_argument("--lora-steps", type=int, default=600)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="polm-bench-"))
    base = import_model("builtin:tiny-base", work / "base")
    table = Table(title="SFT on add, builtin:tiny-base")
    for col in ("method", "seed", "steps", "train s", "add acc (500)"):
        table.add_column(col)
    table.add_row(
        "base", "-", "0", "-", f"{evaluate_checkpoint(base, ['add'])['eval.add.accuracy']:.1%}"
    )
    runs = [("full", a.full_steps, {}), ("lora", a.lora_steps, {"learning_rate": 5e-3})]
    for method, steps, extra in runs:
        for seed in a.seeds:
            t0 = time.perf_counter()
            ckpt = run(
                [base],
                SFTSettings(task="add", method=method, max_steps=steps, seed=seed, **extra),
                work / f"{method}-{seed}",
            )
            wall = time.perf_counter() - t0
            acc = evaluate_checkpoint(ckpt, ["add"])["eval.add.accuracy"]
            table.add_row(method, str(seed), str(steps), f"{wall:.0f}", f"{acc:.1%}")
    Console().print(table)


if __name__ == "__main__":
    main()
