"""RLHF on tiny real models: a reward model ranks held-out pairs, and PPO against it trains and
records reward and KL (the long calibration, PPO raising the held-out reward within the KL
target, is bench/calibrations/test_rlhf.py)."""

import json
import math

import pytest

from align.ppo import PPOSettings
from align.ppo import run as ppo
from align.reward import RewardSettings
from align.reward import run as reward
from polm.errors import PolmError
from polm.evaluate import evaluate_checkpoint

RM_STEPS = 60


@pytest.fixture(scope="module")
def rm(warm_sft, tmp_path_factory):
    # measured pairwise accuracy on 200 held-out pairs (AVX2-only AMD EPYC, fp32): 0.715 at 60
    # steps, 0.705 at 120 (chance is 0.5); the 400-step model and PPO's reward gain against it
    # are bench/calibrations/test_rlhf.py
    return reward(
        [warm_sft],
        RewardSettings(task="add", max_steps=RM_STEPS, learning_rate=1e-3, logging_steps=40),
        tmp_path_factory.mktemp("rm") / "rm",
    )


def test_the_reward_model_ranks_held_out_pairs(rm):
    from polm.loading import is_reward_model

    assert is_reward_model(rm)
    m = evaluate_checkpoint(rm, ["add"], n=200)
    assert m["eval.add.pairwise_accuracy"] >= 0.6, m  # chance is 0.5
    assert "eval.add.accuracy" not in m


def test_ppo_against_the_reward_model_records_reward_and_kl(warm_sft, rm, tmp_path):
    """A few PPO steps against the reward model (80 steps raising the held-out reward within the
    KL target: bench/calibrations/test_rlhf.py)."""
    settings = PPOSettings(task="add", max_steps=4, logging_steps=1, eval_prompts=16)
    out = ppo([warm_sft, rm], settings, tmp_path / "ppo")
    m = out.manifest.metrics
    assert m["train.reward_source"] == "model"
    assert [p.stage for p in out.manifest.parents] == ["align.sft", "align.reward"]
    for k in ("heldout_reward_start", "heldout_reward", "heldout_kl", "last_kl"):
        assert math.isfinite(m[f"train.{k}"]), m
    assert m["train.heldout_kl"] > 0, m  # the policy moved off its reference
    log = json.loads((out.path / "train_log.json").read_text())
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    assert not any(out.path.glob("*v_head*"))  # the value head only serves training


def test_ppo_with_the_verifier_and_its_settings(warm_sft, tmp_path):
    out = ppo(
        [warm_sft],
        PPOSettings(task="add", max_steps=2, per_device_train_batch_size=8, eval_prompts=8),
        tmp_path / "ppo",
    )
    assert out.manifest.metrics["train.reward_source"] == "verifier"
    with pytest.raises(ValueError, match="multiple of num_mini_batches"):
        PPOSettings(task="add", per_device_train_batch_size=7)
    with pytest.raises(PolmError, match="needs a reward model"):
        ppo([warm_sft], PPOSettings(task="add", reward="model"), tmp_path / "x")
