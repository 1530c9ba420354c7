"""merge.lora with real PEFT on tiny real adapters: one adapter folds exactly as PEFT's own
merge_and_unload, weights scale the update, combinations write adapters polm loads and models
transformers runs, DARE is seeded, and wrong inputs are refused before any weight is read."""

import json
import shutil

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from align.sft import SFTSettings
from align.sft import run as sft
from merge.lora import LoraMergeSettings
from merge.lora import run as merge
from polm.checkpoint import Checkpoint
from polm.errors import PolmError
from polm.loading import load_model
from tests.helpers import polm_cli

IDS = torch.tensor([[1, 5, 9, 12, 7]])


def lora(task, steps=8, lr=5e-3):
    return SFTSettings(
        task=task,
        method="lora",
        output_format="peft-adapter",
        max_steps=steps,
        r=4,
        learning_rate=lr,
        per_device_train_batch_size=8,
        n_train=64,
    )


@pytest.fixture(scope="module")
def adapters(base_ckpt, tmp_path_factory):
    """Two LoRA adapters on the base (add, reverse)."""
    d = tmp_path_factory.mktemp("adapters")
    return sft([base_ckpt], lora("add"), d / "add"), sft([base_ckpt], lora("reverse"), d / "rev")


@pytest.fixture(scope="module")
def others(base_ckpt, tmp_path_factory):
    """A full fine-tune of the base, an adapter on that other model, and a prefix adapter."""
    d = tmp_path_factory.mktemp("others")
    small = {"per_device_train_batch_size": 4, "n_train": 16}
    full = sft([base_ckpt], SFTSettings(task="add", max_steps=1, **small), d / "full")
    other_adapter = sft([full], lora("add", steps=1), d / "other_adapter")
    prefix = sft(
        [base_ckpt], SFTSettings(task="add", method="prefix", max_steps=1, **small), d / "prefix"
    )
    return full, other_adapter, prefix


