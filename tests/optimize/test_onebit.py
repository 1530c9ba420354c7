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
from polm.checkpoint import Checkpoint
from polm.errors import PolmError
from polm.evaluate import evaluate_checkpoint
from polm.loading import load_model
from polm.onebit import pack_signs, pack_trits, unpack_signs, unpack_trits
from tests.helpers import polm_cli

IDS = torch.tensor([[1, 5, 9, 12, 7, 3]])


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
    assert binary["bits_per_weight"] <= 1.1 + 16 * (1 / 128 + 1 / 128)  # fp16 row + column scales
    assert 1.6 <= ternary["onebit.code_bits_per_weight"] <= 1.65  # rows padded to 5 trits
    assert ternary["bits_per_weight"] <= 2.1
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
