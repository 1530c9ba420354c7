"""GPTQ weight quantization (Frantar et al., arXiv 2210.17323) with GPTQModel, on CPU or GPU.

GPTQModel is AutoGPTQ's maintained successor (AutoGPTQ is archived and needs CUDA to
quantize). Settings keep its ``QuantizeConfig`` names: ``bits`` (2, 3, 4, 8), ``group_size``,
``desc_act`` (act-order), ``sym``, ``damp_percent``. Calibration text is the recipe's task data
(whole chats, rendered with the model's chat template) or a user dataset.

The output is GPTQModel's own GPTQ layout (``quantization_config`` in ``config.json``, packed
``qweight``/``qzeros``/``scales``/``g_idx``), which transformers (with optimum and GPTQModel
installed) and vLLM load as they are; the parent's tokenizer files and generation config are
kept byte for byte. Embeddings, norms and the output head are not quantized, but they are
stored in 16 bits (fp16, or bf16 for a tensor fp16 cannot hold): GPTQModel saves them in the
dtype the model was quantized in, fp32 on CPU, which left Gemma 3 270M's tied 262k-row
embedding at 671 MB of a 724 MB checkpoint. The loader computes in fp32 as before.

Sparse parents (``optimize.prune``): GPTQ quantizes one column at a time and spreads each
column's rounding error over the columns not yet quantized, pruned positions included, so a
50%-sparse layer came out dense. With ``keep_zeros`` (the default) every weight that is exactly
zero in the parent is zero in the output: its quantized value is set to the zero point (which
dequantizes to exactly 0) before the layer's output feeds the next layer's calibration, so the
layers after it calibrate on the sparse weights. ``gptq.zero_fraction`` in the manifest is read
back from the packed weights. The file is no smaller for it: GPTQ's layout packs every weight,
zero or not.

MoE checkpoints: GPTQ needs each expert's inputs, and an expert the router never picks on the
calibration data has none. GPTQModel falls back to round-to-nearest for modules that saw too
few tokens (its ``fallback`` setting, on by default), so quantization and loading do not break;
the manifest records how many calibration tokens each expert received.

Machine set-up done for the user: GPTQModel's CPU worker pool needs at least two workers, but
its default is half the cores (one on a 2-core machine, where quantization then fails);
its first run otherwise spends ~40 s compiling a C++ packing extension whose output is
byte-identical to the Python packer's (``GPTQMODEL_DISABLE_PACK_EXT=0`` turns it back on);
its progress bars and INFO logs are turned down to warnings.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from polm.checkpoint import (
    DTYPE_BYTES,
    Checkpoint,
    numel,
    staging,
    stored_params,
    tensor_specs,
)
from polm.errors import PolmError
from polm.evaluate import size_bytes
from polm.resources import release_free_memory
from polm.stage import TaskOrDataset, carry_files, single_input, with_parent_data

STAGE = "optimize.gptq"


class GPTQSettings(TaskOrDataset):
    """Settings of ``optimize.gptq``; quantization fields use GPTQModel's QuantizeConfig names.
    Calibration data: `task` (built-in; its train chats) or `dataset` (text, messages or
    prompt/completion rows); with neither, the data the parent was trained on (lineage)."""

    data_from_lineage: ClassVar[bool] = True

    bits: Literal[2, 3, 4, 8] = Field(default=4, description="Bits per quantized weight.")
    group_size: int = Field(
        default=128,
        description="Weights sharing one scale and zero point along the input dimension "
        "(-1: one group per row).",
    )
    desc_act: bool = Field(
        default=False,
        description="Act-order: quantize columns in order of decreasing activation magnitude.",
    )
    sym: bool = Field(default=True, description="Symmetric quantization (no zero point).")
    damp_percent: float = Field(
        default=0.05, gt=0, lt=1, description="Hessian dampening, a fraction of its mean diagonal."
    )
    keep_zeros: bool = Field(
        default=True,
        description="Keep every weight that is exactly zero in the parent (a pruned model's "
        "mask) at zero after quantization.",
    )
    n_calibration: int = Field(default=256, gt=0, description="Calibration samples.")
    batch_size: int = Field(default=16, gt=0, description="Calibration batch size.")
    seed: int = Field(default=0, description="Which calibration samples are drawn.")

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v <= 0:
            raise ValueError("group_size must be positive, or -1 for one group per row")
        return v


def _gptqmodel():
    """GPTQModel, imported with polm's machine set-up (see the module docstring)."""
    import logging

    from polm.loading import gptqmodel_env

    gptqmodel_env()
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    import gptqmodel
    from logbar import LogBar

    LogBar.shared().setLevel(logging.WARNING)
    return gptqmodel


