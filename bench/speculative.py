"""Speculative decoding on the transformers backend: single-stream greedy decode speed of a
tiny-base teacher alone and with distilled drafts, side by side in one run, as ratios.

    .venv/bin/python bench/speculative.py [--steps 200] [--requests 16] [--threads 2] [--rounds 3]

The teacher: a full SFT of builtin:tiny-base on ``add`` (``--steps``). The drafts: students
distilled from it (``optimize.distill``, the teacher's own answers as targets, ``seq_kd``), one
of half its depth (``every_other``, 2 of 4 layers) and one of a single layer, each run by
transformers and, exported to ONNX (fp32), by onnxruntime-genai. Each configuration answers the
same ``--requests`` held-out prompts one at a time (greedy, at most 48 tokens), through the
serving backend, each configuration in a process of its own, as a server runs it, in three
rounds taken in turn (the median is shown); the answers must be the teacher's own. The table
gives the decode rate (tokens after each answer's first, over the time from its first token to
its last: what a draft speeds up), the whole requests' tokens/s (with the chat template,
tokenizing and the prompt's pass, which a draft does not touch), the acceptance rate (draft
tokens the teacher accepted) and both speed-ups over the teacher alone. On a model this small a
forward pass costs about the same whatever its length, so a draft pays only when it is much
cheaper than the teacher and right most of the time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the repository first, not bench/ (whose serve.py would shadow the serve package)
sys.path[0] = str(Path(__file__).resolve().parents[1])
os.environ.setdefault("TQDM_DISABLE", "1")


def build(work: Path, steps: int):
    from align.sft import SFTSettings
    from align.sft import run as sft
    from optimize.distill import DistillSettings
    from optimize.distill import run as distill
    from polm.importer import import_model

    base = import_model("builtin:tiny-base", work / "base")
    teacher = sft([base], SFTSettings(task="add", max_steps=steps), work / "teacher")
    from optimize.onnx import OnnxSettings
    from optimize.onnx import run as onnx

    drafts = {}
    for name, layers in (("half depth", "every_other"), ("one layer", [0])):
        s = DistillSettings(task="add", student_layers=layers, max_steps=steps, seq_kd=True)
        student = distill([teacher], s, work / name.replace(" ", "_"))
        drafts[name] = student
        # the same student exported to ONNX (fp32), run by onnxruntime-genai
        out = work / f"{name.replace(' ', '_')}_onnx"
        drafts[f"{name} onnx"] = onnx([student], OnnxSettings(precision="fp32", parity_n=0), out)
    return teacher, drafts


def decode(state, prompts: list[str]) -> tuple[list[str], float, int, float]:
    """The answers, one request at a time through the serving backend (chat template,
    tokenizing, generation, detokenizing): the answers, the seconds they took, the tokens made,
    and the decode rate (tokens after each answer's first, over the time from its first to its
    last token: what a draft speeds up, without the request's own costs)."""
    from serve.backends.base import GenParams

    backend = state.backend

    async def one(prompt):
        ids = backend.encode(backend.render_chat([{"role": "user", "content": prompt}]))
        pieces, n, first, last = [], 0, None, None
        async for piece in backend.generate(ids, GenParams(max_tokens=48, temperature=0)):
            last = time.perf_counter()
            first = first or last
            pieces.append(piece.text)
            n = piece.completion_tokens or n
        return "".join(pieces), n, last - first

    start = time.perf_counter()
    results = [asyncio.run(one(p)) for p in prompts]
    seconds = time.perf_counter() - start
    tokens = sum(n for _, n, _ in results)
    decoding = sum(t for _, _, t in results)
    rate = sum(n - 1 for _, n, _ in results) / decoding if decoding else 0.0
    return [a for a, _, _ in results], seconds, tokens, rate


def measure(teacher: str, draft: str, k: int, requests: int, threads: int) -> dict:
    """One configuration in this process, as one server runs it: a warm-up, then the prompts."""
    import torch

    torch.set_num_threads(threads)
    from polm.tasks import get_task
    from serve.state import ServerState, load_state

    prompts = [ex.prompt for ex in get_task("add").examples("test", requests)]
    state = load_state(ServerState(), teacher, "transformers", draft=draft, draft_tokens=k)
    assert state.ready, state.failed
    decode(state, prompts[:2])  # warm-up
    before = dict(state.backend.stats["draft"])
    answers, seconds, tokens, rate = decode(state, prompts)
    counts = {key: state.backend.stats["draft"][key] - before[key] for key in before}
    state.backend.close()
    return {"rate": rate, "whole": tokens / seconds, "counts": counts, "answers": answers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--measure", nargs=3, metavar=("TEACHER", "DRAFT", "K"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        teacher, draft, k = a.measure
        print(json.dumps(measure(teacher, draft, int(k), a.requests, a.threads)))
        return
    import torch

    torch.set_num_threads(a.threads)
    from rich.console import Console
    from rich.table import Table

    work = Path(tempfile.mkdtemp(prefix="polm-bench-speculative-"))
    try:
        teacher, drafts = build(work, a.steps)
        runs = [("teacher alone", "none", 4)]
        runs += [
            (f"+ {name} draft, k={k}", str(d.path), k) for name, d in drafts.items() for k in (2, 4)
        ]
        # Each configuration runs in a process of its own, as a server does: backends loaded
        # side by side in one process slow each other (a one-layer onnx draft measured 2016
        # tok/s alone in its process, 709 beside a second teacher). Rounds in turn, each
        # configuration once a round, the median per configuration: this machine's speed
        # drifts by a third over minutes, and a drift must hit all of them.
        measured: list[list[dict]] = [[] for _ in runs]
        for _ in range(a.rounds):
            for (_, draft, k), out in zip(runs, measured):
                argv = [sys.executable, __file__, "--measure", str(teacher.path), draft, str(k)]
                argv += ["--requests", str(a.requests), "--threads", str(a.threads)]
                done = subprocess.run(argv, capture_output=True, text=True, check=True)
                out.append(json.loads(done.stdout.strip().splitlines()[-1]))
        rows, reference = [], measured[0][0]["answers"]
        alone = [statistics.median(m[key] for m in measured[0]) for key in ("rate", "whole")]
        for (label, _, _), out in zip(runs, measured):
            rate = statistics.median(m["rate"] for m in out)
            whole = statistics.median(m["whole"] for m in out)
            proposed = sum(m["counts"]["proposed"] for m in out)
            accepted = sum(m["counts"]["accepted"] for m in out) / proposed if proposed else None
            same = all(m["answers"] == reference for m in out)
            rows.append(
                (label, rate, whole, accepted, rate / alone[0], whole / alone[1], same)
            )  # fmt: skip
        table = Table(
            title=f"greedy decode, one request at a time ({a.requests} add prompts; "
            f"median of {a.rounds} rounds)"
        )
        columns = ("configuration", "decode tok/s", "request tok/s", "accepted",
                   "decode vs alone", "requests vs alone", "same answers")  # fmt: skip
        for col in columns:
            table.add_column(col, justify="left" if col == "configuration" else "right")
        for label, rate, whole, accepted, ratio, whole_ratio, same in rows:
            table.add_row(
                label,
                f"{rate:.0f}",
                f"{whole:.0f}",
                "-" if accepted is None else f"{accepted:.0%}",
                f"{ratio:.2f}x",
                f"{whole_ratio:.2f}x",
                "yes" if same else "NO",
            )
        Console(width=120).print(table)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
