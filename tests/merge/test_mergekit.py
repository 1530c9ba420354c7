"""merge.mergekit with the real mergekit on tiny real models: every method writes a model that
transformers loads and runs, parents are recorded, seeds make DARE reproducible, a mergekit YAML
runs unchanged, and bad settings fail before any weight is read."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from align.sft import SFTSettings
from align.sft import run as sft
from merge.mergekit import METHODS, MergekitSettings
from merge.mergekit import run as merge
from polm.checkpoint import Checkpoint
from polm.errors import PolmError
from tests.helpers import polm_cli

TWO_INPUTS = {"slerp", "nearswap", "arcee_fusion"}  # base + one model
SHARED = {"slerp": {"t": 0.5}, "nearswap": {"t": 1e-4}}


@pytest.fixture(scope="module")
def experts(base_ckpt, tmp_path_factory):
    """Two short SFT runs from the same base, on different tasks."""
    d = tmp_path_factory.mktemp("experts")
    add = sft([base_ckpt], SFTSettings(task="add", max_steps=8), d / "add")
    rev = sft([base_ckpt], SFTSettings(task="reverse", max_steps=8), d / "rev")
    return add, rev


def weights(ckpt) -> dict[str, torch.Tensor]:
    return load_file(ckpt.path / "model.safetensors")


def merge_yaml(config: str, tmp_path) -> Checkpoint:
    """``polm merge mergekit --config`` on a mergekit YAML, as a user runs it."""
    (tmp_path / "merge.yml").write_text(config)
    r = polm_cli("merge", "mergekit", "--config", tmp_path / "merge.yml", "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    return Checkpoint.open(tmp_path / "m")


@pytest.mark.parametrize("method", [m for m in METHODS if m != "passthrough"])  # needs slices
def test_every_method_writes_a_model_transformers_loads_and_runs(
    method, base_ckpt, experts, tmp_path
):
    from transformers import AutoModelForCausalLM

    add, rev = experts
    if method in TWO_INPUTS:
        inputs, settings = [add, rev], {"base_model": "add"}
    else:
        inputs, settings = [base_ckpt, add, rev], {}
    out = merge(
        inputs,
        MergekitSettings(merge_method=method, parameters=SHARED.get(method, {}), **settings),
        tmp_path / "m",
    )
    assert out.manifest.stage == "merge.mergekit" and out.format == "hf"
    parents = {p.content_hash for p in out.manifest.parents}
    assert {add.manifest.content_hash, rev.manifest.content_hash} <= parents

    model = AutoModelForCausalLM.from_pretrained(out.path)
    ids = torch.tensor([[1, 5, 9, 12]])
    gen = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert gen.shape[1] == 10
    merged = weights(out)
    assert all(torch.isfinite(t).all() for t in merged.values())
    key = "model.layers.0.mlp.down_proj.weight"
    assert not any(torch.equal(merged[key], weights(c)[key]) for c in inputs), method


def test_the_base_defaults_to_the_shared_ancestor(base_ckpt, experts, tmp_path):
    add, rev = experts
    out = merge([add, rev], MergekitSettings(merge_method="ties"), tmp_path / "m")
    assert out.manifest.metrics["merge.base"] == base_ckpt.path.name
    assert [p.stage for p in out.manifest.parents] == ["import", "align.sft", "align.sft"]


def test_the_same_seed_gives_identical_bytes(base_ckpt, experts, tmp_path):
    def dare(seed, name):
        s = MergekitSettings(merge_method="dare_ties", parameters={"density": 0.5}, seed=seed)
        return merge([base_ckpt, *experts], s, tmp_path / name).path / "model.safetensors"

    a, b, c = dare(3, "a"), dare(3, "b"), dare(4, "c")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_a_mergekit_yaml_runs_unchanged_but_for_model_paths(base_ckpt, experts, tmp_path):
    add, rev = experts
    config = f"""\
models:
  - model: {add.path}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {rev.path}
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: {base_ckpt.path}
parameters:
  normalize: true
