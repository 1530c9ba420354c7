"""RLHF's calibration: a 400-step reward model ranks held-out pairs, and 80 PPO steps against it
raise the held-out reward within the KL target (tests/align/test_rlhf.py keeps the short check)."""

import json

import pytest

from align.ppo import PPOSettings
from align.ppo import run as ppo
from align.reward import RewardSettings
from align.reward import run as reward
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


def test_the_reward_model_ranks_held_out_pairs(rm, record_property):
    m = evaluate_checkpoint(rm, ["add"], n=200)
    record_property("pairwise", m["eval.add.pairwise_accuracy"])
    assert m["eval.add.pairwise_accuracy"] >= 0.7, m  # chance is 0.5


def test_ppo_raises_heldout_reward_within_the_kl_target(warm_sft, rm, tmp_path, record_property):
    # Measured (AMD EPYC with avx512_bf16, 256 held-out prompts), fp32 / bf16 models: kl_target 3
    # gave 0.916 -> 1.033 at KL 3.0 / 0.570 -> 0.826 at KL 4.1; kl_target 4, KL 4.3 in bf16;
    # kl_target 5, KL 6.8 / 5.9. On an AVX2-only AMD EPYC (fp32), kl_target 4 ended at held-out
    # KL 6.4. Adaptive control tracks the training batches' KL, and the held-out KL ends up to
    # ~1.6x the target: bounded, which is what is asserted. 40 steps moved fp32's reward by
    # +0.05 at most.
    settings = PPOSettings(
        task="add", max_steps=80, kl_target=4.0, logging_steps=10, eval_prompts=256
    )
    out = ppo([warm_sft, rm], settings, tmp_path / "ppo")
    m = out.manifest.metrics
    for k in ("heldout_reward_start", "heldout_reward", "heldout_kl", "last_kl"):
        record_property(k, round(m[f"train.{k}"], 3))
    assert m["train.heldout_reward"] > m["train.heldout_reward_start"] + 0.05, m
    assert 0 < m["train.heldout_kl"] < 2 * settings.kl_target, m
    assert m["train.last_kl"] < 2 * settings.kl_target, m  # the controller held the batches too
    log = json.loads((out.path / "train_log.json").read_text())
    assert log[0]["step"] == 1 and log[-1]["step"] == 80
