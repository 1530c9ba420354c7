"""Defaults that do no harm: a training stage run with nothing but its data (and a step budget)
does not leave the model worse at its own task.

SFT, DPO and PPO here, RLAIF in test_rlaif.py. GRPO's is bench/calibrations/test_grpo.py: its
defaults raise exact match in 200 steps (4 minutes), but a short budget lowers it, measured on
an AVX2-only AMD EPYC in fp32 from 48.4% (500 examples): 20 steps 40.2%, 30 steps 38.2%, and
30 steps with a lower learning rate (3e-5) 42.4%, temperature 1.0 37.4%, TRL's "grpo" loss
38.0%, unscaled rewards 37.6%, beta 0.2 38.0%, beta 0.5 44.6%, beta 0 26.4%, 16 completions a
prompt 37.6%: an open finding, not a test that could pass. How far the other defaults go in a
longer budget (DPO to 90% preference accuracy, distillation and 1-bit recovery to their
teacher) is bench/calibrations/ too.
"""

import pytest

from align.dpo import DPOSettings
from align.dpo import run as dpo
from align.ppo import PPOSettings
from align.ppo import run as ppo
from align.sft import SFTSettings
from align.sft import run as sft
from polm.evaluate import evaluate_checkpoint

N = 500  # held-out add examples


def _exact_match(ckpt) -> float:
    return evaluate_checkpoint(ckpt, ["add"], n=N, with_perplexity=False)["eval.add.accuracy"]


@pytest.fixture(scope="module")
def start(warm_sft) -> float:
    return _exact_match(warm_sft)


@pytest.mark.slow
def test_sft_with_its_defaults_does_not_lower_exact_match(warm_sft, start, tmp_path):
    out = sft([warm_sft], SFTSettings(task="add", max_steps=40), tmp_path / "sft")
    assert _exact_match(out) >= start, start


@pytest.mark.slow
def test_ppo_with_its_defaults_does_not_lower_exact_match(warm_sft, start, tmp_path):
    """The task verifier as reward (no reward model given). Measured (AMD EPYC, 40 steps):
    48.6% -> 55.2% from the fp32 SFT, 22.0% -> 25.6% from the bf16 one."""
    out = ppo([warm_sft], PPOSettings(task="add", max_steps=40), tmp_path / "ppo")
    assert out.manifest.metrics["train.reward_source"] == "verifier"
    assert _exact_match(out) >= start, start


@pytest.mark.slow
def test_dpo_with_its_defaults_does_not_lower_exact_match(warm_sft, start, tmp_path):
    """Sigmoid DPO plus the SFT term on the chosen answer (on by default): pure sigmoid drops
    exact match to ~0 (the chosen answer's likelihood falls with the rejected one's)."""
    out = dpo([warm_sft], DPOSettings(task="add", max_steps=30, n_train=1000), tmp_path / "dpo")
    assert out.manifest.settings["sft_weight"] == 1.0  # the default, recorded
    assert _exact_match(out) >= start, start
