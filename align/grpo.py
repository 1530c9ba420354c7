"""GRPO and RLOO with verifiable rewards, on TRL's ``GRPOTrainer`` / ``RLOOTrainer``.

GRPO (Shao et al., DeepSeekMath, arXiv 2402.03300) samples a group of completions per prompt
and uses each one's reward relative to its group as the advantage, with no value model; RLOO
(Ahmadian et al., arXiv 2402.14740) uses the leave-one-out mean as the baseline. Rewards:

- the task's own scorer (1 for an exactly right final answer), always;
- an optional format reward (``format_reward`` weight): 1 when the answer has the task's shape;
- an optional reward model: give it as a second input (``from: [policy, reward]``).

"ReFT" (Luong et al., arXiv 2401.08967) is this stage after an SFT warm-up: recipes/reft.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from polm.checkpoint import Checkpoint
from polm.stage import TrainingSettings, policy_and_reward, task_names
from polm.tasks import get_task, validate_task_names
from polm.training import save_trained, scratch_dir, train, trainer_args

STAGE = "align.grpo"
FORMATS = {
    "add": re.compile(r"^(\d\+\d\+[01]=\d\d ){2}\d\+\d\+[01]=\d\d => \d+$"),
    "reverse": re.compile(r"^[a-z]+$"),
    "compare": re.compile(r"^(more|less|same)$"),
}


class GRPOSettings(TrainingSettings):
    """Settings of ``align.grpo``; names follow TRL's GRPOConfig / RLOOConfig."""

    task: str | list[str] = Field(description="Built-in task(s): prompts and the verifier.")
    n_train: int | None = Field(default=None, gt=0, description="First N prompts (per task).")
    algorithm: Literal["grpo", "rloo"] = Field(default="grpo", description="GRPO or RLOO.")
    num_generations: int = Field(default=8, ge=2, description="Completions per prompt (group).")
    max_completion_length: int = Field(default=48, gt=0, description="Tokens per completion.")
    temperature: float = Field(
        default=0.7,
        gt=0,
        description="Sampling temperature (TRL's default is 1.0; on tiny-base a 120-step SFT "
        "start sampled 3-6% correct at 1.0, too little signal, and learned at 0.7).",
    )
    beta: float = Field(default=0.04, ge=0, description="KL coefficient to the reference.")
    epsilon: float = Field(default=0.2, gt=0, description="Clipping range of the ratio.")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(
        default="dapo", description="GRPO loss normalisation (TRL's loss_type; GRPO only)."
    )
    format_reward: float = Field(
        default=0.0, ge=0, description="Weight of the format reward (0 turns it off)."
    )
    learning_rate: float = Field(default=1e-4, gt=0, description="Peak learning rate.")
    per_device_train_batch_size: int = Field(
        default=32, gt=0, description="Completions per batch (a multiple of num_generations)."
    )

    _known_tasks = field_validator("task")(validate_task_names)

    @model_validator(mode="after")
    def _check(self):
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a "
                f"multiple of num_generations ({self.num_generations})"
            )
        return self


def _text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def correctness(prompts, completions, task, answer, **_) -> list[float]:
    """The verifier: 1.0 when the final answer equals the reference."""
    return [float(get_task(t).extract(_text(c)) == a) for c, t, a in zip(completions, task, answer)]


def well_formed(prompts, completions, task, **_) -> list[float]:
    return [float(bool(FORMATS[t].match(_text(c).strip()))) for c, t in zip(completions, task)]


def reward_model_scorer(ckpt: Checkpoint):
    """A TRL reward function backed by an ``align.reward`` checkpoint."""
    from polm.evaluate import score_completions
    from polm.loading import load_reward_model

    model, tok = load_reward_model(ckpt)

    def reward_model(prompts, completions, **_) -> list[float]:
        return score_completions(model, tok, prompts, completions)

    return reward_model


def run(inputs: list[Checkpoint], settings: GRPOSettings, out: Path) -> Checkpoint | None:
    import torch
    from datasets import Dataset

    from polm.loading import load_model
    from polm.tasks import render

    policy, reward_ckpt = policy_and_reward(inputs, STAGE)
    s = settings
    rows = [
        {**row, "task": t}
        for t in task_names(s.task)
        for row in render(t, "train", "prompt_only", s.n_train)
    ]
    dataset = Dataset.from_list(rows).shuffle(seed=s.seed)
    reward_funcs, weights = [correctness], [1.0]
    if s.format_reward > 0:
        reward_funcs.append(well_formed)
        weights.append(s.format_reward)
    if reward_ckpt is not None:
        reward_funcs.append(reward_model_scorer(reward_ckpt))
        weights.append(1.0)
    torch.manual_seed(s.seed)
    model, tokenizer = load_model(policy)
    common = dict(
        num_generations=s.num_generations,
        max_completion_length=s.max_completion_length,
        temperature=s.temperature,
        beta=s.beta,
        epsilon=s.epsilon,
        reward_weights=weights,
    )
    if s.algorithm == "rloo":
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    else:
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

        common["loss_type"] = s.loss_type
    args = Config(**trainer_args(s, scratch_dir(out, s, inputs), Config), **common)
    trainer = Trainer(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    metrics = train(trainer)
    return save_trained(
        trainer, tokenizer, out, stage=STAGE, settings=s, parents=list(inputs), metrics=metrics
    )
