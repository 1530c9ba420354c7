"""align.reward and align.dpo on tiny real models: they train, move the right metric the right
way, and refuse inputs of the wrong format before loading weights."""

import pytest

from align.dpo import DPOSettings
from align.dpo import run as dpo
from align.reward import RewardSettings
from align.reward import run as reward
from align.sft import SFTSettings
from align.sft import run as sft
from polm.evaluate import completion_logprobs, evaluate_checkpoint
from polm.loading import is_reward_model, load_model
from polm.preference import preference_pairs

HELD_OUT = preference_pairs("add", "test", 64)


@pytest.fixture(scope="module")
def weak_sft(base_ckpt, tmp_path_factory):
    """An SFT start that knows the answer format but often prefers the wrong answer."""
    return sft(
        [base_ckpt], SFTSettings(task="add", max_steps=40), tmp_path_factory.mktemp("pref") / "sft"
    )


def mean_margin(ckpt) -> float:
    model, tok = load_model(ckpt)
    lp = completion_logprobs(model, tok, HELD_OUT)
    return sum(c - r for c, r in zip(lp[0::2], lp[1::2])) / len(HELD_OUT)


@pytest.mark.parametrize(
    "loss, extra",
    [
        ("sigmoid", {}),
        ("ipo", {}),
        ("hinge", {}),
        ("cdpo", {"label_smoothing": 0.1}),
        ("robust", {"label_smoothing": 0.1}),
        ("simpo", {"beta": 2.0}),
        ("orpo", {}),
        # KTO estimates its KL baseline from mismatched pairs within a batch: give it a bigger one
        ("kto", {"per_device_train_batch_size": 32, "max_steps": 40}),
    ],
)
def test_every_preference_loss_widens_the_held_out_margin(loss, extra, weak_sft, tmp_path):
    before = mean_margin(weak_sft)
    out = dpo(
        [weak_sft],
        DPOSettings(
            **{
                "task": "add",
                "loss": loss,
                "max_steps": 25,
                "learning_rate": 3e-4,
                "per_device_train_batch_size": 8,
                "logging_steps": 5,
                **extra,
            }
        ),
        tmp_path / loss,
    )
    assert out.manifest.stage == "align.dpo" and out.manifest.settings["loss"] == loss
    after = mean_margin(out)
    assert after > before, (loss, before, after)


def test_dpo_settings_are_checked():
    with pytest.raises(ValueError, match="needs label_smoothing"):
        DPOSettings(task="add", loss="cdpo")
    with pytest.raises(ValueError, match="loss"):
        DPOSettings(task="add", loss="dpo-v2")


def test_reward_model_learns_to_rank_pairs(weak_sft, tmp_path):
    ckpt = reward([weak_sft], RewardSettings(task="add", max_steps=120), tmp_path / "rm")
    assert is_reward_model(ckpt)
    m = evaluate_checkpoint(ckpt, ["add"], n=200)
    assert m["eval.add.pairwise_accuracy"] >= 0.6, m  # chance is 0.5
    assert "eval.add.accuracy" not in m
