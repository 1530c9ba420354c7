"""One-shot pruning of a model's linear layers by a calibration-aware criterion, with recovery
by distillation from the dense parent while the pruned weights stay zero.

- ``wanda`` (Sun et al., arXiv 2306.11695): a weight's score is its magnitude times the norm of
  the input feature it multiplies, ``|W_ij| * ||X_j||``, over calibration tokens; the lowest
  scores of each output row are removed. Layers are pruned in order, decoder layer by decoder
  layer, each calibrated on the inputs the layers before it (already pruned) give it, as the
  paper's implementation does. No weight update, no Hessian.
- ``magnitude``: ``|W_ij|`` alone, the baseline Wanda is measured against.

``sparsity`` is the share removed from every row (unstructured), or ``pattern: "2:4"`` keeps
N of every M consecutive weights of a row (N:M, what sparse tensor cores run). The layers are
the decoder blocks' linear layers (attention and MLP projections); embeddings, norms, the head
and MoE routers are kept whole. SparseGPT (arXiv 2301.00774), which also updates the kept
weights, has no maintained implementation that takes a transformers model on CPU (its
reference code and llm-compressor's modifier need their own pipelines and a GPU), so it is not
offered.

Recovery (on by default; ``recovery: false`` for the one-shot model) distills the dense parent
into the pruned model with ``optimize.distill``'s losses and data (its data from the parent's
lineage when none is given), the pruned weights' gradients masked and the weights zeroed again
after every step, so the pattern holds. The output is an ``hf`` checkpoint whose pruned weights
are zeros; the manifest records the sparsity reached, overall and per layer
(``prune.layers``), and the accuracy before recovery.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from optimize.distill import RecoverySettings, before_recovery, build_dataset, recover
from polm.checkpoint import Checkpoint, staging
from polm.stage import single_input, with_parent_data

STAGE = "optimize.prune"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PruneSettings(RecoverySettings):
    """Settings of ``optimize.prune``; the recovery fields are ``optimize.distill``'s."""

    method: Literal["wanda", "magnitude"] = Field(
        default="wanda", description="wanda (|weight| x input-feature norm) or magnitude."
    )
    sparsity: float = Field(
        default=0.5, gt=0, lt=1, description="Share of each row's weights removed (unstructured)."
    )
    pattern: str | None = Field(
        default=None,
        description="N:M instead of unstructured: N of every M consecutive weights of a row are "
        "kept (2:4, 4:8); sparsity is then 1 - N/M.",
    )
    n_calibration: int = Field(
        default=64, gt=0, description="Calibration examples (the task's or dataset's prompts)."
    )
    max_steps: int = Field(default=200, description="Recovery steps.")

    @field_validator("pattern")
    @classmethod
    def _n_of_m(cls, v: str | None) -> str | None:
        if v is None:
            return v
        n, _, m = v.partition(":")
        if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise ValueError(f"must be N:M with 0 < N < M, like 2:4; got {v!r}")
        return v

    def target(self) -> float:
        if self.pattern is None:
            return self.sparsity
        n, m = (int(x) for x in self.pattern.split(":"))
        return 1 - n / m


def prunable(model) -> list[list[str]]:
    """The names of the linear layers to prune, grouped by decoder layer, in order."""
    import torch

    groups: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LINEAR:
            layer = name.split(".self_attn")[0].split(".mlp")[0]
            groups.setdefault(layer, []).append(name)
    return list(groups.values())


