"""GGUF ``q4_0`` from a GPTQ checkpoint, keeping GPTQ's own 4-bit weights.

llama.cpp's converter cannot read GPTQ checkpoints, and re-quantizing their dequantized weights
with llama.cpp's quantizer rounds them a second time, to a grid of its own choosing, and loses
what GPTQ's error compensation bought. But a symmetric 4-bit GPTQ layer whose groups are whole
32-column blocks *is* ``q4_0`` data: ``q4_0`` stores each block of 32 weights as one fp16 scale
``d`` and 4-bit codes ``q`` with ``w = d * (q - 8)``; symmetric GPTQ stores ``w = scale * (q -
8)`` with an fp16 scale per group. So the codes and scales are copied, not recomputed.

How, without mapping tensor names or layouts by hand (architectures permute rows, rename and
stack tensors on the way to GGUF), all through llama.cpp's own tools:

1. two HF directories are written from the GPTQ checkpoint: the dequantized model (exact: a
   small integer times an fp16 scale is exact in fp32), and a twin in which each GPTQ weight is
   replaced by its scale, broadcast over its group (every other tensor: NaN);
2. llama.cpp's converter turns both into ``f32`` GGUF files, applying the same renaming and
   row permutations to each;
3. llama.cpp's quantizer writes ``q4_0`` from the first (every tensor GPTQ did not quantize,
   the embedding among them, is quantized by llama.cpp as for any ``q4_0`` export);
4. then every ``q4_0`` tensor that the twin marks as GPTQ's (finite, non-negative scales) is
   overwritten in place with GPTQ's blocks: ``d`` from the twin, ``q = value / d + 8``.

Written here because nothing else does it: the GPTQ unpacking (GPTQModel's ``gptq`` format:
int32 words of eight 4-bit codes along the input dimension, zero points stored minus one) and
the ``q4_0`` block packing (llama.cpp's ``block_q4_0``: fp16 ``d``, then 16 bytes holding codes
``j`` and ``j + 16`` in the low and high nibble of byte ``j``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from polm.checkpoint import Checkpoint
from polm.errors import PolmError

STAGE = "optimize.gguf"
BLOCK = 32  # q4_0's block length
PACKED = ("qweight", "qzeros", "scales", "g_idx")


def quantization_config(parent: Checkpoint) -> dict:
    return json.loads((parent.path / "config.json").read_text()).get("quantization_config") or {}


def check_exportable(parent: Checkpoint, outtype: str) -> None:
    """A GPTQ checkpoint exports as its own ``q4_0`` blocks, or not at all (say why)."""
    q = quantization_config(parent)
    why = []
    if outtype != "q4_0":
        why.append(f"outtype {outtype!r} (GPTQ's 4-bit weights are q4_0 blocks: outtype: q4_0)")
    if q.get("bits") != 4:
        why.append(f"{q.get('bits')}-bit weights (q4_0 holds 4)")
    if not q.get("sym", True):
        why.append("asymmetric groups (q4_0 has no zero point: quantize with sym: true)")
    group = q.get("group_size", -1)
    if group != -1 and group % BLOCK:
        why.append(f"group_size {group} (q4_0 blocks are {BLOCK} columns: a multiple of 32)")
    if q.get("desc_act") and not q.get("meta", {}).get("static_groups"):
        why.append("desc_act groups that are not whole column blocks (quantize with desc_act off)")
    if why:
        raise PolmError(
            f"{STAGE}: the GPTQ checkpoint {parent.path} cannot be written as its own q4_0 "
            f"blocks: {'; '.join(why)}. Export its hf parent instead, or quantize it again."
        )


def _unpack_rows(words: np.ndarray) -> np.ndarray:
    """int32 words of eight 4-bit codes along axis 0 -> codes (8x the rows)."""
    shifts = np.arange(0, 32, 4, dtype=np.uint32)
    codes = (words.astype(np.uint32)[:, None, :] >> shifts[None, :, None]) & 0xF
    return codes.reshape(-1, words.shape[1]).astype(np.int16)


def _unpack_cols(words: np.ndarray) -> np.ndarray:
    """int32 words of eight 4-bit codes along axis 1 -> codes (8x the columns)."""
    shifts = np.arange(0, 32, 4, dtype=np.uint32)
    codes = (words.astype(np.uint32)[:, :, None] >> shifts[None, None, :]) & 0xF
    return codes.reshape(words.shape[0], -1).astype(np.int16)


def _layer(f, prefix: str, zero_offset: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight [out, in], scale of each weight [out, in]) of one GPTQ linear layer, fp32."""
    codes = _unpack_rows(f.get_tensor(f"{prefix}.qweight"))  # [in, out]
    zeros = _unpack_cols(f.get_tensor(f"{prefix}.qzeros")) + zero_offset  # [groups, out]
    scales = f.get_tensor(f"{prefix}.scales").astype(np.float32)  # [groups, out]
    g_idx = f.get_tensor(f"{prefix}.g_idx").astype(np.int64)  # [in]
    n_in = codes.shape[0]
    blocks = g_idx[: n_in - n_in % BLOCK].reshape(-1, BLOCK) if n_in % BLOCK == 0 else None
    if blocks is None or (blocks != blocks[:, :1]).any():
        raise PolmError(
            f"{STAGE}: {prefix}: its groups do not cover whole {BLOCK}-column blocks "
            "(q4_0 holds one scale per block)."
        )
    zero = zeros[g_idx]  # [in, out]
    if (zero != 8).any():
        raise PolmError(f"{STAGE}: {prefix}: zero points other than 8 (not symmetric).")
    scale = scales[g_idx]  # [in, out]
    weight = scale * (codes - zero).astype(np.float32)
    return np.ascontiguousarray(weight.T), np.ascontiguousarray(scale.T)


