"""merge.moe with the real mergekit-moe on tiny real models: every gate mode writes a Mixtral
that transformers loads and runs, upcycling copies one model into N experts, the expert checks
catch a zeroed and a duplicated expert, the routing report sums to one per task, and bad
configurations (mergekit's ``sys.exit`` included) are one clear error."""

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from align.sft import SFTSettings
from align.sft import run as sft
from merge.moe import MoESettings, check_experts
from merge.moe import run as moe
from polm.checkpoint import Checkpoint
from polm.errors import PolmError
from tests.helpers import polm_cli

MLP = ["gate_proj", "up_proj", "down_proj"]
EXPERTS = [
    {"source_model": "add", "task": "add"},
    {"source_model": "rev", "task": "reverse"},
]


@pytest.fixture(scope="module")
def experts(base_ckpt, tmp_path_factory):
    """Two short LoRA-on-MLP runs from the same base, on different tasks."""
    d = tmp_path_factory.mktemp("experts")
    common = dict(method="lora", target_modules=MLP, output_format="hf", max_steps=6)
    add = sft([base_ckpt], SFTSettings(task="add", **common), d / "add")
    rev = sft([base_ckpt], SFTSettings(task="reverse", **common), d / "rev")
    return add, rev


@pytest.fixture(scope="module")
def hidden_moe(base_ckpt, experts, tmp_path_factory):
    s = MoESettings(experts=EXPERTS, prompts_per_expert=16, routing_n=16)
    return moe([base_ckpt, *experts], s, tmp_path_factory.mktemp("moe") / "m")


