"""Pretrain ``builtin:tiny-base`` from scratch on polm's synthetic corpus, bit for bit.

    python -m polm.builtin.pretrain --out polm/builtin/tiny-base

A plain PyTorch loop (nanoGPT-style) over packed blocks: at this size the loop's overhead
matters more than anything a trainer adds. It is deterministic on CPU for a given seed and
thread count (the shipped weights were made with 2 threads); ``polm inspect`` of the output
shows the content hash to compare with the shipped one.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

BLOCK = 128


def encode_documents(tokenizer, docs) -> list[int]:
    ids: list[int] = []
    for doc in docs:
        if isinstance(doc, str):
            ids += [tokenizer.bos_token_id, *tokenizer(doc)["input_ids"], tokenizer.eos_token_id]
        else:
            ids += tokenizer.apply_chat_template(doc, tokenize=True, return_dict=True)["input_ids"]
    return ids


def pretrain(
    out: Path | None,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    threads: int = 2,
    arch: str = "llama",
    log_every: int = 100,
    bf16: bool | str = "auto",
    **config_kwargs,
):
    import torch

    from polm.precision import resolve_bf16

    bf16 = resolve_bf16(bf16)

    from polm.corpus import pretraining_documents
    from polm.models import tiny_config
    from polm.tokenizer import build_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    ids = torch.tensor(encode_documents(tokenizer, pretraining_documents(40_000, seed)))
    blocks = ids[: len(ids) // BLOCK * BLOCK].view(-1, BLOCK)
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, vocab_size=len(tokenizer), tokenizer=tokenizer, **config_kwargs)
    model = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        ),
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.time()
    for step in range(steps):
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=gen)]
        # bf16 autocast where the CPU computes it natively (polm.precision); weights and the
        # optimizer stay fp32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s", flush=True)
    model.eval()
    if out is not None:
        out = Path(out)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return model, tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bf16",
        default="auto",
        type=lambda v: v if v == "auto" else v.lower() in ("1", "true", "yes", "on"),
        help="bf16 autocast: auto (where the CPU computes bf16 natively), true or false; the "
        "shipped weights were made with bf16 on an AMX CPU",
    )
    args = p.parse_args()
    pretrain(args.out, steps=args.steps, seed=args.seed, bf16=args.bf16)


if __name__ == "__main__":
    main()
