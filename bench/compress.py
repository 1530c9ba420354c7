"""Side by side, in one run: polm's GPTQ stage vs GPTQModel called directly (same model, same
calibration, same settings), and decode speed of the ONNX int4 export (onnxruntime-genai) vs
the torch model it came from.

    .venv/bin/python bench/compress.py [--model DIR] [--repeats 3] [--tokens 64]

Without --model it imports builtin:tiny-base. Wall times are the median of the repeats, the
two GPTQ paths alternating; polm's time covers its whole stage (calibration data, GPTQModel,
checks, manifest), GPTQModel's covers load, quantize and save. Decode speed is batch 1,
greedy, ``--tokens`` new tokens forced (no early stop), after one warm-up run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gptq_side_by_side(parent, settings, repeats: int, work: Path) -> tuple[float, float]:
    import contextlib
    import io

    import torch

    from optimize.gptq import _gptqmodel, calibration_texts
    from optimize.gptq import run as polm_gptq
    from polm.loading import load_tokenizer

    gptqmodel = _gptqmodel()  # imported once, outside both timings
    tokenizer = load_tokenizer(parent.path)
    texts = calibration_texts(settings, tokenizer)

    def direct(out):
        config = gptqmodel.QuantizeConfig(
            bits=settings.bits,
            group_size=settings.group_size,
            desc_act=settings.desc_act,
            sym=settings.sym,
            damp_percent=settings.damp_percent,
            offload_to_disk=False,
        )
        q = gptqmodel.GPTQModel.load(str(parent.path), config, device="cpu", dtype=torch.float32)
        q.quantize(texts, batch_size=settings.batch_size, tokenizer=tokenizer)
        with contextlib.redirect_stdout(io.StringIO()):
            q.save(str(out))

    ours, theirs = [], []
    for i in range(repeats):
        t = time.perf_counter()
        direct(work / f"direct{i}")
        theirs.append(time.perf_counter() - t)
        t = time.perf_counter()
        polm_gptq([parent], settings, work / f"polm{i}")
        ours.append(time.perf_counter() - t)
    return statistics.median(ours), statistics.median(theirs)


def decode_speed(parent, onnx_dir: Path, tokens: int, repeats: int) -> tuple[float, float]:
    import torch

    from polm.evaluate import chat_prompt
    from polm.loading import load_model
    from polm.onnxrt import OnnxLM

    model, tokenizer = load_model(parent)
    text = chat_prompt(tokenizer, "123+456")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids

    def torch_run():
        with torch.no_grad():
            model.generate(
                ids,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )

    lm = OnnxLM(onnx_dir)
    og = lm.og
    prompt = lm.tokenizer.encode(text)

    def onnx_run():
        params = og.GeneratorParams(lm.model)
        params.set_search_options(
            max_length=len(prompt) + tokens, min_length=len(prompt) + tokens, do_sample=False
        )
        gen = og.Generator(lm.model, params)
        gen.append_tokens(prompt)
        while not gen.is_done():
            gen.generate_next_token()

    speeds = {}
    for name, fn in (("torch", torch_run), ("onnx", onnx_run)):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        speeds[name] = tokens / statistics.median(times)
    return speeds["onnx"], speeds["torch"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="an hf checkpoint directory (default: builtin:tiny-base)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    a = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    from optimize.gptq import GPTQSettings
    from optimize.onnx import OnnxSettings
    from optimize.onnx import run as onnx_export
    from polm.checkpoint import Checkpoint
    from polm.importer import import_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if a.model:
            parent = Checkpoint.open(a.model)
        else:
            parent = import_model("builtin:tiny-base", work / "base")
        settings = GPTQSettings(bits=a.bits, group_size=32, task="add", n_calibration=128)
        ours, theirs = gptq_side_by_side(parent, settings, a.repeats, work)
        print(f"GPTQ {a.bits}-bit, {parent.path.name}, {settings.n_calibration} samples")
        print(f"  polm optimize.gptq   {ours:7.2f} s")
        print(f"  GPTQModel directly   {theirs:7.2f} s")
        print(f"  ratio polm/direct    {ours / theirs:7.3f}  (target <= 1.05)")
        onnx = onnx_export([parent], OnnxSettings(precision="int4", parity_n=0), work / "onnx-int4")
        og_speed, torch_speed = decode_speed(parent, onnx.path, a.tokens, a.repeats)
        print(f"decode, batch 1, {a.tokens} new tokens")
        print(f"  onnxruntime-genai int4   {og_speed:9.1f} tokens/s")
        print(f"  torch fp32 generate      {torch_speed:9.1f} tokens/s")
        print(f"  ratio onnx/torch         {og_speed / torch_speed:9.2f}x")


if __name__ == "__main__":
    main()
