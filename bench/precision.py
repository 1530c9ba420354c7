"""One SFT step in fp32 and in bf16 autocast on this machine, side by side, as a ratio.

    .venv/bin/python bench/precision.py [--steps 100] [--threads 2]

Both runs are the real ``align.sft`` stage on builtin:tiny-base (task add, batch 32), timed by
the trainer's own wall clock (data preparation excluded), after an untimed 5-step warm-up of
each. ``bf16: auto`` picks bf16 only where
the CPU computes it natively (``polm.precision``); this prints what auto chose here and whether
that was the faster choice.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")


def measure(steps: int = 100, threads: int = 2) -> dict:
    """Seconds per SFT step in fp32 and in bf16, the CPU, its native bf16 flags and what
    ``bf16: auto`` resolves to here."""
    import torch

    torch.set_num_threads(threads)
    from align.sft import SFTSettings, run
    from polm.importer import import_model
    from polm.precision import NATIVE_BF16_FLAGS, cpu_flags, resolve_bf16

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if "Model name" in ln), "?"
    )
    native = sorted(cpu_flags() & set(NATIVE_BF16_FLAGS)) or ["none"]
    work = Path(tempfile.mkdtemp(prefix="polm-bench-precision-"))
    base = import_model("builtin:tiny-base", work / "base")

    def per_step_s(bf16: bool, steps: int, tag: str) -> float:
        s = SFTSettings(task="add", max_steps=steps, bf16=bf16, logging_steps=steps)
        m = run([base], s, work / f"{tag}-bf16-{bf16}").manifest.metrics
        return m["train.wall_s"] / m["train.steps"]

    for bf16 in (False, True):  # warm-up: one-time costs (kernel selection, caches) not timed
        per_step_s(bf16, 5, "warmup")
    per_step = {bf16: per_step_s(bf16, steps, "timed") for bf16 in (False, True)}
    shutil.rmtree(work, ignore_errors=True)
    return {
        "cpu": model,
        "native": native,
        "auto": resolve_bf16("auto"),
        "fp32_s": per_step[False],
        "bf16_s": per_step[True],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    from rich.console import Console
    from rich.table import Table

    m = measure(a.steps, a.threads)
    per_step = {False: m["fp32_s"], True: m["bf16_s"]}
    table = Table(title=f"SFT step, builtin:tiny-base, {a.threads} threads")
    for col in ("precision", "s / step", "vs fp32"):
        table.add_column(col, justify="right")
    table.add_row("fp32", f"{per_step[False]:.3f}", "1.00x")
    table.add_row("bf16", f"{per_step[True]:.3f}", f"{per_step[True] / per_step[False]:.2f}x")
    console = Console()
    console.print(table)
    auto = m["auto"]
    faster = per_step[True] < per_step[False]
    console.print(
        f"CPU: {m['cpu']}; native bf16 flags: {', '.join(m['native'])}; bf16: auto -> "
        f"{'bf16' if auto else 'fp32'} ({'the faster' if auto == faster else 'NOT the faster'} "
        f"here: bf16/fp32 time = {per_step[True] / per_step[False]:.2f})"
    )


if __name__ == "__main__":
    main()
