"""Post-training 1-bit (binary) and ternary quantization of a model's linear layers, with
recovery by quantization-aware distillation from the full-precision parent.

- ``binary`` (OneBit, Xu et al., arXiv 2402.11295): each weight matrix becomes its sign
  matrix times a rank-one value matrix ``a bᵀ``, initialised by the sign-value-independent
  decomposition (``|W| ≈ a bᵀ`` from the leading singular pair of ``|W|``);
- ``ternary`` (BitNet b1.58, Ma et al., arXiv 2402.17764): absmean quantization to {-1, 0, 1}
  times the absmean scale (per output row here, not per tensor: better before recovery, and
  still under 2 bits a weight with base-3 packing). Weights only; activations stay in float.

Embeddings, norms, the output head and MoE routers are not binarized. Recovery (on by
default; ``recovery: false`` for plain post-training quantization) trains the latent
full-precision weights and the scales through the straight-through estimator, with the
parent as teacher and ``optimize.distill``'s loss and data modes. The output is the
``onebit`` format (``polm.onebit``): the signs or trits packed into bytes, the scales in fp16,
the embedding in int8 rows (``embedding_bits``), everything else in bfloat16.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from optimize.distill import RecoverySettings, before_recovery, build_dataset, recover
from polm.checkpoint import Checkpoint, staging
from polm.errors import PolmError
from polm.stage import single_input, with_parent_data

STAGE = "optimize.onebit"


class OneBitSettings(RecoverySettings):
    """Settings of ``optimize.onebit``; the recovery fields are ``optimize.distill``'s."""

    method: Literal["binary", "ternary"] = Field(
        default="binary", description="binary (sign × rank-one scales) or ternary (absmean)."
    )
    embedding_bits: Literal[4, 8, 16] = Field(
        default=8,
        description="How the token embedding (and an untied output head) is stored: 8, int8 "
        "rows with a scale each (near lossless); 4, 4-bit groups of 32 with a scale each (what "
        "brings a large-vocabulary model under 2 bits a weight overall; lossy, and recovery "
        "does not see it); 16, bfloat16. Every other tensor is stored in bfloat16.",
    )


def _ste(latent, quantized):
    """``quantized`` in the forward pass, the identity's gradient to ``latent`` in the backward."""
    return latent + (quantized - latent).detach()


def _quant_linear_class():
    import torch
    import torch.nn.functional as F

    class QuantLinear(torch.nn.Module):
        """A linear layer whose forward sees the binary or ternary form of a latent weight."""

        def __init__(self, linear: torch.nn.Linear, method: str):
            super().__init__()
            w = linear.weight.detach().float().clone()
            self.method = method
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.weight = torch.nn.Parameter(w)
            self.bias = linear.bias
            if method == "binary":
                row, col = svid(w)
                self.row_scale = torch.nn.Parameter(row)
                self.col_scale = torch.nn.Parameter(col)

        def quantized_weight(self):
            w = self.weight
            if self.method == "binary":
                signs = _ste(w, torch.where(w >= 0, 1.0, -1.0))
                return signs * self.row_scale[:, None] * self.col_scale[None, :]
            scale = ternary_scale(w)
            x = w / scale
            return _ste(x, x.round().clamp(-1, 1)) * scale

        def forward(self, x):
            return F.linear(x, self.quantized_weight().to(x.dtype), self.bias)

    return QuantLinear


def svid(w):
    """OneBit's sign-value-independent decomposition: ``a`` (rows) and ``b`` (columns) with
    ``|w| ≈ a bᵀ``, from the leading singular pair of ``|w|`` (both non-negative)."""
    import torch

    u, s, vh = torch.linalg.svd(w.abs().float(), full_matrices=False)
    a, b = u[:, 0] * s[0].sqrt(), vh[0] * s[0].sqrt()
    if a.sum() < 0:  # the leading singular vectors of a non-negative matrix share one sign
        a, b = -a, -b
    return a.clamp(min=0), b.clamp(min=0)


def ternary_scale(w):
    """BitNet b1.58's absmean, per output row."""
    return w.abs().mean(dim=1, keepdim=True).clamp(min=1e-8)


def quantizable(name: str, module) -> bool:
    """Linear layers of the decoder blocks; not the output head or an MoE router."""
    import torch

    if not isinstance(module, torch.nn.Linear):
        return False
    last = name.rsplit(".", 1)[-1]
    return last not in ("lm_head", "gate", "router", "score") and "embed" not in name


def quantize_model(model, method: str) -> list[str]:
    """Replace the quantizable linear layers of ``model`` in place; return their names."""
    QuantLinear = _quant_linear_class()
    names = [n for n, m in model.named_modules() if quantizable(n, m)]
    if not names:
        raise PolmError(f"{STAGE}: the model has no linear layers to quantize.")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear(getattr(parent, child), method))
    return names