dtype: float32
"""
    out = merge_yaml(config, tmp_path)
    assert [p.path for p in out.manifest.parents] == [
        str(base_ckpt.path),
        str(add.path),
        str(rev.path),
    ]
    assert out.manifest.settings["models"][0]["parameters"] == {"density": 0.5, "weight": 0.5}
    lineage = polm_cli("lineage", tmp_path / "m")
    assert lineage.returncode == 0 and "align.sft" in lineage.stdout


@pytest.mark.parametrize(
    "settings, inputs, message",
    [
        ({"merge_method": "tie"}, "all", "did you mean 'ties'"),
        ({"merge_method": "ties", "parameters": {"densty": 0.5}}, "all", "did you mean 'density'"),
        ({"merge_method": "slerp", "base_model": 0}, "experts", "needs parameters.t"),
        ({"merge_method": "linear", "base_model": "base"}, "all", "takes no base_model"),
        ({"merge_method": "ties", "base_model": "nowhere"}, "all", "not one of the inputs"),
        ({"merge_method": "model_stock", "base_model": "add"}, "experts", "3 to any number"),
        ({"merge_method": "arcee_fusion"}, "all", "exactly 2 models in all"),
    ],
)
def test_bad_settings_name_the_problem(settings, inputs, message, base_ckpt, experts, tmp_path):
    from pydantic import ValidationError

    chosen = [base_ckpt, *experts] if inputs == "all" else list(experts)
    with pytest.raises((PolmError, ValidationError), match=message):
        merge(chosen, MergekitSettings(**settings), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_wrong_inputs_are_refused_before_loading(base_ckpt, experts, tmp_path):
    add, _ = experts
    adapter = sft(
        [base_ckpt],
        SFTSettings(task="add", method="lora", output_format="peft-adapter", max_steps=1),
        tmp_path / "adapter",
    )
    with pytest.raises(PolmError, match="merge.lora"):
        merge([add, adapter], MergekitSettings(merge_method="linear"), tmp_path / "m")
    (tmp_path / "plain").mkdir()
    (tmp_path / "merge.yml").write_text(
        yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(tmp_path / "plain")}]})
    )
    r = polm_cli("merge", "mergekit", "--config", tmp_path / "merge.yml", "--out", tmp_path / "m")
    assert r.returncode != 0 and "not a polm checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
    assert json.loads((add.path / "polm.json").read_text())["stage"] == "align.sft"


def test_a_merge_is_recorded_beside_its_inputs_and_their_base(base_ckpt, experts, tmp_path):
    """What `polm run` adds to a merge's manifest: each input's and the base's accuracy, the
    share of the best input it keeps and the share of the gain over the base."""
    import shutil

    from polm.runner import merge_comparison

    given = (("base", base_ckpt, 0.1), ("add", experts[0], 0.9), ("rev", experts[1], 0.3))
    inputs = {}
    for name, ckpt, acc in given:
        shutil.copytree(ckpt.path, tmp_path / name)
        inputs[name] = Checkpoint.open(tmp_path / name)
        inputs[name].update_metrics({"eval.add.accuracy": acc})
    got = merge_comparison({"eval.add.accuracy": 0.7}, inputs, ["add", "reverse"])
    assert got == {
        "merge.input.add.add.accuracy": 0.9,
        "merge.input.rev.add.accuracy": 0.3,
        "merge.of_best.add": round(0.7 / 0.9, 4),
        "merge.base.add.accuracy": 0.1,
        "merge.gain_kept.add": 0.75,  # (0.7 - 0.1) / (0.9 - 0.1); reverse was not measured
    }


def test_input_shards_closed_between_reads_keep_the_bytes(
    base_ckpt, experts, tmp_path, monkeypatch
):
    """The stage closes each input's memory-mapped shard after every read (resident memory);
    the merged bytes equal mergekit's own run with the shards kept open, and mergekit is left
    as it was."""
    from mergekit.config import MergeConfiguration
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader
    from mergekit.merge import MergeOptions, run_merge

    from merge.mergekit import plan, shards_closed_between_reads

    monkeypatch.setattr("merge.mergekit.CLOSE_SHARDS_FROM_BYTES", 0)  # tiny inputs too
    original = LazyTensorLoader.get_tensor
    s = MergekitSettings(merge_method="ties", parameters={"density": 0.5})
    ours = merge([base_ckpt, *experts], s, tmp_path / "closed")
    assert LazyTensorLoader.get_tensor is original
    cfg, _ = plan(s, [base_ckpt, *experts])
    options = MergeOptions(random_seed=0, copy_tokenizer=False, quiet=True, device="cpu")
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "open"), options=options)
    theirs = load_file(tmp_path / "open" / "model.safetensors")
    assert weights(ours).keys() == theirs.keys()
    assert all(torch.equal(weights(ours)[k], theirs[k]) for k in theirs)

    loader = LazyTensorLoader.from_disk(str(base_ckpt.path), lazy_unpickle=False)
    with shards_closed_between_reads():
        loader.get_tensor("model.norm.weight")
        assert loader.current_shard is None
    loader.get_tensor("model.norm.weight")
    assert loader.current_shard is not None


def test_a_small_out_shard_size_writes_the_same_tensors_in_several_files(
    base_ckpt, experts, tmp_path
):
    """``out_shard_size`` bounds what mergekit's writer holds in memory: the output is split in
    files of at most that many bytes, with the index transformers reads, and the tensors are the
    single-file merge's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    s = {"merge_method": "ties", "parameters": {"density": 0.5}}
    whole = merge([base_ckpt, *experts], MergekitSettings(**s), tmp_path / "whole")
    split = merge(
        [base_ckpt, *experts], MergekitSettings(**s, out_shard_size="1M"), tmp_path / "split"
    )
    files = sorted(split.path.glob("*.safetensors"))
    assert len(files) > 1 and (split.path / "model.safetensors.index.json").is_file()
    assert len(list(whole.path.glob("*.safetensors"))) == 1
    got = {k: v for f in files for k, v in load_file(f).items()}
    want = weights(whole)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    model = AutoModelForCausalLM.from_pretrained(split.path)
    assert model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3).shape[1] == 6
    with pytest.raises(ValueError, match="at least 1M"):
        MergekitSettings(**s, out_shard_size="12x")


