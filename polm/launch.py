"""Run one stage in this process; used as the per-rank entry point of multi-process training.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m polm.launch \
        --stage align.sft --from CKPT --out DIR --settings settings.json

Every rank runs the same stage function; the Trainer (through accelerate) sets up DDP with
gloo on CPU or NCCL on GPUs, and only rank 0 writes the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from polm.errors import PolmError


def launch(stage: str, inputs: list, settings, out: Path, nproc: int):
    """Run ``stage`` in ``nproc`` processes and return the checkpoint rank 0 wrote."""
    from polm.checkpoint import Checkpoint

    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = out.parent / f".{out.name}.settings.json"
    spec.write_text(settings.model_dump_json())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "polm.launch",
        "--stage",
        stage,
        "--out",
        str(out),
        "--settings",
        str(spec),
        "--from",
        *[str(c.path) for c in inputs],
    ]
    try:
        proc = subprocess.run(cmd)
    finally:
        spec.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise PolmError(
            f"{stage} failed in one of its {nproc} processes (exit code "
            f"{proc.returncode}); see the output above."
        )
    return Checkpoint.open(out)


def main() -> None:
    from polm.checkpoint import Checkpoint
    from polm.registry import stage_function
    from polm.settings import parse_settings

    p = argparse.ArgumentParser()
    p.add_argument("--stage", required=True)
    p.add_argument("--from", dest="inputs", nargs="+", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--settings", required=True, type=Path)
    a = p.parse_args()
    settings = parse_settings(a.stage, json.loads(a.settings.read_text()))
    try:
        stage_function(a.stage)([Checkpoint.open(i) for i in a.inputs], settings, a.out)
        _finish(barrier=True)
    except BaseException:
        _finish(barrier=False)
        raise


def _finish(barrier: bool) -> None:
    """Leave the process group explicitly: a rank that exits with gloo's threads still running
    can abort ("terminate called without an active exception") after the work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except PolmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
