"""optimize.gptq with real GPTQModel on CPU: accuracy kept at 8, 4 and 3 bits, the output
reloads through plain transformers and is smaller, an MoE expert that no calibration token
reaches does not break quantization or loading, and wrong inputs are refused before loading."""

import json
import shutil

import pytest
import torch
from pydantic import ValidationError

from optimize.gptq import GPTQSettings, run
from polm.checkpoint import DTYPE_BYTES, Checkpoint, staging, tensor_specs
from polm.errors import PolmError
from polm.evaluate import evaluate_checkpoint
from polm.loading import load_model

N = 200  # held-out add examples


@pytest.fixture(scope="module")
def parent_accuracy(add_sft):
    return evaluate_checkpoint(add_sft, ["add"], n=N, with_perplexity=False)["eval.add.accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "bits,keep,extra",
    [
        (4, 0.98, {}),  # no task: the SFT's own (lineage first)
        (8, 0.97, {"task": "add"}),
        (3, 0.97, {"task": "add", "desc_act": True, "sym": False}),
    ],
)
def test_gptq_keeps_accuracy_reloads_and_shrinks(
    bits, keep, extra, add_sft, parent_accuracy, tmp_path
):
    from transformers import AutoModelForCausalLM

    ckpt = run(
        [add_sft],
        GPTQSettings(bits=bits, group_size=32, n_calibration=128, **extra),
        tmp_path / "q",
    )
    assert ckpt.format == "gptq" and ckpt.manifest.parents[0].path == str(add_sft.path)
    assert ckpt.manifest.settings["task"] == "add"
    import gptqmodel

    # the workers are stopped after each stage (the parametrized runs each start a new pool)
    assert gptqmodel._DEVICE_THREAD_POOL is None
    if "task" not in extra:  # taken from the parent's manifest, and said so
        note = ckpt.manifest.metrics["data.from_lineage"]
        assert note.startswith("task add from align.sft") and str(add_sft.path) in note
    else:
        assert "data.from_lineage" not in ckpt.manifest.metrics
    acc = evaluate_checkpoint(ckpt, ["add"], n=N, with_perplexity=False)["eval.add.accuracy"]
    assert acc >= keep * parent_accuracy, (bits, parent_accuracy, acc)
    m = ckpt.manifest.metrics
    assert m["gptq.size_ratio"] <= 0.30 and m["gptq.quantized_bytes"] > 0, m
    assert bits <= m["bits_per_weight"] <= bits + 1.5, m  # group scales and zeros on top
    # plain transformers reads GPTQModel's layout (with optimum and GPTQModel installed)
    model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32)
    cfg = model.config.quantization_config
    assert (cfg.bits if hasattr(cfg, "bits") else cfg["bits"]) == bits
    out = model.generate(torch.tensor([[1, 5, 9, 12]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    # the parent's generation config and tokenizer, not GPTQModel's rewrites
    for name in ("generation_config.json", "tokenizer.json"):
        assert (ckpt.path / name).read_bytes() == (add_sft.path / name).read_bytes()
    # nothing is stored in more than 16 bits but GPTQ's packed int32 words: the embedding,
    # norms and head that stay unquantized are fp16 (they were fp32, 3x a GGUF Q4_K_M)
    specs = tensor_specs(ckpt.path)
    wide = {k: d for k, (d, _) in specs.items() if DTYPE_BYTES[d] > 2}
    assert wide and all(d == "I32" for d in wide.values()), wide
    assert {k.rpartition(".")[2] for k in wide} <= {"qweight", "qzeros", "g_idx"}, wide
    assert specs["model.embed_tokens.weight"][0] == "F16"


@pytest.mark.slow
def test_gptq_of_a_pruned_model_keeps_its_zeros(add_sft, tmp_path):
    """GPTQ's error compensation writes into pruned positions; keep_zeros holds them at 0."""
    from safetensors.torch import load_file

    from optimize.gptq import packed_zero_fraction, packed_zeros
    from optimize.prune import PruneSettings
    from optimize.prune import run as prune

    pruned = prune([add_sft], PruneSettings(recovery=False, eval_n=0), tmp_path / "pruned")
    parent = load_file(pruned.path / "model.safetensors")
    settings = dict(bits=4, group_size=32, n_calibration=64, task="add")
    kept = run([pruned], GPTQSettings(**settings), tmp_path / "kept")
    lost = run([pruned], GPTQSettings(**settings, keep_zeros=False), tmp_path / "lost")

    def filled(ckpt):  # pruned positions that dequantize to something other than 0
        found = packed_zeros(ckpt.path, 4)
        assert len(found) == 4 * 7  # every linear layer of the 4 blocks
        was_zero = {layer: parent[f"{layer}.weight"] == 0 for layer in found}
        assert all(z.float().mean() >= 0.49 for z in was_zero.values())  # 50% sparse
        return sum(int((was_zero[k] & ~z).sum()) for k, z in found.items())

    assert filled(kept) == 0  # every pruned weight still zero
    assert filled(lost) > 0.01 * 0.5 * 491_520  # without it, GPTQ fills some in (5.8%)
    fraction = kept.manifest.metrics["gptq.zero_fraction"]
    assert fraction == packed_zero_fraction(kept.path, 4) >= 0.5


def _silence_expert(moe_ckpt: Checkpoint, out) -> Checkpoint:
    """The MoE with expert 1's router row equal to expert 0's: with one expert per token, the
    tie goes to expert 0 and expert 1 receives no token."""
    model, tokenizer = load_model(moe_ckpt)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight[1] = layer.mlp.gate.weight[0]
    with staging(out) as st:
        model.save_pretrained(st.dir)
        tokenizer.save_pretrained(st.dir)
        return st.commit(stage="test.silence_expert", format="hf", parents=[moe_ckpt])


@pytest.mark.slow
def test_an_expert_without_calibration_tokens_does_not_break_gptq(base_ckpt, tmp_path):
    from merge.moe import MoESettings
    from merge.moe import run as moe

    upcycled = moe(
        [base_ckpt],
        MoESettings(num_experts=2, experts_per_token=1, gate_mode="random", noise_scale=0.01),
        tmp_path / "moe",
    )
    silent = _silence_expert(upcycled, tmp_path / "silent")
    ckpt = run(
        [silent],
        GPTQSettings(bits=4, group_size=32, task="reverse", n_calibration=32),
        tmp_path / "q",
    )
    routed = ckpt.manifest.metrics["gptq.expert_tokens"]
    assert len(routed) == 4 and all(counts[1] == 0 and counts[0] > 0 for counts in routed.values())
    assert ckpt.manifest.metrics["gptq.min_expert_tokens"] == 0
    model, _ = load_model(ckpt)
    names = [n for n, _ in model.named_modules() if "experts" in n]
    assert names, "the experts were not kept"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 12]])).logits
    assert torch.isfinite(logits).all()
    out = model.generate(torch.tensor([[1, 5, 9, 12]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_settings_and_inputs_are_checked_before_loading(base_ckpt, tmp_path):
    with pytest.raises(ValidationError, match="bits"):
        GPTQSettings(bits=5, task="add")
    with pytest.raises(ValidationError, match="not both"):
        GPTQSettings(bits=4, task="add", dataset="calib.jsonl")
    # no data given, and the lineage has none to take: asked for, before any weights load
    with pytest.raises(PolmError, match="needs calibration data.*records no training data"):
        run([base_ckpt], GPTQSettings(bits=4), tmp_path / "nodata")
    with pytest.raises(ValidationError, match="group_size"):
        GPTQSettings(task="add", group_size=0)
    for fmt in ("peft-adapter", "onebit", "gptq"):
        bad = tmp_path / fmt
        shutil.copytree(base_ckpt.path, bad)
        manifest = json.loads((bad / "polm.json").read_text())
        (bad / "polm.json").write_text(json.dumps({**manifest, "format": fmt}))
        (bad / "model.safetensors").write_bytes(b"not weights")
        with pytest.raises(PolmError, match=f"expects a checkpoint of format 'hf'.*'{fmt}'"):
            run([Checkpoint.open(bad)], GPTQSettings(task="add"), tmp_path / f"out-{fmt}")
        assert not (tmp_path / f"out-{fmt}").exists()
