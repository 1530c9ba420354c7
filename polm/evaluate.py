"""The evaluation suite run on every stage's output: task accuracy, perplexity, size, params.

Accuracy is exact match of the final answer under batched greedy decoding on a task's fixed
test split; perplexity is measured on held-out synthetic prose (the same text for every
checkpoint, so numbers compare along a lineage).

Memory stays bounded whatever the vocabulary: a forward pass that needs logits at every
position (perplexity, completion log-probabilities) takes only as many rows as keep its fp32
logits within ``LOGITS_BUDGET`` (a 262k-token vocabulary, Gemma 3's, is 1 MiB per position),
and generation keeps the logits of the last position only (no scores retained). Decoding stops
at the task's answer length, derived from its reference answers (:func:`answer_tokens`),
instead of a fixed 48 tokens.
"""

from __future__ import annotations

import math

from polm.checkpoint import weights_bytes
from polm.errors import PolmError
from polm.tasks import get_task

MAX_NEW_TOKENS = 48
# bytes of fp32 logits one forward pass may hold (the loss holds about as much again): on Gemma
# 3 270M's 262k vocabulary, 96 MB kept the GPTQ model's evaluation at 2.45 GB peak RSS against
# 2.99 GB with 256 MB, in the same time (AMD EPYC, 2 cores)
LOGITS_BUDGET = 96 * 2**20
ANSWER_SLACK = 8  # tokens beyond the longest reference answer (end token, near misses)


def vocab_size(model) -> int:
    """Rows of the model's output head (the logits' last dimension)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size", None) or getattr(config, "vocab_size", 0) or 1)


def rows_per_batch(model, tokens_per_row: int, cap: int, budget: int | None = None) -> int:
    """Rows one forward pass may take so that its fp32 logits (rows x tokens x vocabulary)
    stay within ``budget`` bytes (default ``LOGITS_BUDGET``); at least one row, at most
    ``cap``."""
    per_row = 4 * vocab_size(model) * max(1, tokens_per_row)
    return max(1, min(cap, (budget or LOGITS_BUDGET) // per_row))


def answer_tokens(task: str, count) -> int:
    """Tokens a greedy answer to ``task`` may take: its longest reference answer on the test
    split (``count(text)`` tokens, in the model's tokenizer) plus a slack for the end token and
    near misses; a longer answer cannot match the reference any more."""
    longest = max(count(e.answer) for e in get_task(task).examples("test"))
    return longest + max(ANSWER_SLACK, longest // 4)


def hf_answer_tokens(tokenizer, task: str) -> int:
    """:func:`answer_tokens` with a transformers tokenizer."""
    return answer_tokens(task, lambda t: len(tokenizer(t, add_special_tokens=False).input_ids))


def chat_prompt(tokenizer, prompt: str, tools=None) -> str:
    """A user turn rendered with the chat template (and ``tools``, when the task has them),
    ready for the assistant's answer."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        tools=list(tools) if tools else None,
    )


def generate_texts(model, tokenizer, texts: list[str], max_new_tokens: int, **sampling):
    """Decoded continuations of ``texts`` (left-padded, one batch); with
    ``num_return_sequences`` in ``sampling``, that many per text, in order."""
    import torch

    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    from polm.virtual import generate_kwargs

    virtual = generate_kwargs(model, enc)
    if virtual is not None:  # the base model, its virtual tokens put in front by hand
        model, enc = virtual
    with torch.no_grad():
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            # only the last position's logits, never the scores of every step
            return_dict_in_generate=False,
            output_scores=False,
            output_logits=False,
            **sampling,
        )
    start = 0 if "inputs_embeds" in enc else enc["input_ids"].shape[1]  # embeds: new tokens only
    return tokenizer.batch_decode(gen[:, start:], skip_special_tokens=True)


def greedy_generate(
    model,
    tokenizer,
    prompts: list[str],
    batch_size: int = 128,
    max_new_tokens: int = MAX_NEW_TOKENS,
    tools=None,
) -> list[str]:
    """Greedy completions for chat ``prompts`` (user turns, asked with ``tools`` when given),
    decoded in left-padded batches (as many rows as keep one step's logits, and their processed
    copies, within budget)."""
    outs: list[str] = []
    # one position's logits a row, and the copies generate's logits processors make of them
    batch_size = rows_per_batch(model, 4, batch_size)
    for i in range(0, len(prompts), batch_size):
        texts = [chat_prompt(tokenizer, p, tools) for p in prompts[i : i + batch_size]]
        outs += generate_texts(model, tokenizer, texts, max_new_tokens, do_sample=False)
    return outs


