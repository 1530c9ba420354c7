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

Every other tensor (embeddings, norms, the output head) is stored as it is. The loader rebuilds
a plain transformers model with the dequantized weights, so evaluation and serving need
nothing from ``optimize``.
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


def dequantize(tensors: dict, name: str, method: str, in_features: int):
    """The dense weight of linear layer ``name`` (its ``.weight`` key) from the packed tensors."""
    if method == "binary":
        signs = unpack_signs(tensors[f"{name}.signs"], in_features)
        row, col = tensors[f"{name}.row_scale"].float(), tensors[f"{name}.col_scale"].float()
        return signs * row[:, None] * col[None, :]
    trits = unpack_trits(tensors[f"{name}.trits"], in_features)
    return trits * tensors[f"{name}.scale"].float()[:, None]


def packed_stats(path: Path) -> dict:
    """Bytes and bits per weight of the quantized linear layers, read from the file's header."""
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
    return {
        "quantized_weights": weights,
        "quantized_bytes": code + scale,
        "bits_per_weight": 8 * (code + scale) / max(1, weights),
        "code_bits_per_weight": 8 * code / max(1, weights),
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
    state = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in names}
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
