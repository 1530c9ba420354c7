"""The ``onebit`` checkpoint format: packed binary or ternary linear weights, and its loader.

A ``onebit`` checkpoint is an HF directory (config, tokenizer, generation config) whose weights
are in ``onebit.safetensors`` (deliberately not ``model.safetensors``: plain transformers must
fail loudly on it rather than start from random weights). For every quantized linear layer
``<name>.weight`` it holds:

- binary (OneBit, arXiv 2402.11295): ``<name>.weight.signs`` — the signs, 8 per byte
  (``uint8 [out, ceil(in / 8)]``, bit set = +1) — and the sign-value decomposition's two
  value vectors ``<name>.weight.row_scale`` (``[out]``) and ``<name>.weight.col_scale``
  (``[in]``); the weight is ``sign ⊙ row_scale col_scaleᵀ``;
- ternary (BitNet b1.58, arXiv 2402.17764): ``<name>.weight.trits`` — values in {-1, 0, 1},
  five per byte in base 3 (``uint8 [out, ceil(in / 5)]``, 1.6 bits per weight) — and
  ``<name>.weight.scale`` (``[out]``, the absmean of each output row); the weight is
  ``trit · scale``.

The token embedding (and an untied output head) is stored as ``config.json``'s
``embeddings`` entries say (``bits``): 8, ``<name>.q8`` (``int8 [out, in]``) and
``<name>.q8_scale`` (``[out]``, each row's absmax / 127); 4, ``<name>.q4`` (two 4-bit codes a
byte, ``uint8 [out, in / 2]``, groups of ``group`` columns) and ``<name>.q4_scale`` (``[out,
in / group]``, each group's absmax / 7); 16, bfloat16. Every other tensor (norms, biases) is
stored in bfloat16: nothing in the file takes more than 16 bits a weight. On Gemma 3 270M the
tied 262k-row embedding is 63% of the parameters: in fp32 it made the "1-bit" model 685 MB.
The loader rebuilds a plain transformers model with the dequantized weights, so evaluation and
serving need nothing from ``optimize``.
"""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS = "onebit.safetensors"
CONFIG_KEY = "polm_onebit"  # in config.json: {"method": ..., "modules": [...]}
METHODS = ("binary", "ternary")
_POW3 = (1, 3, 9, 27, 81)


def pack_signs(weight):
    """``uint8 [out, ceil(in/8)]``: bit k of byte j is ``weight[:, 8j + k] >= 0``."""
    import torch
    import torch.nn.functional as F

    bits = (weight >= 0).to(torch.uint8)
    pad = (-bits.shape[1]) % 8
    bits = F.pad(bits, (0, pad)).view(bits.shape[0], -1, 8)
    shifts = torch.arange(8, dtype=torch.uint8)
    return (bits << shifts).sum(-1, dtype=torch.uint8)


def unpack_signs(packed, in_features: int):
    """±1 float matrix ``[out, in_features]`` from :func:`pack_signs`."""
    import torch

    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    bits = bits.reshape(packed.shape[0], -1)[:, :in_features]
    return bits.float() * 2 - 1


def pack_trits(q):
    """``uint8 [out, ceil(in/5)]`` from a matrix of -1/0/1 values, five base-3 digits a byte."""
    import torch
    import torch.nn.functional as F

    t = (q.round().clamp(-1, 1) + 1).to(torch.int16)  # 0, 1, 2
    pad = (-t.shape[1]) % 5
    t = F.pad(t, (0, pad), value=1).view(t.shape[0], -1, 5)  # padding decodes to 0
    weights = torch.tensor(_POW3, dtype=torch.int16)
    return (t * weights).sum(-1).to(torch.uint8)