def hf_weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def peft_merged(base, adapter) -> dict[str, torch.Tensor]:
    """PEFT's own answer: the adapter loaded on its base and merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base.path)
    return PeftModel.from_pretrained(model, adapter.path).merge_and_unload().state_dict()


def logits(ckpt) -> torch.Tensor:
    model, _ = load_model(ckpt)
    with torch.no_grad():
        return model(IDS).logits


def test_one_adapter_folds_exactly_as_peft_merge_and_unload(base_ckpt, adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    add, _ = adapters
    out = merge([add], LoraMergeSettings(), tmp_path / "m")
    assert out.format == "hf" and out.manifest.stage == "merge.lora"
    assert [p.content_hash for p in out.manifest.parents] == [
        base_ckpt.manifest.content_hash,
        add.manifest.content_hash,
    ]
    got, ref, base = hf_weights(out.path), peft_merged(base_ckpt, add), hf_weights(base_ckpt.path)
    assert got.keys() == ref.keys()
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) <= 1e-5
    assert max((got[k] - base[k]).abs().max().item() for k in ref) > 1e-3  # it did change
    assert all(torch.isfinite(t).all() for t in got.values())
    assert (out.path / "tokenizer.json").read_bytes() == (
        base_ckpt.path / "tokenizer.json"
    ).read_bytes()

    model = AutoModelForCausalLM.from_pretrained(out.path)
    gen = model.generate(IDS, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert gen.shape[1] == IDS.shape[1] + 6


def test_weights_scale_the_update(base_ckpt, adapters, tmp_path):
    add, rev = adapters
    key = "model.layers.0.mlp.down_proj.weight"
    base = hf_weights(base_ckpt.path)[key]
    d_add = peft_merged(base_ckpt, add)[key] - base
    d_rev = peft_merged(base_ckpt, rev)[key] - base

    half = merge([add], LoraMergeSettings(weights=[0.5]), tmp_path / "half")
    torch.testing.assert_close(hf_weights(half.path)[key], base + 0.5 * d_add, atol=1e-6, rtol=0)
    # several adapters without a combination_type: each folded in, W + Σ wᵢ·ΔWᵢ
    both = merge([base_ckpt, add, rev], LoraMergeSettings(weights=[1.0, -0.5]), tmp_path / "both")
    expected = base + d_add - 0.5 * d_rev
    torch.testing.assert_close(hf_weights(both.path)[key], expected, atol=1e-6, rtol=0)
    assert both.manifest.metrics["merge.combination_type"] == "fold"
    assert [p.stage for p in both.manifest.parents] == ["import", "align.sft", "align.sft"]


@pytest.mark.parametrize("combination", ["linear", "ties"])
def test_combined_adapters_load_and_differ_from_each(combination, base_ckpt, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    extra = {"density": 0.5} if combination == "ties" else {}
    s = LoraMergeSettings(combination_type=combination, output_format="peft-adapter", **extra)
    combined = merge(list(adapters), s, tmp_path / "adapter")
    assert combined.format == "peft-adapter"
    assert combined.manifest.parents[0].content_hash == base_ckpt.manifest.content_hash
    assert combined.manifest.metrics["merge.rank"] == 4
    out = logits(combined)
    assert torch.isfinite(out).all()
    for single in adapters:
        assert (out - logits(single)).abs().max() > 1e-4

    # into hf: the same combination, folded; it equals PEFT merging the combined adapter
    folded = merge(list(adapters), s.model_copy(update={"output_format": "hf"}), tmp_path / "hf")
    got = hf_weights(folded.path)
    model = AutoModelForCausalLM.from_pretrained(base_ckpt.path)
    ref = PeftModel.from_pretrained(model, combined.path).merge_and_unload().state_dict()
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) <= 1e-5
    gen = AutoModelForCausalLM.from_pretrained(folded.path).generate(
        IDS, max_new_tokens=4, min_new_tokens=4, do_sample=False
    )
    assert gen.shape[1] == IDS.shape[1] + 4


def test_the_same_seed_gives_identical_bytes(adapters, tmp_path):
    def dare(seed, name):
        s = LoraMergeSettings(
            combination_type="dare_ties", density=0.5, output_format="peft-adapter", seed=seed
        )
        return merge(list(adapters), s, tmp_path / name).path / "adapter_model.safetensors"

    a, b, c = dare(3, "a"), dare(3, "b"), dare(4, "c")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert all(torch.isfinite(t).all() for t in load_file(a).values())


def fake_quantized_base(base_ckpt, adapter, tmp_path, fmt):
    """A copy of the base whose manifest says ``fmt`` and whose weights are not weights at all
    (so reading them would fail differently), and an adapter that names it as its base."""
    base = tmp_path / fmt
    shutil.copytree(base_ckpt.path, base)
    manifest = json.loads((base / "polm.json").read_text())
    (base / "polm.json").write_text(json.dumps({**manifest, "format": fmt}))
    (base / "model.safetensors").write_bytes(b"packed, not float")
    ad = tmp_path / "adapter_on_quantized"
    shutil.copytree(adapter.path, ad)
    manifest = json.loads((ad / "polm.json").read_text())
    manifest["parents"][0]["path"] = str(base)
    (ad / "polm.json").write_text(json.dumps(manifest))
    return Checkpoint.open(base), Checkpoint.open(ad)


def other_rank(adapter, tmp_path):
    ad = tmp_path / "rank8"
    shutil.copytree(adapter.path, ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    return Checkpoint.open(ad)


@pytest.mark.parametrize(
    "case, settings, message",
    [
        ("full_model", {}, "neither an adapter nor the adapters' base"),
        ("prefix", {}, "PREFIX_TUNING adapter, not LoRA"),
        ("different_bases", {}, "different bases"),
        ("gptq_from_manifest", {}, "GPTQ .*re-quantizing"),
        ("gptq_given", {}, "GPTQ .*re-quantizing"),
        ("onebit_from_manifest", {}, "1-bit .*re-quantizing"),
        ("weights", {"weights": [1.0]}, "1 weights for 2 adapters"),
        ("ranks", {"combination_type": "ties", "density": 0.5}, r"one rank, got \[4, 8\]"),
        ("base_only", {}, "at least one peft-adapter"),
        ("one_adapter", {"combination_type": "svd", "svd_rank": 2}, "svd combines several"),
    ],
)
def test_wrong_inputs_are_refused_before_loading(
    case, settings, message, base_ckpt, adapters, others, tmp_path, monkeypatch
):
    add, rev = adapters
    full, other_adapter, prefix = others
    if case.startswith(("gptq", "onebit")):
        quantized, on_it = fake_quantized_base(base_ckpt, add, tmp_path, case.split("_")[0])
    chosen = {
        "full_model": lambda: [add, full],
        "prefix": lambda: [prefix],
        "different_bases": lambda: [add, other_adapter],
        "gptq_from_manifest": lambda: [on_it],
        "gptq_given": lambda: [quantized, on_it],
        "onebit_from_manifest": lambda: [on_it],
        "weights": lambda: [add, rev],
        "ranks": lambda: [add, other_rank(rev, tmp_path)],
        "base_only": lambda: [base_ckpt],
        "one_adapter": lambda: [add],
    }[case]()

    def no_loading(*a, **k):
        raise AssertionError("weights were loaded before the inputs were checked")

    monkeypatch.setattr("polm.loading.load_model", no_loading)
    with pytest.raises(PolmError, match=message):
        merge(chosen, LoraMergeSettings(**settings), tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"combination_type": "ties"}, "needs density"),
        ({"density": 0.5}, "density is used only by"),
        ({"combination_type": "cat", "svd_rank": 4}, "svd_rank is used only by"),
        ({"combination_type": "tie"}, "combination_type"),
    ],
)
def test_bad_settings_fail_at_validation(settings, message):
    with pytest.raises(ValidationError, match=message):
        LoraMergeSettings(**settings)


def test_the_cli_runs_the_stage_and_names_a_typo(adapters, tmp_path):
    add, rev = adapters
    r = polm_cli(
        "merge", "lora", "--from", add.path, rev.path, "--out", tmp_path / "m",
        "--set", "combination_typ=ties",
    )  # fmt: skip
    assert r.returncode == 2 and "error:" in r.stderr
    assert "did you mean 'combination_type'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists()

    r = polm_cli(
        "merge", "lora", "--from", add.path, rev.path, "--out", tmp_path / "m",
        "--set", "weights=[1, 0.5]", "--set", "output_format=peft-adapter",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = Checkpoint.open(tmp_path / "m")
    assert out.format == "peft-adapter" and out.manifest.settings["weights"] == [1.0, 0.5]
    assert out.manifest.metrics["merge.combination_type"] == "cat"
    assert out.manifest.metrics["merge.rank"] == 8