def generates(path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "MixtralForCausalLM"
    gen = model.generate(torch.tensor([[1, 5, 9, 12]]), max_new_tokens=6, min_new_tokens=6)
    assert gen.shape[1] == 10
    weights = load_file(path / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed", "random"])
def test_each_gate_mode_writes_a_mixtral_that_loads_and_runs(
    gate_mode, base_ckpt, experts, hidden_moe, tmp_path
):
    if gate_mode == "hidden":
        out = hidden_moe
    else:
        s = MoESettings(experts=EXPERTS, gate_mode=gate_mode, prompts_per_expert=16, routing_n=16)
        out = moe([base_ckpt, *experts], s, tmp_path / "m")
    generates(out.path)
    assert out.manifest.stage == "merge.moe" and out.format == "hf"
    assert [p.content_hash for p in out.manifest.parents] == [
        c.manifest.content_hash for c in (base_ckpt, *experts)
    ]
    m = out.manifest.metrics
    assert m["moe.experts"] == ["add", "rev"] and m["moe.base"] == base_ckpt.path.name
    for task in ("add", "reverse"):
        assert sum(m[f"moe.routing.{task}.{e}"] for e in ("add", "rev")) == pytest.approx(1)
        assert len(m[f"moe.routing_layers.{task}.add"]) == 4


def test_hidden_gates_send_each_task_to_its_expert(hidden_moe):
    m = hidden_moe.manifest.metrics
    assert m["moe.routing.add.add"] > 0.5 and m["moe.routing.reverse.rev"] > 0.5


def test_fitting_the_routers_sends_each_task_home(base_ckpt, experts, hidden_moe, tmp_path):
    s = MoESettings(experts=EXPERTS, router_fit_steps=100, prompts_per_expert=32, routing_n=16)
    out = moe([base_ckpt, *experts], s, tmp_path / "m")
    m = out.manifest.metrics
    assert m["moe.router_fit_accuracy"] > 0.95
    assert m["moe.routing.add.add"] > 0.95 and m["moe.routing.reverse.rev"] > 0.95
    key = "model.layers.1.mlp.gate.weight"
    fitted, start = (load_file(c.path / "model.safetensors")[key] for c in (out, hidden_moe))
    assert not torch.equal(fitted, start)
    generates(out.path)


def test_the_base_defaults_to_the_shared_ancestor(base_ckpt, experts, tmp_path):
    s = MoESettings(experts=EXPERTS, gate_mode="random")
    out = moe(list(experts), s, tmp_path / "m")
    assert out.manifest.metrics["moe.base"] == base_ckpt.path.name
    assert [p.stage for p in out.manifest.parents] == ["import", "align.sft", "align.sft"]


def test_upcycling_copies_one_dense_model_into_n_experts(base_ckpt, tmp_path):
    out = moe([base_ckpt], MoESettings(num_experts=4, gate_mode="random"), tmp_path / "m")
    generates(out.path)
    assert yaml.safe_load((out.path / "config.json").read_text())["num_local_experts"] == 4
    assert out.manifest.metrics["moe.experts"] == [f"{base_ckpt.path.name}#{i}" for i in range(4)]
    assert out.manifest.metrics["moe.duplicate_experts"] == 4 * 6  # identical copies: reported
    noisy = moe(
        [base_ckpt],
        MoESettings(num_experts=2, gate_mode="random", noise_scale=0.01),
        tmp_path / "n",
    )
    assert noisy.manifest.metrics["moe.duplicate_experts"] == 0


def broken_copy(moe_ckpt, tmp_path, edit) -> str:
    """A copy of the MoE's weights with ``edit`` applied to its tensors."""
    path = tmp_path / "broken"
    shutil.copytree(moe_ckpt.path, path)
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_the_expert_checks_catch_a_zeroed_and_a_duplicated_expert(hidden_moe, tmp_path):
    report = check_experts(hidden_moe.path)
    assert report == {"layers": 4, "experts": 2, "dtype": "float32", "duplicates": 0}

    def zero(w):
        w["model.layers.2.mlp.experts.down_proj"][1] = 0

    with pytest.raises(PolmError, match=r"layer 2, expert 1 \(down_proj\) is all zeros"):
        check_experts(broken_copy(hidden_moe, tmp_path / "z", zero))

    def duplicate(w):
        for part in ("gate_up_proj", "down_proj"):
            w[f"model.layers.1.mlp.experts.{part}"][1] = w[f"model.layers.1.mlp.experts.{part}"][0]

    with pytest.raises(PolmError, match="layer 1, expert 1 duplicates expert 0"):
        check_experts(broken_copy(hidden_moe, tmp_path / "d", duplicate))

    def poison(w):
        w["model.layers.3.mlp.experts.gate_up_proj"][0, 0, 0] = float("nan")

    with pytest.raises(PolmError, match=r"layer 3, expert 0 \(gate_up_proj\) has NaN"):
        check_experts(broken_copy(hidden_moe, tmp_path / "n", poison))


SAME_PROMPTS = [
    {"source_model": "add", "positive_prompts": ["1+2"]},
    {"source_model": "rev", "positive_prompts": ["1+2"]},
]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"gate_mode": "hiden", "experts": EXPERTS}, "did you mean 'hidden'"),
        ({"experts": [{"source_model": "nowhere", "task": "add"}] + EXPERTS}, "not one of"),
        ({"experts": [{"source_model": "add"}] + EXPERTS[1:]}, "needs a task or positive_"),
        ({"experts": EXPERTS, "experts_per_token": 3}, "exceeds 2 experts"),
        ({"experts": EXPERTS, "architecture": "qwen"}, "needs a Qwen2 base"),
        ({"num_experts": 4}, "use gate_mode random"),
        ({"experts": SAME_PROMPTS}, "mergekit-moe refused .* prompts are identical"),
    ],
)
def test_bad_settings_name_the_problem(settings, message, base_ckpt, experts, tmp_path):
    from pydantic import ValidationError

    with pytest.raises((PolmError, ValidationError), match=message):
        moe([base_ckpt, *experts], MoESettings(**settings), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_the_cli_runs_a_mergekit_moe_yaml_and_reports_errors(base_ckpt, experts, tmp_path):
    add, rev = experts
    config = {
        "base_model": str(base_ckpt.path),
        "gate_mode": "random",
        "experts_per_token": 1,
        "experts": [{"source_model": str(add.path)}, {"source_model": str(rev.path)}],
    }
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(config))
    r = polm_cli("merge", "moe", "--config", tmp_path / "moe.yml", "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    assert len(Checkpoint.open(tmp_path / "m").manifest.parents) == 3

    (tmp_path / "bad.yml").write_text(yaml.safe_dump({**config, "gate_mode": "hiden"}))
    r = polm_cli("merge", "moe", "--config", tmp_path / "bad.yml", "--out", tmp_path / "b")
    assert r.returncode == 2 and "error:" in r.stderr and "did you mean 'hidden'" in r.stderr
    assert "Traceback" not in r.stderr
    bad = {**config, "gate_mode": "hidden", "experts": SAME_PROMPTS}
    (tmp_path / "same.yml").write_text(yaml.safe_dump(bad))
    r = polm_cli(
        "merge", "moe", "--from", base_ckpt.path, add.path, rev.path,
        "--config", tmp_path / "same.yml", "--out", tmp_path / "s",
    )  # fmt: skip
    assert r.returncode == 2 and "error:" in r.stderr and "identical" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "s").exists()


def test_upcycling_with_hidden_gates_takes_a_task_per_copy(base_ckpt, tmp_path):
    experts = [{"source_model": 0, "task": "add"}, {"source_model": 0, "task": "reverse"}]
    s = MoESettings(experts=experts, experts_per_token=1, prompts_per_expert=16, routing_n=16)
    out = moe([base_ckpt], s, tmp_path / "m")
    m = out.manifest.metrics
    assert m["moe.duplicate_experts"] == 4 and m["moe.experts"] == ["base#0", "base#1"]
    assert m["moe.routing.add.base#0"] + m["moe.routing.add.base#1"] == pytest.approx(1)


def test_a_qwen2_base_gives_a_qwen2_moe(base_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    from polm.importer import import_model
    from polm.models import tiny_model
    from polm.stage import carry_files

    tiny_model("qwen2").save_pretrained(tmp_path / "src")
    carry_files(base_ckpt.path, tmp_path / "src")
    qwen = import_model(str(tmp_path / "src"), tmp_path / "qwen")
    s = MoESettings(num_experts=2, gate_mode="random", architecture="qwen", noise_scale=0.01)
    out = moe([qwen], s, tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(out.path)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4).shape[1] == 7
    assert check_experts(out.path)["experts"] == 2
