"""Self-refine's calibration: a weak add model taught to critique and revise its own answers
(align.sft critique: true) raises its own accuracy by refining with its own critique, with no
help at evaluation time (tests/polm/test_refine.py keeps the short checks; recipes/refine.yaml
measures the same chain on all 500 examples: 18.4% -> 83.4% with its own critique, 90.2%
with the verifier's where-not-what)."""

from align.sft import SFTSettings
from align.sft import run as sft
from polm.loading import load_model
from polm.refine import refined_accuracy


def test_the_models_own_critique_raises_a_weak_models_accuracy(warm_sft, tmp_path):
    critic = sft(
        [warm_sft],
        SFTSettings(task="add", critique=True, max_steps=300, logging_steps=50),
        tmp_path / "critic",
    )
    model, tokenizer = load_model(critic)
    own = refined_accuracy(model, tokenizer, "add", 200, 2, critic="self")
    assert own["accuracy"] < 0.5, own  # still a weak model when it answers alone
    assert own["self_refine_accuracy"] >= own["accuracy"] + 0.3, own
    verifier = refined_accuracy(model, tokenizer, "add", 200, 2, critic="verifier")
    assert verifier["self_refine_accuracy"] >= verifier["accuracy"] + 0.3, verifier