def calibration_texts(s: GPTQSettings, tokenizer) -> list[str]:
    """``n_calibration`` calibration strings: whole chats rendered with the chat template."""
    import random

    from polm.data import check_columns, load_dataset_source
    from polm.tasks import render

    if s.task is not None:
        rows = [r for t in s.tasks for r in render(t, "train", "messages")]
    else:
        ds = load_dataset_source(s.dataset)
        check_columns(ds, s.dataset, [{"text"}, {"messages"}, {"prompt", "completion"}])
        rows = list(ds)
    rng = random.Random(s.seed)
    rows = rng.sample(rows, min(s.n_calibration, len(rows)))
    texts = []
    for r in rows:
        if "messages" in r:
            texts.append(tokenizer.apply_chat_template(r["messages"], tokenize=False))
        elif "text" in r:
            texts.append(r["text"])
        else:
            prompt, completion = r["prompt"], r["completion"]
            if isinstance(prompt, str):
                texts.append(prompt + completion)
            else:
                texts.append(tokenizer.apply_chat_template(prompt + completion, tokenize=False))
    return texts


def expert_tokens(model, tokenizer, texts: list[str]) -> dict[str, list[int]] | None:
    """Tokens routed to each expert of each MoE layer on ``texts`` (None for a dense model)."""
    import torch

    cfg = model.config
    n_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if not n_experts or not top_k:
        return None
    counts: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def count(_module, _inputs, output):
            logits = output[0] if isinstance(output, tuple) else output
            if logits.shape[-1] != n_experts:
                return
            picked = logits.reshape(-1, n_experts).topk(top_k, dim=-1).indices
            mask = current_mask.reshape(-1).bool()
            counts[name] += torch.bincount(picked[mask].reshape(-1), minlength=n_experts)

        return count

    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)  # a Linear, or transformers' TopKRouter
        if name.rsplit(".", 1)[-1] in ("gate", "router") and isinstance(weight, torch.Tensor):
            if weight.dim() == 2 and weight.shape[0] == n_experts:
                counts[name] = torch.zeros(n_experts, dtype=torch.long)
                hooks.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            for text in texts:
                enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
                current_mask = enc["attention_mask"]
                model(**enc)
    finally:
        for h in hooks:
            h.remove()
    return {name.removesuffix(".gate"): c.tolist() for name, c in counts.items()} or None


@contextlib.contextmanager
def keeping_zeros(enabled: bool = True):
    """While active, each layer GPTQModel quantizes keeps its exact zeros: the quantized weight
    it returns (which the packer stores and the next layers calibrate on) is set back to 0
    wherever the layer's weight was 0 before quantizing."""
    from gptqmodel.quantization.gptq import GPTQ

    if not enabled:
        yield
        return
    original = GPTQ.quantize

    def quantize(self, *args, **kwargs):
        zeros = self.module.weight.data == 0
        q, *rest = original(self, *args, **kwargs)
        if zeros.any():
            q[zeros.reshape(q.shape).to(q.device)] = 0
        return (q, *rest)

    GPTQ.quantize = quantize
    try:
        yield
    finally:
        GPTQ.quantize = original


