"""align.grpo: the verifier and format rewards are right, and the stage trains with them (and
with a reward model as a second input), recording how reward and KL moved. (How far its
defaults move the 120-step SFT in 200 steps: bench/calibrations/test_grpo.py.)"""

import pytest

from align.grpo import GRPOSettings, correctness, run, well_formed
from align.reward import RewardSettings
from align.reward import run as reward
from polm.errors import PolmError
from polm.preference import preference_pairs


def _as_completions(texts):
    return [[{"role": "assistant", "content": t}] for t in texts]


@pytest.mark.parametrize("task", ["add", "reverse"])
def test_verifier_and_format_rewards(task):
    rows = preference_pairs(task, "test", 50)
    good = _as_completions([r["chosen"][0]["content"] for r in rows])
    bad = _as_completions([r["rejected"][0]["content"] for r in rows])
    from polm.tasks import get_task

    answers = [e.target for e in get_task(task).examples("test", 50)]
    tasks = [task] * 50
    assert correctness(None, good, tasks, answers) == [1.0] * 50
    assert correctness(None, bad, tasks, answers) == [0.0] * 50
    assert well_formed(None, good, tasks) == [1.0] * 50
    assert well_formed(None, _as_completions(["no idea"] * 50), tasks) == [0.0] * 50


def test_grpo_trains_and_records_reward_and_kl(base_ckpt, tmp_path):
    ckpt = run(
        [base_ckpt],
        GRPOSettings(
            task="reverse",
            max_steps=6,
            num_generations=4,
            per_device_train_batch_size=8,
            max_completion_length=12,
            format_reward=0.5,
            logging_steps=2,
        ),
        tmp_path / "grpo",
    )
    m = ckpt.manifest.metrics
    assert m["train.steps"] == 6
    assert 0.0 <= m["train.first_reward"] <= 1.5 and "train.last_kl" in m
    assert ckpt.manifest.parents[0].content_hash == base_ckpt.manifest.content_hash


def test_rloo_with_a_reward_model_as_second_input(base_ckpt, tmp_path):
    rm = reward([base_ckpt], RewardSettings(task="reverse", max_steps=4), tmp_path / "rm")
    ckpt = run(
        [base_ckpt, rm],
        GRPOSettings(
            task="reverse",
            algorithm="rloo",
            max_steps=3,
            num_generations=4,
            per_device_train_batch_size=8,
            max_completion_length=12,
        ),
        tmp_path / "rloo",
    )
    assert [p.stage for p in ckpt.manifest.parents] == ["import", "align.reward"]
    with pytest.raises(PolmError, match="second input must be a reward model"):
        run([base_ckpt, base_ckpt], GRPOSettings(task="add"), tmp_path / "bad")


def test_batch_must_hold_whole_groups():
    with pytest.raises(ValueError, match="multiple of num_generations"):
        GRPOSettings(task="add", num_generations=6, per_device_train_batch_size=32)
