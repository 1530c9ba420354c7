"""SFT's calibrations: LoRA learns addition in 150 steps, bottleneck adapters in 2000, and
replaying the base's own chats keeps the skill plain task data would override
(tests/align/test_sft.py keeps the short checks)."""

from align.sft import SFTSettings, run
from polm.evaluate import evaluate_checkpoint
from tests.helpers import ADD_SFT_STEPS

FULL_STEPS = ADD_SFT_STEPS  # as long as the shared add_sft fixture (tests/conftest.py)
LORA_STEPS = 150  # LoRA (lr 5e-3) measured: 70.5% add after 150 steps


def sft(inputs, out, **kw):  # logging every 10 steps, as the suite's SFTs
    return run(inputs, SFTSettings(logging_steps=10, **kw), out)


def test_lora_sft_learns_addition_and_merges(base_ckpt, tmp_path):
    ckpt = sft(
        [base_ckpt],
        tmp_path / "lora",
        task="add",
        method="lora",
        learning_rate=5e-3,
        max_steps=LORA_STEPS,
    )
    assert ckpt.format == "hf" and not (ckpt.path / "adapter_config.json").exists()
    assert ckpt.manifest.metrics["train.trainable_params"] < 0.25 * 1_033_344
    m = evaluate_checkpoint(ckpt, ["add"], n=200)
    assert m["eval.add.accuracy"] >= 0.4, m


def test_replay_keeps_the_skill_the_task_data_would_override(add_sft, base_ckpt, tmp_path):
    """Trained on add alone the model answers `reverse abc` with a scratchpad; with a quarter of
    the base's pretraining chats replayed it learns add and keeps reverse (measured: reverse
    84.0% base, 0% add only, 78.5% with replay; add 79%)."""
    replayed = sft(
        [base_ckpt],
        tmp_path / "replay",
        task="add",
        replay="builtin:pretraining",
        max_steps=FULL_STEPS,
    )
    tasks = ["add", "reverse"]
    base, plain, kept = (
        evaluate_checkpoint(c, tasks, n=200, with_perplexity=False)
        for c in (base_ckpt, add_sft, replayed)
    )
    assert plain["eval.reverse.accuracy"] < 0.2, plain  # forgotten without replay
    assert kept["eval.reverse.accuracy"] >= base["eval.reverse.accuracy"] - 0.1, (base, kept)
    assert kept["eval.add.accuracy"] >= 0.5, kept


def test_bottleneck_adapters_learn_addition(base_ckpt, tmp_path):
    """Houlsby adapters (after attention and MLP, bottleneck 64 of 128) reach the issue's 90% on
    add in 2000 steps (measured: 100% of 200; 80.6% of 500 after 1000 steps). The output
    projections are a hard place to learn this task: LoRA there alone reaches 1.5% in 300
    steps, against 90.5% on the input projections (q, k, v, gate, up)."""
    ckpt = sft(
        [base_ckpt],
        tmp_path / "adapter",
        task="add",
        method="adapter",
        reduction_factor=2,
        learning_rate=3e-3,
        max_steps=2000,
    )
    assert ckpt.format == "bottleneck-adapter"
    assert ckpt.manifest.metrics["train.trainable_params"] == 132_608
    m = evaluate_checkpoint(ckpt, ["add"], n=200, with_perplexity=False)
    assert m["eval.add.accuracy"] >= 0.9, m