def sample_generate(
    model,
    tokenizer,
    prompts: list[str],
    num_return_sequences: int,
    temperature: float,
    batch_size: int = 64,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[list[str]]:
    """``num_return_sequences`` sampled completions for each chat prompt (seed beforehand)."""
    k = num_return_sequences
    outs: list[list[str]] = []
    batch_size = rows_per_batch(model, 4 * k, batch_size)  # k rows a prompt
    for i in range(0, len(prompts), batch_size):
        texts = [chat_prompt(tokenizer, p) for p in prompts[i : i + batch_size]]
        flat = generate_texts(
            model,
            tokenizer,
            texts,
            max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            num_return_sequences=k,
        )
        outs += [flat[j : j + k] for j in range(0, len(flat), k)]
    return outs


def task_accuracy(task: str, n: int | None, answer) -> dict:
    """Exact-match accuracy on the task's test split (first ``n`` examples when given), with
    ``answer(prompts) -> completions`` doing the decoding (torch, ONNX, ...)."""
    t = get_task(task)
    examples = t.examples("test", n)
    completions = answer([e.prompt for e in examples])
    correct = sum(t.score(c, e) for c, e in zip(completions, examples))
    return {"accuracy": correct / len(examples), "n": len(examples)}


def accuracy(model, tokenizer, task: str, n: int | None = None, batch_size: int = 128) -> dict:
    """Exact-match accuracy of a torch model on the task's test split, decoding no further
    than the task's answer length."""
    new = hf_answer_tokens(tokenizer, task)
    tools = get_task(task).tools

    def answer(prompts):
        return greedy_generate(model, tokenizer, prompts, batch_size, new, tools)

    return task_accuracy(task, n, answer)


PERPLEXITY_LINES = 200


def perplexity(model, tokenizer, n: int = PERPLEXITY_LINES) -> float:
    """Perplexity on ``n`` lines of held-out synthetic prose."""
    import torch

    from polm.corpus import prose

    total, count = 0.0, 0
    tokenizer.padding_side = "right"
    lines = [tokenizer.bos_token + s + tokenizer.eos_token for s in prose("heldout", n)]
    lengths = [len(ids) for ids in tokenizer(lines, add_special_tokens=False).input_ids]
    # shortest first, so that each batch pads to its own longest line, not the corpus's (lines
    # run 16-72 tokens: in corpus order 45% of the positions were padding)
    lines = [line for _, line in sorted(zip(lengths, lines), key=lambda x: x[0])]
    width = max(lengths)
    rows = rows_per_batch(model, width, 64)
    for i in range(0, len(lines), rows):
        enc = tokenizer(
            lines[i : i + rows], return_tensors="pt", padding=True, add_special_tokens=False
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


DECODE_TOKENS = 32
DECODE_PROMPT = "Add 1234 and 5678."


def decode_rate(generate, n: int = DECODE_TOKENS) -> float | None:
    """Single-stream decode speed, tokens/s, best of two after a warm-up: ``generate(k)`` makes
    ``k`` new tokens for one prompt and returns None (the prefill and first token, timed by
    ``generate(1)``, are then subtracted) or (tokens after the first, seconds they took). None
    when too few tokens came out."""
    import time

    generate(2)  # warm-up: kernels, caches, allocator
    best = None
    for _ in range(2):
        t0 = time.perf_counter()
        generate(1)
        t1 = time.perf_counter()
        made = generate(n + 1)
        t2 = time.perf_counter()
        tokens, spent = made if made is not None else (n, (t2 - t1) - (t1 - t0))
        if tokens >= n // 2 and spent > 0:
            rate = tokens / spent
            best = rate if best is None else max(best, rate)
    return None if best is None else round(best, 1)


def torch_decode_rate(model, tokenizer) -> float:
    import torch

    enc = tokenizer(
        [chat_prompt(tokenizer, DECODE_PROMPT)], return_tensors="pt", add_special_tokens=False
    ).to(model.device)

    def generate(k: int) -> None:
        with torch.no_grad():
            model.generate(
                **enc,
                max_new_tokens=k,
                min_new_tokens=k,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )

    return decode_rate(generate)


size_bytes = weights_bytes  # the name the stages and the report read


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


PAIR = ("chosen", "rejected")


def _encode_pairs(tokenizer, rows: list[dict], keys: tuple[str, ...] = PAIR):
    """Chat-render each row's prompt + each of ``keys`` (chosen and rejected by default); return
    ids and the prompt lengths (the completion is what follows the prompt)."""
    seqs, prompt_lens = [], []
    for r in rows:
        tools = r.get("tools")
        prompt = tokenizer.apply_chat_template(
            r["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True, tools=tools
        )["input_ids"]
        for key in keys:
            full = tokenizer.apply_chat_template(
                r["prompt"] + r[key], tokenize=True, return_dict=True, tools=tools
            )["input_ids"]
            seqs.append(full)
            prompt_lens.append(len(prompt))
    return seqs, prompt_lens


def _padded(seqs: list[list[int]], pad_id: int, device):
    import torch

    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def completion_token_logprobs(
    model, tokenizer, rows: list[dict], batch_size: int = 128, keys: tuple[str, ...] = PAIR
) -> list[list[float]]:
    """The log-probability of each token of each row's completions (each of ``keys``, chosen
    and rejected by default, interleaved), the chat template's closing tokens included: what a
    server reports as each chosen token's ``logprob``."""
    import torch

    seqs, prompt_lens = _encode_pairs(tokenizer, rows, keys)
    out: list[list[float]] = []
    batch_size = rows_per_batch(model, max(map(len, seqs), default=1), batch_size)
    for i in range(0, len(seqs), batch_size):
        ids, mask = _padded(seqs[i : i + batch_size], tokenizer.pad_token_id, model.device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1] :].float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        for j, plen in enumerate(prompt_lens[i : i + batch_size]):
            n = int(mask[j].sum())
            out.append(logp[j, plen - 1 : n - 1].tolist())
    return out


def completion_logprobs(model, tokenizer, rows: list[dict], batch_size: int = 128) -> list[float]:
    """Summed log-probability of each chosen and rejected completion, interleaved."""
    return [sum(lp) for lp in completion_token_logprobs(model, tokenizer, rows, batch_size)]


def preference_accuracy(model, tokenizer, task: str, n: int | None = None) -> dict:
    """Share of held-out pairs where the chosen answer is more likely than the rejected one."""
    from polm.preference import preference_pairs

    return _chosen_wins(completion_logprobs(model, tokenizer, preference_pairs(task, "test", n)))


def reward_scores(
    model, tokenizer, rows: list[dict], batch_size: int = 128, keys: tuple[str, ...] = PAIR
) -> list[float]:
    """A reward model's score of each row's conversations (prompt + each of ``keys``; chosen and
    rejected by default), interleaved."""
    import torch

    seqs, _ = _encode_pairs(tokenizer, rows, keys)
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = _padded(seqs[i : i + batch_size], tokenizer.pad_token_id, model.device)
        with torch.no_grad():
            out += model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
    return out


def score_completions(model, tokenizer, prompts: list, completions: list) -> list[float]:
    """A reward model's score of each (prompt messages, completion messages) conversation."""
    rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    return reward_scores(model, tokenizer, rows, keys=("completion",))


def pairwise_accuracy(model, tokenizer, task: str, n: int | None = None) -> dict:
    """Share of held-out pairs a reward model scores chosen above rejected."""
    from polm.preference import preference_pairs

    return _chosen_wins(reward_scores(model, tokenizer, preference_pairs(task, "test", n)))


def _chosen_wins(scores: list[float]) -> dict:
    """From interleaved (chosen, rejected) scores: the share of pairs the chosen one wins."""
    wins = [c > r for c, r in zip(scores[0::2], scores[1::2])]
    return {"accuracy": sum(wins) / len(wins), "n": len(wins)}


def export_parity(parent, lm, task, n: int, max_new_tokens: int):
    """Greedy answers of an export (``lm.greedy``: ONNX, GGUF) against its torch ``parent``'s
    on ``n`` test prompts of each task: (share identical, prompts, torch model, tokenizer)."""
    from polm.loading import load_model
    from polm.stage import load_prompts

    prompts = [p.text for p in load_prompts(task, None, "test", n)]
    model, tokenizer = load_model(parent)
    ours = lm.greedy(prompts, max_new_tokens)
    want = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    same = sum(a == b for a, b in zip(ours, want)) / len(prompts)
    return same, prompts, model, tokenizer


def runtime_metrics(lm, tasks: list[str], n: int | None, count_tokens) -> dict:
    """Accuracy per task and decode speed of a model run outside torch (``polm.onnxrt.OnnxLM``,
    ``polm.llamacpp.GgufLM``: ``greedy``, ``chat_prompt``, ``decode_exactly``)."""
    metrics: dict = {}
    for task in tasks:
        if get_task(task).tools:
            raise PolmError(
                f"task {task!r} asks with tools: it is evaluated on torch checkpoints and "
                "through the server (the onnx and gguf runtimes' evaluation renders no tools)"
            )
        new = answer_tokens(task, count_tokens)
        result = task_accuracy(task, n, lambda ps, new=new: lm.greedy(ps, new))
        metrics[f"eval.{task}.accuracy"] = result["accuracy"]
        metrics[f"eval.{task}.n"] = result["n"]
    text = lm.chat_prompt(DECODE_PROMPT)
    rate = decode_rate(lambda k: lm.decode_exactly(text, k))
    if rate is not None:
        metrics["decode_tokens_per_s"] = rate
    return metrics


def evaluate_checkpoint(
    ckpt, tasks: list[str], n: int | None = None, with_perplexity: bool = True
) -> dict:
    """The suite run after every stage; returns flat manifest metrics.

    A causal LM gets ``eval.<task>.accuracy`` (greedy exact match), ``eval.<task>.
    preference_accuracy`` (chosen more likely than rejected on held-out pairs) and perplexity;
    a reward model gets ``eval.<task>.pairwise_accuracy``.
    """
    import torch

    from polm.loading import is_reward_model, load_model, load_reward_model
    from polm.resources import release_free_memory

    # the stage that just ran may leave its model and trainer in reference cycles: collect
    # them before a second model is loaded (the runner evaluates in the stage's process)
    release_free_memory()
    metrics: dict = {"size_bytes": size_bytes(ckpt.path)}
    if ckpt.format == "gguf":  # llama.cpp: accuracy, perplexity, decode speed
        from polm.llamacpp import GgufLM

        lm = GgufLM(ckpt.path, logits_all=with_perplexity)
        metrics |= runtime_metrics(lm, tasks, n, lambda t: len(lm.tokenize(t)))
        if with_perplexity:
            from polm.corpus import prose

            metrics["perplexity"] = lm.perplexity(prose("heldout", PERPLEXITY_LINES))
        return metrics
    if ckpt.format == "onnx":  # onnxruntime-genai alone: accuracy and decode speed
        from polm.onnxrt import OnnxLM

        lm = OnnxLM(ckpt.path)
        return metrics | runtime_metrics(lm, tasks, n, lambda t: len(lm.tokenizer.encode(t)))
    torch.manual_seed(0)
    if is_reward_model(ckpt):
        model, tokenizer = load_reward_model(ckpt)
        metrics["params"] = param_count(model)
        for task in tasks:
            result = pairwise_accuracy(model, tokenizer, task, n)
            metrics[f"eval.{task}.pairwise_accuracy"] = result["accuracy"]
            metrics[f"eval.{task}.n"] = result["n"]
        return metrics
    model, tokenizer = load_model(ckpt)
    if ckpt.format != "gptq":  # packed GPTQ weights are buffers: the stage counted them
        metrics["params"] = param_count(model)
    if ckpt.format == "hf":  # quantized formats record their own (packed) bits per weight
        metrics["bits_per_weight"] = 8 * metrics["size_bytes"] / max(1, metrics["params"])
    for task in tasks:
        result = accuracy(model, tokenizer, task, n)
        metrics[f"eval.{task}.accuracy"] = result["accuracy"]
        metrics[f"eval.{task}.n"] = result["n"]
        pref = preference_accuracy(model, tokenizer, task, n)
        metrics[f"eval.{task}.preference_accuracy"] = pref["accuracy"]
    if with_perplexity:
        metrics["perplexity"] = perplexity(model, tokenizer)
    rate = torch_decode_rate(model, tokenizer)
    if rate is not None:
        metrics["decode_tokens_per_s"] = rate
    return metrics
