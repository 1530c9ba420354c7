"""optimize.onebit: packing is exact and takes the bits it claims, the spine's loader rebuilds
exactly the quantized model, plain transformers refuses the directory loudly, and recovery by
straight-through distillation brings a binary and a ternary model back to their parent."""

import json
import shutil

import pytest
import torch
from gguf import GGUFReader
from pydantic import ValidationError

from optimize.gguf import GgufSettings
from optimize.gguf import run as gguf_export
from optimize.onebit import OneBitSettings, quantize_model, run, svid
from polm.checkpoint import Checkpoint, tensor_specs
from polm.errors import PolmError
from polm.evaluate import evaluate_checkpoint
from polm.loading import load_model
from polm.onebit import (
    dequantize_rows,
    pack_signs,
    pack_trits,
    quantize_rows,
    unpack_signs,
    unpack_trits,
)
from tests.helpers import polm_cli

IDS = torch.tensor([[1, 5, 9, 12, 7, 3]])


def roundtrip(w, bits: int):
    """``w`` stored as the onebit file stores an embedding at ``bits``, and read back."""
    stored = {f"e.{k}" if k else "e": v for k, v in quantize_rows(w, bits).items()}
    return dequantize_rows(stored, "e", bits, list(w.shape))


def test_signs_and_trits_pack_exactly_into_1_and_1_6_bits():
    torch.manual_seed(0)
    w = torch.randn(7, 13)
    packed = pack_signs(w)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 2)  # ceil(13 / 8)
    assert torch.equal(unpack_signs(packed, 13), torch.where(w >= 0, 1.0, -1.0))
    q = torch.randint(-1, 2, (7, 13)).float()
    trits = pack_trits(q)
    assert trits.dtype == torch.uint8 and trits.shape == (7, 3)  # ceil(13 / 5)
    assert torch.equal(unpack_trits(trits, 13), q)


def test_svid_scales_fit_the_magnitudes_better_than_one_scalar():
    torch.manual_seed(0)
    w = torch.randn(64, 32) * torch.linspace(0.1, 2.0, 32)  # columns of different scales
    a, b = svid(w)
    assert (a >= 0).all() and (b >= 0).all()
    signs = torch.where(w >= 0, 1.0, -1.0)
    rank_one = (w - signs * a[:, None] * b[None, :]).norm()
    scalar = (w - signs * w.abs().mean()).norm()
    assert rank_one < 0.9 * scalar


@pytest.fixture(scope="module")
def plain(base_ckpt, tmp_path_factory):
    """Binary and ternary quantizations of the base without recovery."""
    d = tmp_path_factory.mktemp("onebit")
    return {
        method: run([base_ckpt], OneBitSettings(method=method, recovery=False), d / method)
        for method in ("binary", "ternary")
    }


def test_bits_on_disk_and_the_manifest(plain, base_ckpt):
    binary, ternary = plain["binary"].manifest.metrics, plain["ternary"].manifest.metrics
    assert binary["onebit.code_bits_per_weight"] == pytest.approx(1.0)
    # fp16 row + column scales
    assert binary["onebit.linear_bits_per_weight"] <= 1.1 + 16 * (1 / 128 + 1 / 128)
    assert 1.6 <= ternary["onebit.code_bits_per_weight"] <= 1.65  # rows padded to 5 trits
    assert ternary["onebit.linear_bits_per_weight"] <= 2.1
    for ckpt in plain.values():  # the whole file over every weight: nothing above 16 bits
        m = ckpt.manifest.metrics
        file = ckpt.path / "onebit.safetensors"
        header = 8 + int.from_bytes(file.read_bytes()[:8], "little")  # safetensors' JSON
        payload = file.stat().st_size - header
        assert m["bits_per_weight"] == pytest.approx(8 * payload / m["params"], rel=1e-6)
        assert m["onebit.linear_bits_per_weight"] < m["bits_per_weight"] < 16
        assert not [
            k for k, (dtype, _) in tensor_specs(ckpt.path / "onebit.safetensors").items()
            if dtype in ("F32", "F64", "I32", "I64")
        ]  # fmt: skip
    for m in (binary, ternary):
        assert m["onebit.quantized_bytes"] <= 0.07 * m["onebit.fp32_bytes"]
        assert m["onebit.quantized_layers"] == 7 * 4  # q k v o gate up down, 4 layers
        assert m["size_bytes"] < 0.6 * base_ckpt.manifest.metrics["size_bytes"]
    assert plain["binary"].format == "onebit"
    r = polm_cli("inspect", plain["ternary"].path)
    assert r.returncode == 0 and "bits_per_weight" in r.stdout and "1.7" in r.stdout, r.stdout


