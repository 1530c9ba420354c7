"""Every align stage refuses inputs of the wrong kind before it loads any weights: the fake
checkpoints below have no weights at all, so a stage that tried to load them would fail with
another error."""

import json

import pytest

from polm.checkpoint import staging
from polm.errors import PolmError
from polm.registry import STAGES, settings_class, stage_function

ALIGN = sorted(name for name in STAGES if name.startswith("align."))


def fake(tmp_path, name, *, fmt="hf", stage="align.sft", arch="LlamaForCausalLM"):
    with staging(tmp_path / name) as st:
        (st.dir / "config.json").write_text(json.dumps({"architectures": [arch]}))
        return st.commit(stage=stage, format=fmt)


@pytest.mark.parametrize("stage", ALIGN)
def test_quantized_input_is_refused(stage, tmp_path):
    gptq = fake(tmp_path, "q", fmt="gptq", stage="optimize.gptq")
    with pytest.raises(PolmError, match=r"expects a checkpoint of format 'hf'.*has format 'gptq'"):
        stage_function(stage)([gptq], settings_class(stage)(task="add"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", [s for s in ALIGN if s != "align.reward"])
def test_reward_model_is_refused_as_a_policy(stage, tmp_path):
    rm = fake(tmp_path, "rm", stage="align.reward", arch="LlamaForSequenceClassification")
    with pytest.raises(PolmError, match="is a reward model"):
        stage_function(stage)([rm], settings_class(stage)(task="add"), tmp_path / "out")


@pytest.mark.parametrize("stage", ["align.ppo", "align.grpo"])
def test_second_input_must_be_a_reward_model(stage, tmp_path):
    policy, other = fake(tmp_path, "p"), fake(tmp_path, "o")
    with pytest.raises(PolmError, match="second input must be a reward model"):
        stage_function(stage)([policy, other], settings_class(stage)(task="add"), tmp_path / "out")


@pytest.mark.parametrize("stage", ["align.sft", "align.dpo", "align.reward"])
def test_single_model_stages_take_one_input(stage, tmp_path):
    a, b = fake(tmp_path, "a"), fake(tmp_path, "b")
    with pytest.raises(PolmError, match="takes one input model, got 2"):
        stage_function(stage)([a, b], settings_class(stage)(task="add"), tmp_path / "out")
