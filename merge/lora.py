"""LoRA adapters folded into their base, or combined into one adapter, with PEFT.

LoRA (Hu et al., arXiv 2106.09685) learns a low-rank update ``ΔW = (alpha / r) · B A`` per
adapted matrix; folding it into ``W`` gives a plain model that runs at the base's speed. This
stage wraps PEFT's ``merge_and_unload`` and ``add_weighted_adapter``:

- ``output_format: hf`` (default) writes the base with the adapters folded in. Without a
  ``combination_type`` every adapter is folded exactly, scaled by its weight:
  ``W + Σ wᵢ·ΔWᵢ`` (PEFT's ``merge_and_unload`` over all of them; one adapter at weight 1 is
  exactly ``PeftModel.merge_and_unload``). With a ``combination_type`` the adapters are first
  combined by PEFT into one adapter, which is then folded.
- ``output_format: peft-adapter`` writes one combined adapter whose manifest names the base as
  its first parent, so polm's loader opens it. The default combination is PEFT's ``cat``
  (exact, rank = the sum of ranks).

Combinations are PEFT's: ``linear`` (mixes the A and B factors separately, so with several
adapters it is not Σ wᵢ·ΔWᵢ; it needs equal ranks), ``cat``, ``svd``, TIES (Yadav et al., arXiv
2306.01708: ``ties``), DARE (Yu et al., arXiv 2311.03099: ``dare_linear``, ``dare_ties``),
``magnitude_prune``, and each with ``_svd`` (combine the full deltas, then re-factor to
``svd_rank``). DARE drops entries at random: ``seed`` makes the same seed write the same bytes.

Refused from the manifests and adapter configs, before any weight is read: inputs that are
neither adapters nor their base, adapters of different bases, adapters that are not LoRA, and a
quantized base (GPTQ, 1-bit), whose weights cannot absorb a float update without re-quantizing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from merge.mergekit import check_finite
from polm.checkpoint import Checkpoint
from polm.errors import PolmError
from polm.settings import StageSettings
from polm.stage import carry_files

STAGE = "merge.lora"
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # TIES / DARE task arithmetic
DENSITY = (*PRUNING, *(f"{c}_svd" for c in PRUNING))  # the types that take density
SIGN = ("ties", "dare_ties", "ties_svd", "dare_ties_svd")  # ... and majority_sign_method
SVD = ("svd", *(f"{c}_svd" for c in PRUNING))  # ... and svd_rank, svd_clamp
SAME_RANK = ("linear", *PRUNING)  # PEFT combines these factor by factor: one rank needed
Combination = Literal["linear", "cat", "svd", *DENSITY]  # type: ignore[valid-type]


class LoraMergeSettings(StageSettings):
    """Settings of ``merge.lora``, under PEFT's ``add_weighted_adapter`` names."""

    weights: list[float] | None = Field(
        default=None,
        min_length=1,
        description="One weight per adapter, in input order (default 1.0 each); negative "
        "subtracts.",
    )
    combination_type: Combination | None = Field(
        default=None,
        description="PEFT's adapter combination; default: the exact weighted sum (hf: every "
        "adapter folded in; peft-adapter: cat).",
    )
    density: float | None = Field(
        default=None, gt=0, le=1, description="Fraction kept by ties, dare and magnitude_prune."
    )
    majority_sign_method: Literal["total", "frequency"] | None = Field(
        default=None, description="TIES sign election (ties and dare_ties types; default total)."
    )
    svd_rank: int | None = Field(
        default=None, gt=0, description="Rank of an *svd combination (default: largest rank)."
    )
    svd_clamp: float | None = Field(
        default=None, gt=0, le=1, description="Quantile at which *svd clamps its factors."
    )
    output_format: Literal["hf", "peft-adapter"] = Field(
        default="hf",
        description="hf: a full model with the adapters folded in; "
        "peft-adapter: one combined adapter on the same base.",
    )
    seed: int = Field(default=0, description="Seed for DARE's random drops.")

    @model_validator(mode="after")
    def _check(self):
        c = self.combination_type
        needs = {
            "density": DENSITY,
            "majority_sign_method": SIGN,
            "svd_rank": SVD,
            "svd_clamp": SVD,
        }
        for field, types in needs.items():
            if getattr(self, field) is not None and c not in types:
                raise ValueError(f"{field} is used only by combination_type {', '.join(types)}")
        if c in DENSITY and self.density is None:
            raise ValueError(f"combination_type {c} needs density (the fraction kept), e.g. 0.5")
        return self