def test_the_loader_rebuilds_exactly_the_quantized_model(plain, base_ckpt):
    for method, ckpt in plain.items():
        loaded, _ = load_model(ckpt)
        reference, _ = load_model(base_ckpt)
        with torch.no_grad():  # what the file stores besides the linear layers: the norms in
            for name, p in reference.named_parameters():  # bfloat16, the embedding in int8 rows
                if "norm" in name:
                    p.copy_(p.bfloat16().float())
            emb = reference.get_input_embeddings().weight
            emb.copy_(roundtrip(emb, 8))
        quantize_model(reference, method)
        if method == "binary":  # the stored scales are fp16
            for m in reference.modules():
                if hasattr(m, "row_scale"):
                    m.row_scale.data = m.row_scale.data.half().float()
                    m.col_scale.data = m.col_scale.data.half().float()
        with torch.no_grad():
            ours, want = loaded(IDS).logits, reference.eval()(IDS).logits
        # (the ternary scales are stored in fp16 and recomputed in fp32 by the reference)
        assert torch.allclose(ours, want, atol=5e-3), (method, (ours - want).abs().max())
        q = loaded.model.layers[0].self_attn.q_proj.weight
        distinct = q.abs().unique(dim=None).numel()
        assert (
            distinct > 2
            if method == "binary"
            else q.div(q.abs().amax(1, keepdim=True)).unique().numel() <= 3
        )
        out = loaded.generate(IDS, max_new_tokens=3, do_sample=False)
        assert out.shape == (1, IDS.shape[1] + 3) and torch.isfinite(ours).all()


def test_the_embedding_stored_in_8_and_4_bits_round_trips_and_shrinks_the_file(
    base_ckpt, plain, tmp_path
):
    """int8 rows are near lossless; 4-bit groups of 32 are coarser but still the same table
    (each weight within half a step of its group's scale); the file shrinks with the bits."""
    w = torch.randn(300, 70) * torch.linspace(0.01, 3.0, 300)[:, None]  # rows of many scales
    # half a step of each row's (group's) scale, plus the scale's own fp16 rounding
    for bits, tolerance in ((16, 1 / 256), (8, 1 / 254 + 1 / 2048), (4, 1 / 14 + 1 / 2048)):
        back = roundtrip(w, bits)
        assert back.shape == w.shape
        err = (back - w).abs() / w.abs().amax(1, keepdim=True)
        assert err.max() <= tolerance, (bits, err.max())
    sizes = {}
    for bits in (16, 4):
        s = OneBitSettings(method="ternary", recovery=False, embedding_bits=bits)
        ckpt = run([base_ckpt], s, tmp_path / str(bits))
        sizes[bits] = (ckpt.path / "onebit.safetensors").stat().st_size
        loaded, _ = load_model(ckpt)
        assert loaded.generate(IDS, max_new_tokens=3, do_sample=False).shape[1] == IDS.shape[1] + 3
        assert ckpt.manifest.metrics["onebit.embedding_bits"] == bits
    sizes[8] = (plain["ternary"].path / "onebit.safetensors").stat().st_size
    assert sizes[4] < sizes[8] < sizes[16]


def test_plain_transformers_refuses_the_directory_instead_of_random_weights(plain):
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(plain["binary"].path)


def test_wrong_inputs_are_refused(base_ckpt, plain, tmp_path):
    with pytest.raises(PolmError, match="needs data for recovery.*records no training data"):
        run([base_ckpt], OneBitSettings(method="binary"), tmp_path / "nodata")
    with pytest.raises(ValidationError, match="method"):
        OneBitSettings(method="2bit", recovery=False)
    with pytest.raises(PolmError, match="expects a checkpoint of format 'hf'.*'onebit'"):
        run([plain["binary"]], OneBitSettings(recovery=False), tmp_path / "again")
    broken = tmp_path / "broken"
    shutil.copytree(plain["ternary"].path, broken)
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["polm_onebit"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PolmError, match="not a polm onebit checkpoint"):
        load_model(Checkpoint.open(broken))
    assert not (tmp_path / "again").exists()


def test_short_recovery_moves_a_ternary_model_back_and_llama_cpp_runs_it(add_sft, tmp_path):
    """No task: recovery trains on the SFT's own task, from its manifest (100 steps bringing a
    binary and a ternary model back to 90% of their parent: bench/calibrations/test_onebit.py)."""
    ckpt = run(
        [add_sft], OneBitSettings(method="ternary", max_steps=30, eval_n=100), tmp_path / "t"
    )
    assert ckpt.manifest.settings["task"] == "add"
    assert ckpt.manifest.metrics["data.from_lineage"].startswith("task add from align.sft")
    after = evaluate_checkpoint(ckpt, ["add"], n=100, with_perplexity=False)
    before = ckpt.manifest.metrics["onebit.before_recovery.add.accuracy"]
    assert after["eval.add.accuracy"] > before, (before, after)
    # the ternary model ends in a file stock llama.cpp runs, answering as the model does
    tq2 = gguf_export([ckpt], GgufSettings(outtype="tq2_0", parity_n=0), tmp_path / "tq2")
    g = evaluate_checkpoint(tq2, ["add"], n=100, with_perplexity=False)["eval.add.accuracy"]
    assert g >= 0.9 * after["eval.add.accuracy"], (after, g)
    types = {t.name: t.tensor_type.name for t in GGUFReader(tq2.path / "model.gguf").tensors}
    # every decoder weight whose rows hold whole 256-weight blocks (tiny-base: down_proj,
    # 512 wide) is TQ2_0; narrower ones fall back to F16 in llama.cpp's converter
    assert {types[f"blk.{i}.ffn_down.weight"] for i in range(4)} == {"TQ2_0"}, types
    assert types["token_embd.weight"] == "F16"
