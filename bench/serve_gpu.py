"""The transformers serving backend on a CUDA GPU, beside the CPU, in one run: batched greedy
answers against one-at-a-time answers, 16 concurrent sampled streams, and decode throughput of
one stream and of 16 concurrent streams.

    python bench/serve_gpu.py [--model DIR] [--tokens 64]

Without --model it serves builtin:tiny-base (imported into a temporary directory). Needs only
torch, transformers, safetensors, pydantic and polm's sources (PYTHONPATH=.), so it runs on a
bare GPU machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


async def run_requests(backend, prompts, params):
    from serve.backends import GenParams

    async def one(prompt, seed):
        ids = backend.encode(backend.render_chat([{"role": "user", "content": prompt}]))
        text, n = "", 0
        p = GenParams(**{**params, "seed": seed})
        async for piece in backend.generate(ids, p):
            text += piece.text
            n = piece.completion_tokens or n
        return text, n

    return await asyncio.gather(*(one(p, i) for i, p in enumerate(prompts)))


def measure(device: str, ckpt, tokens: int) -> dict:
    from serve.backends.transformers import TransformersBackend

    b = TransformersBackend(ckpt, device=device)
    prompts = [
        f"Reverse the letters: {w}"
        for w in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
    ]
    greedy = {"max_tokens": tokens, "temperature": 0}
    asyncio.run(run_requests(b, prompts[:1], greedy))  # warm-up
    alone = [asyncio.run(run_requests(b, [p], greedy))[0][0] for p in prompts]
    together = [t for t, _ in asyncio.run(run_requests(b, prompts, greedy))]
    t = time.perf_counter()
    single = asyncio.run(
        run_requests(b, ["Tell me a long story."], {"max_tokens": tokens, "temperature": 1.0})
    )
    single_rate = single[0][1] / (time.perf_counter() - t)
    t = time.perf_counter()
    many = asyncio.run(
        run_requests(b, ["Tell me a long story."] * 16, {"max_tokens": tokens, "temperature": 1.0})
    )
    many_rate = sum(n for _, n in many) / (time.perf_counter() - t)
    stats = dict(b.stats)
    reference = generate_rate(b, tokens)
    b.close()
    return {
        "device": device,
        "greedy_batched_equals_alone": sum(a == c for a, c in zip(alone, together)),
        "of": len(prompts),
        "streams_ok": sum(1 for text, n in many if n > 0),
        "single_tok_s": round(single_rate, 1),
        "16_streams_tok_s": round(many_rate, 1),
        "max_rows": stats["max_rows"],
        "hf_generate_tok_s": reference,
    }


def generate_rate(b, tokens: int) -> dict:
    """The baseline: transformers' own ``generate`` on the same model, batch 1 and 16."""
    import torch

    out = {}
    for batch in (1, 16):
        ids = b.encode(b.render_chat([{"role": "user", "content": "Tell me a long story."}]))
        x = torch.tensor([ids] * batch, device=b.device)
        kw = dict(
            max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, pad_token_id=b.pad_id
        )
        with torch.inference_mode():
            b.model.generate(x, **kw)
            if b.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            b.model.generate(x, **kw)
            if b.device.startswith("cuda"):
                torch.cuda.synchronize()
        out[f"batch{batch}"] = round(batch * tokens / (time.perf_counter() - t), 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--tokens", type=int, default=64)
    a = p.parse_args()
    import torch

    from polm.checkpoint import Checkpoint
    from polm.importer import import_model

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = (
            Checkpoint.open(a.model)
            if a.model
            else import_model("builtin:tiny-base", Path(tmp) / "tiny-base")
        )
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        if torch.cuda.is_available():
            print(torch.cuda.get_device_name(0))
        for d in devices:
            print(measure(d, ckpt, a.tokens), flush=True)


if __name__ == "__main__":
    main()
