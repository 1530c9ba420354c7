"""Speculative decoding on the transformers backend: single-stream greedy decode speed of a
tiny-base teacher alone and with distilled drafts, side by side in one run, as ratios.

    .venv/bin/python bench/speculative.py [--steps 200] [--requests 16] [--threads 2]

The teacher: a full SFT of builtin:tiny-base on ``add`` (``--steps``). The drafts: students
distilled from it (``optimize.distill``, the teacher's own answers as targets, ``seq_kd``),
one of half its depth (``every_other``, 2 of 4 layers) and one of a single layer, each run by
transformers and, exported to ONNX (fp32), by onnxruntime-genai. Each
configuration answers the same ``--requests`` held-out prompts one at a time (greedy, at most
48 tokens), in-process through the serving backend; the answers must be the teacher's own, and
the table gives tokens/s, the acceptance rate (draft tokens the teacher accepted) and the
speed-up over the teacher alone. On a model this small a forward pass costs about the same
whatever its length, so a draft pays only when it is much cheaper than the teacher and right
most of the time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
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


def decode(state, prompts: list[str]) -> tuple[list[str], float, int]:
    """The answers, one request at a time, the seconds they took and the tokens made."""
    import httpx
    from openai import AsyncOpenAI

    from serve.app import build_app

    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(state)))
    c = AsyncOpenAI(base_url="http://polm.bench/v1", api_key="-", http_client=http)

    async def one(prompt):
        r = await c.chat.completions.create(
            model=state.model_id,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=48,
            temperature=0,
        )
        return r.choices[0].message.content, r.usage.completion_tokens

    answers, tokens, start = [], 0, time.perf_counter()
    for p in prompts:
        text, n = asyncio.run(one(p))
        answers.append(text)
        tokens += n
    return answers, time.perf_counter() - start, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    from rich.console import Console
    from rich.table import Table

    from polm.tasks import get_task
    from serve.state import ServerState, load_state

    work = Path(tempfile.mkdtemp(prefix="polm-bench-speculative-"))
    try:
        teacher, drafts = build(work, a.steps)
        prompts = [ex.prompt for ex in get_task("add").examples("test", a.requests)]
        runs = [("teacher alone", None, 0)]
        runs += [(f"+ {name} draft, k={k}", d, k) for name, d in drafts.items() for k in (2, 4)]
        rows, reference, alone = [], None, None
        for label, draft, k in runs:
            state = load_state(
                ServerState(),
                str(teacher.path),
                "transformers",
                draft=str(draft.path) if draft else "none",
                draft_tokens=k or 4,
            )
            assert state.ready, state.failed
            decode(state, prompts[:2])  # warm-up
            before = dict(state.backend.stats["draft"])
            answers, seconds, tokens = decode(state, prompts)
            counts = {key: state.backend.stats["draft"][key] - before[key] for key in before}
            state.backend.close()
            reference = reference or answers
            rate = tokens / seconds
            alone = alone or rate
            accepted = counts["accepted"] / counts["proposed"] if counts["proposed"] else None
            rows.append((label, rate, accepted, rate / alone, answers == reference))
        table = Table(title=f"greedy decode, one request at a time ({a.requests} add prompts)")
        for col in ("configuration", "tok/s", "accepted", "vs alone", "same answers"):
            table.add_column(col, justify="left" if col == "configuration" else "right")
        for label, rate, accepted, ratio, same in rows:
            table.add_row(
                label,
                f"{rate:.0f}",
                "-" if accepted is None else f"{accepted:.0%}",
                f"{ratio:.2f}x",
                "yes" if same else "NO",
            )
        Console().print(table)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
