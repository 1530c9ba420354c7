"""Supervised fine-tuning with TRL's ``SFTTrainer``: full, LoRA, prefix and prompt tuning.

- Instruction tuning on chat data (``messages``) with the loss on assistant tokens only
  (the built-in chat template marks them with ``{% generation %}``); prompt/completion data
  trains on completions only; plain ``text`` is continued pretraining (domain adaptation).
- PEFT methods through PEFT: LoRA (Hu et al., arXiv 2106.09685), prefix tuning (Li & Liang,
  arXiv 2101.00190), prompt tuning (Lester et al., arXiv 2104.08691). A LoRA run writes a
  merged ``hf`` checkpoint by default, or the adapter with ``output_format: peft-adapter``;
  prefix and prompt tuning can only be stored as adapters.

Runs on CPU (``use_cpu``) or GPU, in one process or N (``--nproc``, DDP through accelerate).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from polm.checkpoint import Checkpoint, staging
from polm.errors import PolmError
from polm.settings import StageSettings
from polm.tasks import validate_task_names

STAGE = "align.sft"


class SFTSettings(StageSettings):
    """Settings of ``align.sft``; training fields use TRL / transformers names."""

    task: str | list[str] | None = Field(
        default=None, description="Built-in task(s) to train on, e.g. add or [add, reverse]."
    )
    dataset: str | None = Field(
        default=None,
        description="Local JSONL/CSV/parquet/text file, saved datasets dir, or "
        "builtin:prose (continued pretraining). Used instead of `task`.",
    )
    n_train: int | None = Field(
        default=None, gt=0, description="Use the first N examples (per task) only."
    )
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
    num_train_epochs: float = Field(
        default=1.0,
        gt=0,
        description="Epochs over the data.",
        validation_alias=AliasChoices("num_train_epochs", "epochs"),
    )
    max_steps: int = Field(
        default=-1, description="Stop after this many optimizer steps (overrides epochs when > 0)."
    )
    learning_rate: float = Field(
        default=1e-3,
        gt=0,
        description="Peak learning rate (tiny models train well at 1e-3; LoRA likes higher).",
    )
    per_device_train_batch_size: int = Field(default=32, gt=0, description="Batch per process.")
    gradient_accumulation_steps: int = Field(default=1, gt=0, description="Accumulated batches.")
    lr_scheduler_type: str = Field(default="cosine", description="transformers scheduler name.")
    warmup_steps: float = Field(
        default=0.05, ge=0, description="Warm-up steps, or a fraction of all steps when < 1."
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    max_length: int = Field(default=256, gt=0, description="Truncate sequences to this length.")
    packing: bool = Field(default=False, description="Pack sequences into max_length blocks.")
    assistant_only_loss: bool = Field(
        default=True, description="Loss on assistant tokens only (chat data)."
    )
    bf16: bool = Field(
        default=True,
        description="bf16 autocast (about 1.5-2x faster on CPUs "
        "with bf16 support; weights stay fp32).",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations to save memory (TRL turns it on by default; it "
        "slows small models and drops prefix tuning's key/value prefix).",
    )
    logging_steps: int = Field(default=25, gt=0, description="Log the loss every N steps.")
    seed: int = Field(default=0, description="Seed for init, shuffling and dropout.")

    _known_tasks = field_validator("task")(validate_task_names)

    @model_validator(mode="after")
    def _check(self):
        if (self.task is None) == (self.dataset is None):
            raise ValueError("give exactly one of `task` (built-in) or `dataset` (local file)")
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


def build_dataset(s: SFTSettings):
    from polm.data import check_columns, load_dataset_source, task_dataset

    if s.task is not None:
        from polm.tasks import get_task

        tasks = [s.task] if isinstance(s.task, str) else list(s.task)
        for t in tasks:
            get_task(t)
        return task_dataset(tasks, "messages", s.n_train, s.seed)
    ds = load_dataset_source(s.dataset, s.n_train)
    check_columns(ds, s.dataset, [{"messages"}, {"prompt", "completion"}, {"text"}])
    return ds


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

    if len(inputs) != 1:
        raise PolmError(f"{STAGE} takes one input model, got {len(inputs)}.")
    (base,) = inputs
    base.require_format("hf", stage=STAGE)
    s = settings
    dataset = build_dataset(s)
    chat = "messages" in dataset.column_names
    torch.manual_seed(s.seed)
    model, tokenizer = load_model(base)
    # the trainer's scratch space sits beside the output, where `polm run` cleans up after a kill
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    args = SFTConfig(
        output_dir=str(workdir),
        use_cpu=not torch.cuda.is_available(),
        bf16=s.bf16,
        num_train_epochs=s.num_train_epochs,
        max_steps=s.max_steps,
        learning_rate=s.learning_rate,
        per_device_train_batch_size=s.per_device_train_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        lr_scheduler_type=s.lr_scheduler_type,
        warmup_steps=s.warmup_steps,
        weight_decay=s.weight_decay,
        max_length=s.max_length,
        packing=s.packing,
        assistant_only_loss=s.assistant_only_loss and chat,
        seed=s.seed,
        data_seed=s.seed,
        logging_steps=s.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        full_determinism=True,
        dataloader_num_workers=0,
        ddp_backend=None,
        gradient_checkpointing=s.gradient_checkpointing,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config(s),
    )
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "train.first_loss": losses[0] if losses else None,
        "train.last_loss": losses[-1] if len(losses) > 1 else result.training_loss,
        "train.final_avg_loss": result.training_loss,
        "train.steps": result.global_step,
        "train.wall_s": round(wall, 2),
        "train.world_size": args.world_size,
        "train.trainable_params": sum(
            p.numel() for p in trainer.model.parameters() if p.requires_grad
        ),
    }
    shutil.rmtree(workdir, ignore_errors=True)
    # every rank takes part in gathering the weights (FSDP / DeepSpeed ZeRO-3 shard them);
    # only rank 0 writes
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if s.method == "full" else None
    if not trainer.is_world_process_zero():
        return None
    fmt = s.resolved_output_format
    model = trainer.accelerator.unwrap_model(trainer.model)
    if s.method == "lora" and fmt == "hf":
        model = model.merge_and_unload()
    with staging(out) as st:
        model.save_pretrained(st.dir, state_dict=state_dict)
        tokenizer.save_pretrained(st.dir)
        return st.commit(
            stage=STAGE, format=fmt, settings=s, parents=[base], seed=s.seed, metrics=metrics
        )
