"""RLHF on tiny real models: a reward model ranks held-out pairs, and PPO against it raises the
held-out reward within the KL target."""

import json

import pytest

from align.ppo import PPOSettings
from align.ppo import run as ppo
from align.reward import RewardSettings
from align.reward import run as reward
from polm.errors import PolmError
from polm.evaluate import evaluate_checkpoint


@pytest.fixture(scope="module")
def rm(warm_sft, tmp_path_factory):
    return reward(
        [warm_sft],
        # 400 steps, measured (AMD EPYC, fp32 / bf16): pairwise 0.80 / 0.805 on 200 held-out
        # pairs. The 200-step model (0.74 / 0.765) moved PPO's held-out reward by +0.06 in fp32
        # and +0.36 in bf16: a result at one precision only
        RewardSettings(task="add", max_steps=400, learning_rate=1e-3, logging_steps=100),
        tmp_path_factory.mktemp("rm") / "rm",
    )


def test_the_reward_model_ranks_held_out_pairs(rm):
    from polm.loading import is_reward_model

    assert is_reward_model(rm)
    m = evaluate_checkpoint(rm, ["add"], n=200)
    assert m["eval.add.pairwise_accuracy"] >= 0.6, m  # chance is 0.5
    assert "eval.add.accuracy" not in m


@pytest.mark.slow
def test_ppo_raises_heldout_reward_within_the_kl_target(warm_sft, rm, tmp_path):
    # Measured (AMD EPYC, 256 held-out prompts), fp32 / bf16 models: kl_target 3 gave
    # 0.916 -> 1.033 at KL 3.0 / 0.570 -> 0.826 at KL 4.1; kl_target 4, KL 4.3 in bf16;
    # kl_target 5, KL 6.8 / 5.9. Adaptive control tracks the training batches' KL, and
    # the held-out KL ends up to ~1.4x the target: bounded, which is what is asserted. 40 steps
    # moved fp32's reward by +0.05 at most.
    settings = PPOSettings(
        task="add", max_steps=80, kl_target=4.0, logging_steps=10, eval_prompts=256
    )
    out = ppo([warm_sft, rm], settings, tmp_path / "ppo")
    m = out.manifest.metrics
    assert m["train.reward_source"] == "model"
    assert m["train.heldout_reward"] > m["train.heldout_reward_start"] + 0.05, m
    assert 0 < m["train.heldout_kl"] < 1.5 * settings.kl_target, m
    assert m["train.last_kl"] < 2 * settings.kl_target, m  # the controller held the batches too
    assert [p.stage for p in out.manifest.parents] == ["align.sft", "align.reward"]
    log = json.loads((out.path / "train_log.json").read_text())
    assert log[0]["step"] == 1 and log[-1]["step"] == 80
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