def _adapter_config(c: Checkpoint) -> dict:
    cfg = c.path / "adapter_config.json"
    if not cfg.is_file() or not (c.path / "adapter_model.safetensors").is_file():
        raise PolmError(
            f"{STAGE}: {c.path} is marked peft-adapter but lacks adapter_config.json or "
            "adapter_model.safetensors (pickled adapters are not read)."
        )
    config = json.loads(cfg.read_text())
    if config.get("peft_type") != "LORA":
        raise PolmError(
            f"{STAGE}: {c.path} is a {config.get('peft_type')} adapter, not LoRA: prefix and "
            "prompt tuning add virtual tokens instead of a weight update, so there is nothing "
            "to fold or combine; keep it as an adapter."
        )
    if not c.manifest.parents:
        raise PolmError(f"{STAGE}: the manifest of adapter {c.path} names no base model.")
    return config


def plan(
    inputs: list[Checkpoint], s: LoraMergeSettings
) -> tuple[Checkpoint, list[Checkpoint], list[float]]:
    """The base, the adapters and their weights, every rule checked from manifests and adapter
    configs."""
    adapters = [c for c in inputs if c.format == "peft-adapter"]
    if not adapters:
        raise PolmError(f"{STAGE} needs at least one peft-adapter input (--from ADAPTER...).")
    configs = [_adapter_config(a) for a in adapters]
    bases = {a.manifest.parents[0].content_hash for a in adapters}
    if len(bases) > 1:
        listed = "; ".join(f"{a.path.name} on {a.manifest.parents[0].path}" for a in adapters)
        raise PolmError(f"{STAGE}: the adapters were trained on different bases ({listed}).")
    ref = adapters[0].manifest.parents[0]
    others = [c for c in inputs if c.format != "peft-adapter"]
    for c in others:
        if c.manifest.content_hash != ref.content_hash:
            raise PolmError(
                f"{STAGE}: {c.path} ({c.format}, made by {c.stage}) is neither an adapter nor "
                f"the adapters' base ({ref.path}); merge full models with merge.mergekit."
            )
    base = others[0] if others else _open_base(ref, adapters[0])
    if base.format != "hf":
        why = {"gptq": "GPTQ", "onebit": "1-bit"}.get(base.format, base.format)
        raise PolmError(
            f"{STAGE}: the base {base.path} is {why} ({base.format}); its packed weights "
            "cannot absorb a float LoRA update without re-quantizing. Fold the adapters into "
            "the float parent, then quantize the result (or serve the adapter on it)."
        )
    weights = s.weights or [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise PolmError(
            f"{STAGE}: {len(weights)} weights for {len(adapters)} adapters; give one per adapter."
        )
    if len(adapters) == 1 and s.combination_type not in (None, "linear", "cat"):
        raise PolmError(
            f"{STAGE}: {s.combination_type} combines several adapters; PEFT takes one adapter "
            "linearly (use linear or leave combination_type out)."
        )
    combining = len(adapters) > 1 or s.combination_type or s.output_format == "peft-adapter"
    if any(cfg.get("use_dora") for cfg in configs) and (combining or weights != [1.0]):
        raise PolmError(
            f"{STAGE}: a DoRA adapter rescales by a learned magnitude; it folds only alone at "
            "weight 1 (PEFT cannot combine or weight it)."
        )
    ranks = [max([cfg["r"], *(cfg.get("rank_pattern") or {}).values()]) for cfg in configs]
    if len(adapters) > 1 and s.combination_type in SAME_RANK and len(set(ranks)) > 1:
        raise PolmError(
            f"{STAGE}: {s.combination_type} needs adapters of one rank, got {ranks}; use cat "
            "or an *_svd combination."
        )
    return base, adapters, weights


def _open_base(ref, adapter: Checkpoint) -> Checkpoint:
    try:
        base = Checkpoint.open(ref.path)
    except PolmError as e:
        raise PolmError(f"{STAGE}: the base of {adapter.path} is not readable: {e}") from None
    if base.manifest.content_hash != ref.content_hash:
        raise PolmError(
            f"{STAGE}: the base {base.path} changed since adapter {adapter.path} was trained."
        )
    return base


def combine(model, names: list[str], weights: list[float], s: LoraMergeSettings):
    """PEFT folds (hf) or combines the loaded adapters; returns the model to save and the
    combination used (None: every adapter folded in, scaled by its weight)."""
    import torch
    from peft.tuners.lora import LoraLayer

    combination = s.combination_type or ("cat" if s.output_format == "peft-adapter" else None)
    try:
        if combination is None:  # exact fold: W + Σ wᵢ·ΔWᵢ
            for layer in model.modules():
                if isinstance(layer, LoraLayer):
                    for name, w in zip(names, weights):
                        if name in layer.scaling:
                            layer.scaling[name] *= w
            merge_names = names
        else:
            torch.manual_seed(s.seed)  # DARE's drops
            model.add_weighted_adapter(
                names,
                weights,
                "default",  # PEFT writes a "default" adapter at the top of the directory
                combination_type=combination,
                svd_rank=s.svd_rank,
                svd_clamp=s.svd_clamp,
                density=s.density,
                majority_sign_method=s.majority_sign_method or "total",
            )
            merge_names = ["default"]
        if s.output_format == "hf":
            model = model.merge_and_unload(safe_merge=True, adapter_names=merge_names)
    except ValueError as e:
        raise PolmError(f"{STAGE}: PEFT refused: {e}") from None
    return model, combination


def run(inputs: list[Checkpoint], settings: LoraMergeSettings, out: Path) -> Checkpoint:
    s = settings
    base, adapters, weights = plan(inputs, s)

    import torch
    from peft import PeftModel

    from polm.checkpoint import staging
    from polm.loading import load_model

    model, _ = load_model(base)  # float32, safetensors only
    names = [f"adapter{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(model, adapters[0].path, adapter_name=names[0])
    for name, a in zip(names[1:], adapters[1:]):
        model.load_adapter(a.path, adapter_name=name)
    model, combination = combine(model, names, weights, s)

    with staging(out) as st:
        if s.output_format == "hf":
            cfg = json.loads((base.path / "config.json").read_text())
            dtype = cfg.get("dtype") or cfg.get("torch_dtype")
            if dtype in ("bfloat16", "float16"):  # computed in float32, written as the base
                model = model.to(getattr(torch, dtype))
            model.save_pretrained(st.dir, safe_serialization=True)
        else:
            model.save_pretrained(st.dir, selected_adapters=["default"], safe_serialization=True)
        carry_files(base.path, st.dir)
        check_finite(st.dir, STAGE)
        metrics = {
            "merge.base": base.path.name,
            "merge.adapters": ", ".join(a.path.name for a in adapters),
            "merge.weights": weights,
            "merge.combination_type": combination or "fold",
        }
        if s.output_format == "peft-adapter":
            metrics["merge.rank"] = model.peft_config["default"].r
        return st.commit(
            stage=STAGE,
            format=s.output_format,
            settings=s,
            parents=[base, *adapters],
            seed=s.seed,
            metrics=metrics,
        )
