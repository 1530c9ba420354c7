"""A reward model trained on preference pairs with TRL's ``RewardTrainer``.

The policy checkpoint gets a one-logit sequence-classification head and is trained with the
Bradley-Terry pairwise loss, as in InstructGPT (Ouyang et al., arXiv 2203.02155). The output is
an ``hf`` checkpoint whose ``config.json`` names a ``*ForSequenceClassification``
architecture; ``align.ppo`` and ``align.grpo`` take it as their reward, and the evaluation
suite scores it by pairwise accuracy on held-out pairs.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from polm.checkpoint import Checkpoint
from polm.preference import preference_dataset
from polm.stage import DataSettings, single_input
from polm.training import save_trained, scratch_dir, task_examples, train, trainer_args

STAGE = "align.reward"


class RewardSettings(DataSettings):
    """Settings of ``align.reward``; training fields use TRL names."""

    learning_rate: float = Field(default=5e-4, gt=0, description="Peak learning rate.")
    center_rewards_coefficient: float | None = Field(
        default=0.01,
        description="Pull rewards toward zero mean (Eisenstein et al., arXiv 2312.09244), so "
        "their scale stays usable for RL.",
    )


def run(inputs: list[Checkpoint], settings: RewardSettings, out: Path) -> Checkpoint | None:
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from polm.checkpoint import check_safetensors
    from polm.loading import load_tokenizer

    base = single_input(inputs, STAGE, "hf", causal_lm=False)
    s = settings
    dataset = preference_dataset(
        s.task, s.dataset, task_examples(s) if s.task else s.n_train, s.seed
    )
    torch.manual_seed(s.seed)
    check_safetensors(base.path)
    tokenizer = load_tokenizer(base.path)
    model = AutoModelForSequenceClassification.from_pretrained(
        base.path, num_labels=1, trust_remote_code=False, use_safetensors=True
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(
        **trainer_args(s, scratch_dir(out, s, [base])),
        center_rewards_coefficient=s.center_rewards_coefficient,
    )
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    metrics = train(trainer)
    return save_trained(
        trainer, tokenizer, out, stage=STAGE, settings=s, parents=[base], metrics=metrics
    )
