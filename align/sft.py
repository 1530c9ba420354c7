"""Supervised fine-tuning with TRL's ``SFTTrainer``: full, LoRA, prefix and prompt tuning.

- Instruction tuning on chat data (``messages``) with the loss on assistant tokens only
  (the built-in chat template marks them with ``{% generation %}``); prompt/completion data
  trains on completions only; plain ``text`` is continued pretraining (domain adaptation).
- ``replay`` mixes in data from outside the task (rehearsal: the base's pretraining chats, or a
  user's general data) so that the tuned model keeps what the task data does not show. Without
  it, an expert tuned on one task answers every prompt in that task's shape (an ``add`` expert
  writes a scratchpad for ``reverse x``), and its task vector overrides the others in a merge.
- PEFT methods through PEFT: LoRA (Hu et al., arXiv 2106.09685), prefix tuning (Li & Liang,
  arXiv 2101.00190), prompt tuning (Lester et al., arXiv 2104.08691). A LoRA run writes a
  merged ``hf`` checkpoint by default, or the adapter with ``output_format: peft-adapter``;
  prefix and prompt tuning can only be stored as adapters.

Runs on CPU (``use_cpu``) or GPU, in one process or N (``--nproc``, DDP through accelerate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from polm.checkpoint import Checkpoint
from polm.training import (
    DataSettings,
    save_trained,
    scratch_dir,
    single_input,
    task_examples,
    train,
    trainer_args,
)

STAGE = "align.sft"


class SFTSettings(DataSettings):
    """Settings of ``align.sft``; training fields use TRL / transformers names."""

    method: Literal["full", "lora", "prefix", "prompt"] = Field(
        default="full", description="Full fine-tuning or a PEFT method."
    )
    output_format: Literal["hf", "peft-adapter"] | None = Field(
        default=None,
        description="hf (merged, default for full/lora) or peft-adapter "
        "(default and only choice for prefix/prompt).",
    )
    r: int = Field(default=16, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(default=32, gt=0, description="LoRA scaling numerator.")
    lora_dropout: float = Field(default=0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: str | list[str] = Field(
        default="all-linear", description="Modules LoRA adapts."
    )
    num_virtual_tokens: int = Field(default=16, gt=0, description="Prefix/prompt length.")
    replay: str | None = Field(
        default=None,
        description="Rehearsal data mixed into the training data (same format): "
        "builtin:pretraining (the chats builtin:tiny-base was pretrained on) or a local file. "
        "Keeps the model's other skills, and its task vector mergeable.",
    )
    replay_fraction: float = Field(
        default=0.25, gt=0, lt=1, description="Share of the training examples taken from replay."
    )
    packing: bool = Field(default=False, description="Pack sequences into max_length blocks.")
    assistant_only_loss: bool = Field(
        default=True, description="Loss on assistant tokens only (chat data)."
    )

    @model_validator(mode="after")
    def _check(self):
        if self.method in ("prefix", "prompt") and self.output_format == "hf":
            raise ValueError(
                f"{self.method} tuning cannot be merged into the weights; use "
                "output_format: peft-adapter"
            )
        if self.method == "full" and self.output_format == "peft-adapter":
            raise ValueError(
                "full fine-tuning has no adapter; use method: lora for output_format: peft-adapter"
            )
        return self

    @property
    def resolved_output_format(self) -> str:
        if self.output_format:
            return self.output_format
        return "peft-adapter" if self.method in ("prefix", "prompt") else "hf"


FORMATS = [{"messages"}, {"prompt", "completion"}, {"text"}]


def build_dataset(s: SFTSettings):
    from polm.data import check_columns, load_dataset_source, task_dataset

    if s.task is not None:
        tasks = [s.task] if isinstance(s.task, str) else list(s.task)
        ds = task_dataset(tasks, "messages", task_examples(s), s.seed)
    else:
        ds = load_dataset_source(s.dataset, s.n_train)
        check_columns(ds, s.dataset, FORMATS)
    return with_replay(ds, s) if s.replay else ds


def with_replay(ds, s: SFTSettings):
    """``ds`` with replay examples making up ``replay_fraction`` of the result, shuffled."""
    from datasets import concatenate_datasets

    from polm.data import load_dataset_source
    from polm.errors import PolmError

    n = max(1, round(len(ds) * s.replay_fraction / (1 - s.replay_fraction)))
    replay = load_dataset_source(s.replay, n)
    want = next(f for f in FORMATS if f <= set(ds.column_names))
    if not want <= set(replay.column_names):
        raise PolmError(
            f"{STAGE}: replay {s.replay} has columns {sorted(replay.column_names)}; the "
            f"training data is {'+'.join(sorted(want))}, and replay must be the same format."
        )
    parts = [d.select_columns(sorted(want)) for d in (ds, replay)]
    return concatenate_datasets(parts).shuffle(seed=s.seed)


def peft_config(s: SFTSettings):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    if s.method == "lora":
        return LoraConfig(
            r=s.r,
            lora_alpha=s.lora_alpha,
            lora_dropout=s.lora_dropout,
            target_modules=s.target_modules,
            task_type=TaskType.CAUSAL_LM,
        )
    if s.method == "prefix":
        return PrefixTuningConfig(
            num_virtual_tokens=s.num_virtual_tokens, task_type=TaskType.CAUSAL_LM
        )
    if s.method == "prompt":
        return PromptTuningConfig(
            num_virtual_tokens=s.num_virtual_tokens, task_type=TaskType.CAUSAL_LM
        )
    return None


def run(inputs: list[Checkpoint], settings: SFTSettings, out: Path) -> Checkpoint | None:
    import torch
    from trl import SFTConfig, SFTTrainer

    from polm.loading import load_model

    base = single_input(inputs, STAGE, "hf")
    s = settings
    dataset = build_dataset(s)
    chat = "messages" in dataset.column_names
    torch.manual_seed(s.seed)
    model, tokenizer = load_model(base)
    args = SFTConfig(
        **trainer_args(s, scratch_dir(out, s, [base])),
        packing=s.packing,
        assistant_only_loss=s.assistant_only_loss and chat,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config(s),
    )
    metrics = train(trainer)
    fmt = s.resolved_output_format
    return save_trained(
        trainer,
        tokenizer,
        out,
        stage=STAGE,
        settings=s,
        parents=[base],
        metrics=metrics,
        format=fmt,
        merge_lora=fmt == "hf",
    )