def mask_for(weight, score, s: PruneSettings):
    """The keep-mask (True: kept) of one weight matrix from its scores: the lowest of each row
    go, or the lowest of each group of M in a row."""
    import torch

    out, inp = weight.shape
    if s.pattern is not None:
        n, m = (int(x) for x in s.pattern.split(":"))
        if inp % m:
            raise ValueError(f"{inp} input features are not a multiple of {m} ({s.pattern})")
        groups = score.reshape(out, inp // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
        return keep.reshape(out, inp)
    k = int(round(inp * s.sparsity))
    keep = torch.ones_like(weight, dtype=torch.bool)
    if k:
        keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
    return keep


def calibration_batches(tokenizer, dataset, n: int, batch: int = 8):
    """Token batches (input ids and attention mask) of the first ``n`` examples' prompts and
    answers, rendered with the chat template."""
    rows = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in dataset][:n]
    for i in range(0, len(rows), batch):
        yield tokenizer(rows[i : i + batch], return_tensors="pt", padding=True)


def prune_model(model, tokenizer, dataset, s: PruneSettings) -> dict[str, float]:
    """Prune ``model`` in place; the masks by layer name, and each layer's sparsity."""
    import torch

    masks, norms = {}, {}
    model.eval()

    def record(name):
        def hook(module, args, output):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            norms[name] = norms.get(name, 0) + (x * x).sum(0)

        return hook

    for group in prunable(model):
        if s.method == "wanda":
            handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in group]
            try:
                with torch.no_grad():
                    for batch in calibration_batches(tokenizer, dataset, s.n_calibration):
                        model(**batch)
            finally:
                for h in handles:
                    h.remove()
        for name in group:
            w = model.get_submodule(name).weight
            score = w.detach().abs().float()
            if s.method == "wanda":
                score = score * norms.pop(name).sqrt()[None, :]
            masks[name] = mask_for(w, score, s)
            with torch.no_grad():
                w.mul_(masks[name].to(w.dtype))
    return masks


def hold_masks(model, masks: dict):
    """Gradient hooks that zero the pruned weights' gradients, and a trainer callback that
    zeroes the weights again after every optimizer step (the pattern holds through recovery)."""
    from transformers import TrainerCallback

    for name, keep in masks.items():
        w = model.get_submodule(name).weight
        w.register_hook(lambda g, keep=keep: g * keep.to(g.dtype))

    class HoldMasks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            import torch

            with torch.no_grad():
                for name, keep in masks.items():
                    w = model.get_submodule(name).weight
                    w.mul_(keep.to(w.dtype))

    return HoldMasks()


def sparsity_of(model, names) -> dict[str, float]:
    """Each layer's share of zero weights, read from the weights themselves."""
    return {n: float((model.get_submodule(n).weight == 0).float().mean()) for n in names}


def run(inputs: list[Checkpoint], settings: PruneSettings, out: Path) -> Checkpoint:
    import copy

    import torch

    from polm.loading import load_model

    parent_ckpt = single_input(inputs, STAGE, "hf")
    s, metrics = with_parent_data(settings, parent_ckpt, STAGE, "calibration data")
    dataset = build_dataset(s)
    torch.manual_seed(s.seed)
    parent, tokenizer = load_model(parent_ckpt)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    student = copy.deepcopy(parent)
    masks = prune_model(student, tokenizer, dataset, s)
    metrics |= before_recovery(student, tokenizer, s, "prune")
    if s.recovery:
        hold = hold_masks(student, masks)
        metrics |= recover(student, parent, tokenizer, dataset, s, out, inputs, [hold])
    layers = sparsity_of(student, masks)
    pruned = sum(m.numel() for m in masks.values())
    metrics |= {
        "prune.method": s.method,
        "prune.pattern": s.pattern or "unstructured",
        "prune.target": s.target(),
        "prune.sparsity": sum(layers[n] * masks[n].numel() for n in masks) / max(1, pruned),
        "prune.layers": layers,
        "params": sum(p.numel() for p in student.parameters()),
    }
    with staging(out) as st:
        student.save_pretrained(st.dir, safe_serialization=True)
        tokenizer.save_pretrained(st.dir)
        return st.commit(
            stage=STAGE,
            format="hf",
            settings=s,
            parents=[parent_ckpt],
            seed=s.seed,
            metrics=metrics,
        )