def _layers(ckpt) -> int:
    return json.loads((ckpt.path / "config.json").read_text())["num_hidden_layers"]


def test_passthrough_slices_stack_layers_as_mergekits_docs_write_them(base_ckpt, tmp_path):
    """Depth up-scaling from one base, in mergekit's own syntax: the stacked model has the
    layers the slices say, each one a copy of its source layer, and transformers runs it."""
    from transformers import AutoModelForCausalLM

    depth = _layers(base_ckpt)
    config = f"""\
slices:
  - sources:
      - model: {base_ckpt.path}
        layer_range: [0, {depth}]
  - sources:
      - model: {base_ckpt.path}
        layer_range: [{depth // 2}, {depth}]
merge_method: passthrough
dtype: float32
"""
    out = merge_yaml(config, tmp_path)
    assert _layers(out) == depth + depth - depth // 2
    assert [p.content_hash for p in out.manifest.parents] == [base_ckpt.manifest.content_hash]
    assert out.manifest.metrics["merge.models"] == (
        f"{base_ckpt.path.name}[0:{depth}] | {base_ckpt.path.name}[{depth // 2}:{depth}]"
    )
    src, got = weights(base_ckpt), weights(out)
    key = "model.layers.{}.self_attn.q_proj.weight"
    for i in range(depth - depth // 2):  # the second slice's layers follow the first's
        assert torch.equal(got[key.format(depth + i)], src[key.format(depth // 2 + i)])
    model = AutoModelForCausalLM.from_pretrained(out.path)
    gen = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, min_new_tokens=4)
    assert gen.shape[1] == 7
    from polm.evaluate import evaluate_checkpoint  # evaluated like any other checkpoint

    scores = evaluate_checkpoint(out, ["add"], n=8)
    assert scores["eval.add.n"] == 8 and 0 <= scores["eval.add.accuracy"] <= 1


def test_a_gradient_slerp_over_slices_runs_as_mergekits_docs_write_it(experts, tmp_path):
    """mergekit's README example, slerp with ``t`` graded over the layers and filtered by
    module: the first layer's attention is the base's and the last one's the other model's,
    the other way round for the MLP; both models are parents."""
    add, rev = experts
    depth = _layers(add)
    config = f"""\
slices:
  - sources:
      - model: {add.path}
        layer_range: [0, {depth}]
      - model: {rev.path}
        layer_range: [0, {depth}]
merge_method: slerp
base_model: {add.path}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
"""
    out = merge_yaml(config, tmp_path)
    assert _layers(out) == depth
    hashes = [p.content_hash for p in out.manifest.parents]
    assert hashes == [add.manifest.content_hash, rev.manifest.content_hash]
    got, a, b = weights(out), weights(add), weights(rev)
    attn, mlp = "model.layers.{}.self_attn.q_proj.weight", "model.layers.{}.mlp.up_proj.weight"
    last = depth - 1
    assert torch.allclose(got[attn.format(0)], a[attn.format(0)])
    assert torch.allclose(got[attn.format(last)], b[attn.format(last)])
    assert torch.allclose(got[mlp.format(0)], b[mlp.format(0)])
    assert torch.allclose(got[mlp.format(last)], a[mlp.format(last)])
    middle = got[attn.format(1)]
    assert not torch.allclose(middle, a[attn.format(1)]) and not torch.allclose(
        middle, b[attn.format(1)]
    )


@pytest.mark.parametrize(
    "slices, message",
    [
        (
            [{"sources": [{"model": 0, "layer_range": [0, 99]}]}],
            r"slices\[0\].sources\[0\]: .*past",
        ),
        (
            [
                {
                    "sources": [
                        {"model": 0, "layer_range": [0, 2]},
                        {"model": 1, "layer_range": [0, 3]},
                    ]
                }
            ],
            "differ in length",
        ),
        (
            [
                {
                    "sources": [
                        {"model": 0, "layer_range": [0, 2]},
                        {"model": 1, "layer_range": [0, 2]},
                    ]
                }
            ],
            r"passthrough \(slices\[0\]\) merges exactly 1",
        ),
        ([{"sources": [{"model": 0, "layer_range": [2, 2]}]}], "0 <= start < end"),
    ],
)
def test_bad_slices_name_the_slice_and_source(slices, message, base_ckpt, experts, tmp_path):
    from pydantic import ValidationError

    with pytest.raises((PolmError, ValidationError), match=message):
        s = MergekitSettings(merge_method="passthrough", slices=slices)
        merge([base_ckpt, *experts], s, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValidationError, match="passthrough copies layer slices"):
        MergekitSettings(merge_method="passthrough")