def packed_tensors(model, names: list[str], method: str, embedding_bits: int = 8):
    """The ``onebit`` file's tensors: packed layers, the embedding (and an untied head) at
    ``embedding_bits``, everything else in bfloat16; and the embeddings' entries for the
    config (see polm/onebit.py)."""
    import torch

    from polm.onebit import pack_signs, pack_trits, quantize_rows

    tied = getattr(model.config, "tie_word_embeddings", False)
    by_module = {id(m): n for n, m in model.named_modules()}
    tables = [model.get_input_embeddings()] + ([] if tied else [model.get_output_embeddings()])
    embedded = [f"{by_module[id(m)]}.weight" for m in tables if m is not None]
    tensors, embeddings = {}, []
    quantized = {f"{n}.weight" for n in names}
    for key, value in model.state_dict().items():
        if key in embedded:
            for suffix, t in quantize_rows(value, embedding_bits).items():
                tensors[f"{key}.{suffix}" if suffix else key] = t.contiguous()
            embeddings.append(
                {"name": key, "bits": embedding_bits, "shape": list(value.shape), "group": 32}
            )
        elif key not in quantized and not any(key.startswith(n + ".") for n in names):
            value = value.detach()
            if value.is_floating_point() and value.element_size() > 2:
                value = value.to(torch.bfloat16)
            tensors[key] = value.contiguous()
    for n in names:
        m = model.get_submodule(n)
        w = m.weight.detach().float()
        if m.bias is not None:
            tensors[f"{n}.bias"] = m.bias.detach().to(torch.bfloat16).contiguous()
        if method == "binary":
            tensors[f"{n}.weight.signs"] = pack_signs(w)
            tensors[f"{n}.weight.row_scale"] = m.row_scale.detach().to(torch.float16)
            tensors[f"{n}.weight.col_scale"] = m.col_scale.detach().to(torch.float16)
        else:
            scale = ternary_scale(w)
            tensors[f"{n}.weight.trits"] = pack_trits((w / scale).round().clamp(-1, 1))
            tensors[f"{n}.weight.scale"] = scale[:, 0].to(torch.float16)
    if tied:
        tensors.pop("lm_head.weight", None)  # the loader ties it back to the embeddings
    return tensors, embeddings


def run(inputs: list[Checkpoint], settings: OneBitSettings, out: Path) -> Checkpoint:
    import copy

    import torch
    from safetensors.torch import save_file

    from polm.loading import load_model
    from polm.onebit import CONFIG_KEY, WEIGHTS, packed_stats

    parent_ckpt = single_input(inputs, STAGE, "hf")
    s, metrics = settings, {}
    if s.recovery:  # recovery trains: on the given data, else the parent's (lineage)
        s, metrics = with_parent_data(s, parent_ckpt, STAGE, "data for recovery training")
    dataset = build_dataset(s) if s.recovery else None
    torch.manual_seed(s.seed)
    parent, tokenizer = load_model(parent_ckpt)
    student = copy.deepcopy(parent)
    names = quantize_model(student, s.method)
    metrics |= before_recovery(student, tokenizer, s, "onebit")
    if s.recovery:
        metrics |= recover(student, parent, tokenizer, dataset, s, out, inputs)
    shapes = {
        n: [student.get_submodule(n).out_features, student.get_submodule(n).in_features]
        for n in names
    }
    with staging(out) as st:
        config = student.config.to_dict()
        tensors, embeddings = packed_tensors(student, names, s.method, s.embedding_bits)
        config[CONFIG_KEY] = {
            "method": s.method,
            "modules": [{"name": f"{n}.weight", "shape": shapes[n]} for n in names],
            "embeddings": embeddings,
        }
        (st.dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        student.generation_config.save_pretrained(st.dir)
        tokenizer.save_pretrained(st.dir)
        save_file(tensors, str(st.dir / WEIGHTS))
        stats = packed_stats(st.dir)
        metrics |= {
            "bits_per_weight": stats["bits_per_weight"],  # the whole file, every weight
            "onebit.linear_bits_per_weight": stats["linear_bits_per_weight"],
            "onebit.code_bits_per_weight": stats["code_bits_per_weight"],
            "onebit.embedding_bits": s.embedding_bits,
            "onebit.quantized_bytes": stats["quantized_bytes"],
            "onebit.fp32_bytes": 4 * stats["quantized_weights"],
            "onebit.quantized_layers": len(names),
            "params": sum(p.numel() for p in parent.parameters()),
        }
        return st.commit(
            stage=STAGE,
            format="onebit",
            settings=s,
            parents=[parent_ckpt],
            seed=s.seed,
            metrics=metrics,
        )
