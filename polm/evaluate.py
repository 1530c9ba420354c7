"""The evaluation suite run on every stage's output: task accuracy, perplexity, size, params.

Accuracy is exact match of the final answer under batched greedy decoding on a task's fixed
test split; perplexity is measured on held-out synthetic prose (the same text for every
checkpoint, so numbers compare along a lineage).
"""

from __future__ import annotations

import math
from pathlib import Path

from polm.tasks import get_task

MAX_NEW_TOKENS = 48


def greedy_generate(
    model,
    tokenizer,
    prompts: list[str],
    batch_size: int = 128,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[str]:
    """Greedy completions for chat ``prompts`` (user turns), decoded in left-padded batches."""
    import torch

    tokenizer.padding_side = "left"
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chats = [[{"role": "user", "content": p}] for p in prompts[i : i + batch_size]]
        texts = [
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in chats
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with torch.no_grad():
            gen = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = gen[:, enc["input_ids"].shape[1] :]
        outs += tokenizer.batch_decode(new, skip_special_tokens=True)
    return outs


def accuracy(model, tokenizer, task: str, n: int | None = None, batch_size: int = 128) -> dict:
    """Exact-match accuracy on the task's test split (first ``n`` examples when given)."""
    t = get_task(task)
    examples = t.examples("test", n)
    completions = greedy_generate(model, tokenizer, [e.prompt for e in examples], batch_size)
    correct = sum(t.score(c, e) for c, e in zip(completions, examples))
    return {"accuracy": correct / len(examples), "n": len(examples)}


def perplexity(model, tokenizer, n: int = 200) -> float:
    """Perplexity on ``n`` lines of held-out synthetic prose."""
    import torch

    from polm.corpus import prose

    total, count = 0.0, 0
    tokenizer.padding_side = "right"
    lines = [tokenizer.bos_token + s + tokenizer.eos_token for s in prose("heldout", n)]
    for i in range(0, len(lines), 64):
        enc = tokenizer(
            lines[i : i + 64], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(model.device)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        with torch.no_grad():
            # prompt tuning prepends virtual tokens to the logits: keep the text's positions
            logits = model(**enc).logits[:, -enc["input_ids"].shape[1] :][:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += nll.item()
        count += int((labels[:, 1:] != -100).sum())
    tokenizer.padding_side = "left"
    return math.exp(total / count)


def size_bytes(path: Path) -> int:
    """Bytes on disk of a checkpoint's weight files."""
    return sum(
        f.stat().st_size
        for f in Path(path).rglob("*")
        if f.suffix in (".safetensors", ".onnx", ".data") and f.is_file()
    )


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def evaluate_checkpoint(
    ckpt, tasks: list[str], n: int | None = None, with_perplexity: bool = True
) -> dict:
    """The suite run after every stage; returns flat manifest metrics (``eval.<task>.accuracy``)."""
    import torch

    from polm.loading import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(ckpt)
    metrics: dict = {"params": param_count(model), "size_bytes": size_bytes(ckpt.path)}
    for task in tasks:
        result = accuracy(model, tokenizer, task, n)
        metrics[f"eval.{task}.accuracy"] = result["accuracy"]
        metrics[f"eval.{task}.n"] = result["n"]
    if with_perplexity:
        metrics["perplexity"] = perplexity(model, tokenizer)
    return metrics