def unpack_trits(packed, in_features: int):
    """-1/0/1 float matrix ``[out, in_features]`` from :func:`pack_trits`."""
    import torch

    p = packed.to(torch.int16).unsqueeze(-1)
    digits = (p // torch.tensor(_POW3, dtype=torch.int16)) % 3
    return digits.reshape(packed.shape[0], -1)[:, :in_features].float() - 1


def quantize_rows(w, bits: int, group: int = 32) -> dict:
    """The stored form of an embedding matrix ``w`` at ``bits`` (8, 4 or 16), as tensors keyed
    by suffix (``q8``/``q8_scale``, ``q4``/``q4_scale`` or ``""`` for bfloat16)."""
    import torch
    import torch.nn.functional as F

    w = w.detach().float()
    if bits == 16:
        return {"": w.to(torch.bfloat16)}
    if bits == 8:
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
        q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        return {"q8": q, "q8_scale": scale.to(torch.float16)}
    pad = (-w.shape[1]) % group
    g = F.pad(w, (0, pad)).view(w.shape[0], -1, group)
    scale = (g.abs().amax(-1) / 7).clamp(min=1e-12).to(torch.float16)
    q = (g / scale.float()[..., None]).round().clamp(-7, 7).to(torch.int16) + 8  # 1..15
    q = q.view(w.shape[0], -1, 2).to(torch.uint8)
    return {"q4": q[..., 0] | (q[..., 1] << 4), "q4_scale": scale}


def dequantize_rows(tensors: dict, name: str, bits: int, shape: list[int], group: int = 32):
    """The float matrix ``shape`` stored under ``name`` by :func:`quantize_rows`."""
    import torch

    if bits == 16:
        return tensors[name].float()
    if bits == 8:
        return tensors[f"{name}.q8"].float() * tensors[f"{name}.q8_scale"].float()[:, None]
    packed = tensors[f"{name}.q4"]
    codes = torch.stack([packed & 15, packed >> 4], -1).view(shape[0], -1, group)
    scale = tensors[f"{name}.q4_scale"].float()
    return ((codes.float() - 8) * scale[..., None]).reshape(shape[0], -1)[:, : shape[1]]


def dequantize(tensors: dict, name: str, method: str, in_features: int):
    """The dense weight of linear layer ``name`` (its ``.weight`` key) from the packed tensors."""
    if method == "binary":
        signs = unpack_signs(tensors[f"{name}.signs"], in_features)
        row, col = tensors[f"{name}.row_scale"].float(), tensors[f"{name}.col_scale"].float()
        return signs * row[:, None] * col[None, :]
    trits = unpack_trits(tensors[f"{name}.trits"], in_features)
    return trits * tensors[f"{name}.scale"].float()[:, None]


def packed_stats(path: Path) -> dict:
    """Bytes and bits per weight, read from the file's header: of the whole file over every
    weight of the model it rebuilds (``bits_per_weight``), and of the quantized linear layers
    alone (``linear_bits_per_weight``, ``code_bits_per_weight`` without their scales)."""
    from polm.checkpoint import DTYPE_BYTES, numel, tensor_specs

    cfg = json.loads((Path(path) / "config.json").read_text())[CONFIG_KEY]
    specs = tensor_specs(Path(path) / WEIGHTS)
    code = scale = weights = 0
    for m in cfg["modules"]:
        name, (out, inp) = m["name"], m["shape"]
        weights += out * inp
        for key, (dtype, shape) in specs.items():
            if key.startswith(name + "."):
                nbytes = numel(shape) * DTYPE_BYTES[dtype]
                if key.endswith((".signs", ".trits")):
                    code += nbytes
                else:
                    scale += nbytes
    total_bytes = sum(numel(shape) * DTYPE_BYTES[dtype] for dtype, shape in specs.values())
    packed = {m["name"] for m in cfg["modules"]} | {e["name"] for e in cfg.get("embeddings", [])}
    total = weights + sum(e["shape"][0] * e["shape"][1] for e in cfg.get("embeddings", []))
    total += sum(
        numel(shape) for key, (_, shape) in specs.items()
        if not any(key == n or key.startswith(n + ".") for n in packed)
    )  # fmt: skip
    return {
        "quantized_weights": weights,
        "quantized_bytes": code + scale,
        "linear_bits_per_weight": 8 * (code + scale) / max(1, weights),
        "code_bits_per_weight": 8 * code / max(1, weights),
        "weights": total,
        "bits_per_weight": 8 * total_bytes / max(1, total),
    }


def load_onebit(path, dtype=None):
    """A transformers model with the dequantized weights of the onebit checkpoint at ``path``."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from polm.errors import PolmError

    path = Path(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise PolmError(f"{path} is marked onebit but has no {WEIGHTS}; re-run the stage.")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    spec = getattr(config, CONFIG_KEY, None)
    if not spec or spec.get("method") not in METHODS:
        raise PolmError(
            f"{path}/config.json has no valid {CONFIG_KEY!r} entry (method binary or ternary "
            "and the quantized modules); it is not a polm onebit checkpoint."
        )
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # a truncated or corrupt file
        raise PolmError(f"cannot read {weights}: {e}") from None
    names = {m["name"] for m in spec["modules"]}
    names |= {e["name"] for e in spec.get("embeddings", []) if e["bits"] != 16}
    state = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in names}
    for e in spec.get("embeddings", []):
        state[e["name"]] = dequantize_rows(tensors, e["name"], e["bits"], e["shape"], e["group"])
    for m in spec["modules"]:
        w = dequantize(tensors, m["name"], spec["method"], m["shape"][1])
        if list(w.shape) != list(m["shape"]):
            raise PolmError(f"{weights}: {m['name']} unpacks to {list(w.shape)}, not {m['shape']}")
        state[m["name"]] = w
    target = dtype or torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=target)
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise PolmError(
            f"{weights} does not match its config: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}."
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model