def write_hf_twins(parent: Checkpoint, values_dir: Path, scales_dir: Path) -> int:
    """The dequantized model and its scale twin (see the module docstring) as HF directories,
    one after the other (one model's tensors in memory at a time); returns how many GPTQ layers
    they hold."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from polm.stage import carry_files

    q = quantization_config(parent)
    # GPTQModel's ``gptq`` (v1) format stores each zero point minus one; ``gptq_v2`` does not
    zero_offset = 0 if q.get("checkpoint_format") == "gptq_v2" else 1
    config = json.loads((parent.path / "config.json").read_text())
    config.pop("quantization_config", None)
    layers = 0
    for dst, want_scales in ((values_dir, False), (scales_dir, True)):
        tensors: dict[str, np.ndarray] = {}
        for file in sorted(parent.path.glob("*.safetensors")):
            with safe_open(file, "np") as f:
                keys = list(f.keys())
                prefixes = sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith(".qweight")})
                for prefix in prefixes:
                    weight, scale = _layer(f, prefix, zero_offset)
                    # the scales are fp16 in the checkpoint: exact in fp16 here too
                    scale = scale.astype(np.float16)
                    tensors[f"{prefix}.weight"] = scale if want_scales else weight
                layers += len(prefixes) if want_scales else 0
                for k in keys:
                    if k.rsplit(".", 1)[0] in prefixes and k.rsplit(".", 1)[1] in PACKED:
                        continue
                    t = f.get_tensor(k)
                    if want_scales:
                        tensors[k] = np.full(t.shape, np.nan, np.float16)
                    else:
                        tensors[k] = t.astype(np.float32) if t.dtype.kind == "f" else t
        dst.mkdir(parents=True)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        (dst / "config.json").write_text(json.dumps(config, indent=2))
        carry_files(parent.path, dst)
    return layers


def pack_q4_0(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``block_q4_0`` bytes, [rows, blocks * 18], of weights ``values`` that are ``scales`` times
    integers in [-8, 7] (both [rows, cols], cols a multiple of 32, one scale per block)."""
    rows, cols = values.shape
    v = values.reshape(rows, cols // BLOCK, BLOCK)
    d = scales.reshape(rows, cols // BLOCK, BLOCK)[:, :, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(d[..., None] != 0, v / d[..., None], 0.0)
    codes = np.rint(k).astype(np.int16) + 8
    if (np.abs(k - np.rint(k)) > 1e-3).any() or (codes < 0).any() or (codes > 15).any():
        raise PolmError(f"{STAGE}: a GPTQ block is not whole codes times its scale.")
    codes = codes.astype(np.uint8)
    qs = codes[..., :16] | (codes[..., 16:] << 4)  # [rows, blocks, 16]
    half = d.astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    return np.concatenate([half, qs], axis=-1).reshape(rows, -1)


def patch_q4_0(target: Path, values_file: Path, scales_file: Path) -> int:
    """Overwrite, in the ``q4_0`` file ``target``, each q4_0 tensor the scale twin marks as
    GPTQ's with GPTQ's blocks; returns how many were written."""
    from gguf import GGMLQuantizationType, GGUFReader

    values = {t.name: t for t in GGUFReader(values_file).tensors}
    scales = {t.name: t for t in GGUFReader(scales_file).tensors}
    written = 0
    reader = GGUFReader(target, "r+")
    for t in reader.tensors:
        if t.tensor_type != GGMLQuantizationType.Q4_0 or t.name not in scales:
            continue
        scale = np.asarray(scales[t.name].data, dtype=np.float32)
        if not (np.isfinite(scale).all() and (scale >= 0).all()):
            continue  # not a GPTQ layer: llama.cpp's own q4_0 stays
        value = np.asarray(values[t.name].data, dtype=np.float32)
        cols = value.shape[-1]
        blocks = pack_q4_0(value.reshape(-1, cols), scale.reshape(-1, cols))
        t.data[...] = blocks.reshape(t.data.shape)
        written += 1
    reader.data.flush()
    return written


def export(parent: Checkpoint, work: Path, target: Path, convert, quantize, meta: dict) -> dict:
    """Write ``target`` (q4_0) from the GPTQ checkpoint ``parent`` with GPTQ's own blocks; the
    intermediate files live in ``work`` and are removed. ``convert`` / ``quantize``: llama.cpp's
    converter and quantizer (:mod:`optimize.gguf`)."""
    values_dir, scales_dir = work / "dequantized", work / "scales"
    layers = write_hf_twins(parent, values_dir, scales_dir)
    try:
        convert(values_dir, work / "values.gguf", "f32", meta)
        convert(scales_dir, work / "scales.gguf", "f32", meta)
        quantize(work / "values.gguf", target, "q4_0")
        written = patch_q4_0(target, work / "values.gguf", work / "scales.gguf")
    finally:
        for path in (values_dir, scales_dir, work / "values.gguf", work / "scales.gguf"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(True)
    if written != layers:
        raise PolmError(
            f"{STAGE}: {written} of the {layers} GPTQ layers of {parent.path} became q4_0 blocks "
            "(llama.cpp chose another type for the others); nothing was written."
        )
    return {"gguf.gptq_blocks": written}