def packed_zeros(path: Path, bits: int):
    """``{layer: bool tensor [out, in]}``: where the packed GPTQ weights in ``path`` dequantize
    to exactly 0 (the value equals its group's zero point). Bits 2, 4 and 8 (3-bit words are
    packed across int32 boundaries: ``{}``)."""
    import torch
    from safetensors import safe_open

    if 32 % bits:
        return {}
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    mask = (1 << bits) - 1
    found = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in sorted(k for k in f.keys() if k.endswith(".qweight")):
                base = key.removesuffix(".qweight")
                qweight = f.get_tensor(key)  # [in / per_word, out]
                values = (qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask
                values = values.reshape(-1, qweight.shape[1])  # [in, out]
                qzeros = f.get_tensor(base + ".qzeros")  # [groups, out / per_word]
                points = (qzeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask
                points = (points.reshape(qzeros.shape[0], -1) + 1) & mask  # v1 stores zero - 1
                g_idx = f.get_tensor(base + ".g_idx").long()
                found[base] = (values == points[g_idx]).T
    return found


def packed_zero_fraction(path: Path, bits: int) -> float | None:
    """The share of all packed GPTQ weights in ``path`` that dequantize to exactly 0."""
    found = packed_zeros(path, bits)
    if not found:
        return None
    return sum(int(z.sum()) for z in found.values()) / sum(z.numel() for z in found.values())


def is_moe(ckpt: Checkpoint) -> bool:
    import json

    cfg = json.loads((ckpt.path / "config.json").read_text())
    return bool(cfg.get("num_local_experts") or cfg.get("num_experts"))


def quantized_layer_stats(path: Path, bits: int) -> dict:
    """Bytes of the GPTQ layers (qweight, qzeros, scales, g_idx), their fp32 size and bits."""
    quant = weights = 0
    for key, (dtype, shape) in tensor_specs(path).items():
        leaf = key.rpartition(".")[2]
        if leaf in ("qweight", "qzeros", "scales", "g_idx"):
            quant += numel(shape) * DTYPE_BYTES[dtype]
            if leaf == "qweight":  # [in * bits / 32, out] int32
                weights += shape[0] * 32 // bits * shape[1]
    return {
        "gptq.quantized_bytes": quant,
        "gptq.fp32_bytes": 4 * weights,
        "gptq.size_ratio": quant / max(1, 4 * weights),
        "bits_per_weight": 8 * quant / max(1, weights),
    }


# Above this size the calibration inputs and Hessians are worth handing back to the OS before
# the unquantized tensors are cast (Gemma 3 270M: the stage's peak 3.7 -> 2.7 GB with the cast
# done in place); below it, the full garbage collection costs more than it saves.
RELEASE_FROM_BYTES = 64 * 2**20
CAST_CHUNK = 2**22  # elements cast at a time


def to_16_bits(model) -> dict[str, str]:
    """Cast, in place, every float parameter and buffer wider than 16 bits to fp16, or bf16
    where fp16 would overflow; return ``{name: new dtype}``. Done on the quantized model before
    GPTQModel saves it, so that nothing is written twice: rewriting the saved file instead held
    all its tensors at once (1.8 GB over the stage's baseline on Gemma 3 270M)."""
    import torch

    changed: dict[str, str] = {}
    named = [*model.named_parameters(), *model.named_buffers()]  # tied weights appear once
    for name, t in named:
        if t.is_floating_point() and t.element_size() > 2:
            half = torch.empty_like(t.data, dtype=torch.float16)
            src, dst = t.data.reshape(-1), half.view(-1)
            finite = True
            for i in range(0, src.numel(), CAST_CHUNK):  # no full-size temporaries
                dst[i : i + CAST_CHUNK].copy_(src[i : i + CAST_CHUNK])
                finite = finite and bool(torch.isfinite(dst[i : i + CAST_CHUNK]).all())
            t.data = half if finite else t.data.to(torch.bfloat16)
            changed[name] = str(t.dtype).removeprefix("torch.")
    return changed


def stop_worker_pool() -> None:
    """Stop GPTQModel's device worker threads; its lazy pool builds new ones on next use.

    Each worker keeps the native memory of its last task (per-thread buffers of torch's CPU
    kernels): 145 MB on Gemma 3 270M after the stage, which the next stage (an ONNX export, an
    evaluation) would otherwise start on top of.
    """
    import gptqmodel

    pool = getattr(gptqmodel, "_DEVICE_THREAD_POOL", None)
    if pool is not None:
        pool.shutdown(wait=True)
        gptqmodel._DEVICE_THREAD_POOL = None


def run(inputs: list[Checkpoint], settings: GPTQSettings, out: Path) -> Checkpoint:
    import torch

    from polm.loading import load_model, load_tokenizer

    parent = single_input(inputs, STAGE, "hf")
    s, data_note = with_parent_data(settings, parent, STAGE, "calibration data")
    tokenizer = load_tokenizer(parent.path)
    texts = calibration_texts(s, tokenizer)
    routed = None
    if is_moe(parent):
        model, _ = load_model(parent)
        routed = expert_tokens(model, tokenizer, texts)
        del model
    gptqmodel = _gptqmodel()
    gpu = torch.cuda.is_available()
    config = gptqmodel.QuantizeConfig(
        bits=s.bits,
        group_size=s.group_size,
        desc_act=s.desc_act,
        sym=s.sym,
        damp_percent=s.damp_percent,
        offload_to_disk=False,
        **({"act_group_aware": False} if s.desc_act else {}),
    )
    with staging(out) as st, tempfile.TemporaryDirectory() as scratch:
        # GPTQModel writes a per-module log under ./logs of the working directory; the output
        # keeps its quant_log.csv instead
        import gptqmodel.looper.loop_processor as loop_processor

        loop_processor._PROJECT_LOG_DIR = Path(scratch)
        try:
            q = gptqmodel.GPTQModel.load(
                str(parent.path),
                config,
                device="cuda" if gpu else "cpu",
                dtype=torch.float16 if gpu else torch.float32,
                trust_remote_code=False,
            )
            with keeping_zeros(s.keep_zeros):
                q.quantize(texts, batch_size=s.batch_size, tokenizer=tokenizer)
            if size_bytes(parent.path) >= RELEASE_FROM_BYTES:  # a full gc takes ~0.5 s
                release_free_memory()  # calibration inputs and Hessians, before the cast
            to_16_bits(q.model)
            with contextlib.redirect_stdout(io.StringIO()):  # save() prints its config
                q.save(str(st.dir))
        except (ValueError, NotImplementedError, TypeError) as e:
            raise PolmError(f"{STAGE}: GPTQModel could not quantize {parent.path}: {e}") from None
        # GPTQModel's worker threads keep their last task's closure, and with it the looper
        # and this wrapper, until they run another task: drop the model from the wrapper so
        # that it is freed now (0.7 GB on Gemma 3 270M, on top of the evaluation)
        q.model = None
        del q
        stop_worker_pool()
        wide = [n for n, (dtype, _) in tensor_specs(st.dir).items() if dtype in ("F32", "F64")]
        if wide:
            raise PolmError(f"{STAGE}: GPTQModel saved {', '.join(wide[:3])} in more than 16 bits.")
        carry_files(parent.path, st.dir)  # GPTQModel rewrites these (e.g. do_sample: true)
        metrics = quantized_layer_stats(st.dir, s.bits) | {"params": stored_params(parent.path)}
        metrics |= data_note
        metrics["gptq.calibration_samples"] = len(texts)
        metrics["gptq.zero_fraction"] = packed_zero_fraction(st.dir, s.bits)
        if routed is not None:
            metrics["gptq.expert_tokens"] = routed
            metrics["gptq.min_expert_tokens"] = min(min(c) for c in routed.values())
        return st.commit(
            stage=STAGE, format="gptq", settings=s, parents=[parent], seed=s.seed, metrics=metrics
        )
