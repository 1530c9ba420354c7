"""The stage kit: what every stage shares, written once. A stage file holds its method.

- input checks: :func:`single_input`, :func:`require_policy`, :func:`policy_and_reward`;
- the settings every training stage takes, under TRL / transformers names
  (:class:`TrainingSettings`, :class:`DataSettings`);
- where data comes from: :class:`TaskOrDataset` (a built-in task or a local file, one of the
  two) and :func:`task_names`; :func:`with_parent_data`, which gives a stage that needs data
  and was given none the data its parent was trained on, read from the lineage;
- prompts from a task or a file: :func:`load_prompts`;
- :data:`TOKENIZER_FILES` and :func:`carry_files`: what a new checkpoint keeps of its parent;
- :func:`left_padded_positions`, the position ids of a left-padded batch.

Nothing here imports a training library; stages that do not train import this, not
:mod:`polm.training`.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import AliasChoices, Field, field_validator, model_validator

from polm.checkpoint import Checkpoint, lineage
from polm.errors import PolmError
from polm.precision import Bf16, resolve_bf16
from polm.settings import StageSettings
from polm.tasks import validate_task_names

log = logging.getLogger("polm")

# What carries a tokenizer between checkpoints (whichever of them a model has).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
# What a stage that writes new weights keeps from its parent, byte for byte.
CARRIED_FILES = (*TOKENIZER_FILES, "generation_config.json")


def carry_files(src: Path, dst: Path, names=CARRIED_FILES) -> None:
    """Copy those of ``names`` that ``src`` has into ``dst`` (tokenizer, generation config)."""
    for name in names:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def task_names(task: str | list[str] | None) -> list[str]:
    """``task`` as a list: a settings' ``task`` may be one name or several."""
    if task is None:
        return []
    return [task] if isinstance(task, str) else list(task)


class TaskOrDataset(StageSettings):
    """Where a stage's data comes from: built-in task(s) or a local file, never both.

    Stages whose data can come from their parent's lineage (``data_from_lineage``) accept
    neither: :func:`with_parent_data` fills it in at run time. The others need one."""

    data_from_lineage: ClassVar[bool] = False

    task: str | list[str] | None = Field(
        default=None,
        description="Built-in task(s), e.g. add or [add, reverse] (their examples, preference "
        "pairs or prompts, as the stage needs).",
    )
    dataset: str | None = Field(
        default=None,
        description="Local data in the format the stage takes: JSONL/JSON/CSV/parquet/text "
        "file or a saved datasets dir (builtin:prose: plain text). Used instead of `task`.",
    )

    _known_tasks = field_validator("task")(validate_task_names)

    @model_validator(mode="after")
    def _one_source(self):
        if self.task is not None and self.dataset is not None:
            raise ValueError("give one of `task` (built-in) or `dataset` (local file), not both")
        if self.task is None and self.dataset is None and not self.data_from_lineage:
            raise ValueError("give exactly one of `task` (built-in) or `dataset` (local file)")
        return self

    @property
    def tasks(self) -> list[str]:
        return task_names(self.task)


class LoraSettings(StageSettings):
    """LoRA's fields (Hu et al., arXiv 2106.09685), under PEFT's names, for the stages that
    train an adapter instead of every weight (``method: lora``)."""

    r: int = Field(default=16, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(default=32, gt=0, description="LoRA scaling numerator.")
    lora_dropout: float = Field(default=0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: str | list[str] = Field(
        default="all-linear", description="Modules LoRA adapts."
    )

    def lora_config(self):
        """PEFT's ``LoraConfig`` for a causal LM from these settings."""
        from peft import LoraConfig, TaskType

        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
            task_type=TaskType.CAUSAL_LM,
        )


class TrainingSettings(StageSettings):
    """Fields every training stage takes, under TRL / transformers names."""

    num_train_epochs: float = Field(
        default=1.0,
        gt=0,
        description="Epochs over the data.",
        validation_alias=AliasChoices("num_train_epochs", "epochs"),
    )
    max_steps: int = Field(
        default=-1, description="Stop after this many optimizer steps (overrides epochs when > 0)."
    )
    learning_rate: float = Field(default=1e-3, gt=0, description="Peak learning rate.")
    per_device_train_batch_size: int = Field(default=32, gt=0, description="Batch per process.")
    gradient_accumulation_steps: int = Field(default=1, gt=0, description="Accumulated batches.")
    lr_scheduler_type: str = Field(default="cosine", description="transformers scheduler name.")
    warmup_steps: float = Field(
        default=0.05, ge=0, description="Warm-up steps, or a fraction of all steps when < 1."
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    max_length: int = Field(default=256, gt=0, description="Truncate sequences to this length.")
    bf16: Bf16 = Field(
        default="auto",
        validate_default=True,
        description="bf16 autocast, weights stay fp32. auto (recorded as the value it "
        "resolved to): on where the hardware computes bf16 natively (AMX / AVX512_BF16 CPUs, "
        "bf16 GPUs), off elsewhere, where emulated bf16 was 17x slower than fp32 (measured).",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations to save memory (TRL turns it on by default; it "
        "slows small models and drops prefix tuning's key/value prefix).",
    )
    logging_steps: int = Field(default=25, gt=0, description="Log the loss every N steps.")
    save_steps: int | None = Field(
        default=None,
        gt=0,
        description="Save a resumable trainer state (weights as safetensors; optimizer, "
        "scheduler and RNG states loaded back with torch's weights-only loader) every N steps "
        "beside the output; re-running the same stage with the same inputs and settings "
        "resumes from the last one and gives the same losses as an uninterrupted run.",
    )
    seed: int = Field(default=0, description="Seed for init, shuffling and dropout.")
    trainer_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Other fields of the trainer's config (transformers TrainingArguments or "
        "the TRL config of the stage), passed as they are, e.g. {max_grad_norm: 0.5, "
        "adam_beta2: 0.99}. A field polm already has a setting for is refused: use that.",
    )

    _bf16 = field_validator("bf16")(resolve_bf16)

    @model_validator(mode="after")
    def _no_shadowed_settings(self):
        taken = sorted(set(self.trainer_kwargs) & set(type(self).model_fields))
        if taken:
            raise ValueError(
                f"trainer_kwargs sets {', '.join(taken)}, which are settings of this stage: "
                "set them directly"
            )
        return self


class DataSettings(TrainingSettings, TaskOrDataset):
    """Training settings plus where the data comes from: a built-in task or a local file."""

    n_train: int | None = Field(
        default=None,
        gt=0,
        description="Use the first N examples (per task) only. Default: all of them, or with "
        "`max_steps` set, as many as those steps use (built-in tasks).",
    )


# --- input checks ---------------------------------------------------------------------------


def single_input(
    inputs: list[Checkpoint], stage: str, *formats: str, causal_lm: bool = True
) -> Checkpoint:
    """The one input of a single-model stage, refused before any load if its format is wrong
    (or, for stages that work on a language model, if it is a reward model)."""
    if len(inputs) != 1:
        raise PolmError(f"{stage} takes one input model, got {len(inputs)}.")
    inputs[0].require_format(*(formats or ("hf",)), stage=stage)
    if causal_lm:
        require_policy(inputs[0], stage)
    return inputs[0]


def require_policy(ckpt: Checkpoint, stage: str) -> None:
    """Refuse a reward model (sequence-classification head) where a causal LM is expected."""
    from polm.loading import is_reward_model

    if is_reward_model(ckpt):
        raise PolmError(
            f"{stage} trains a causal language model, but {ckpt.path} is a reward model "
            f"(made by {ckpt.stage}); give the policy checkpoint instead."
        )


def policy_and_reward(inputs: list[Checkpoint], stage: str) -> tuple[Checkpoint, Checkpoint | None]:
    """``from: [policy]`` or ``from: [policy, reward_model]``, each checked for what it is."""
    from polm.loading import is_reward_model

    if len(inputs) not in (1, 2):
        raise PolmError(f"{stage} takes a policy and optionally a reward model, got {len(inputs)}.")
    policy = inputs[0]
    policy.require_format("hf", stage=stage)
    require_policy(policy, stage)
    reward = inputs[1] if len(inputs) == 2 else None
    if reward is not None and not is_reward_model(reward):
        raise PolmError(
            f"{stage}: the second input must be a reward model (made by align.reward); "
            f"{reward.path} is {reward.stage} [{reward.format}]."
        )
    return policy, reward


# --- data from the lineage ------------------------------------------------------------------


def lineage_data(ckpt: Checkpoint) -> tuple[dict, list[Checkpoint]] | None:
    """The data the nearest trained ancestors of ``ckpt`` (itself included) were made with:
    ``({"task": ...} or {"dataset": ...}, those ancestors)``. A merge's branches each give
    their tasks; a branch stops at its first checkpoint whose settings name data."""
    tasks: list[str] = []
    datasets: list[str] = []
    sources: list[Checkpoint] = []
    skip_below: list[int] = []  # depths of found nodes: their ancestors are not looked at
    for depth, node in lineage(ckpt):
        while skip_below and depth <= skip_below[-1]:
            skip_below.pop()
        if skip_below or not isinstance(node, Checkpoint):
            continue
        s = node.manifest.settings
        found = task_names(s.get("task")) or ([s["dataset"]] if s.get("dataset") else [])
        if not found:
            continue
        skip_below.append(depth)
        sources.append(node)
        if s.get("task"):
            tasks += [t for t in found if t not in tasks]
        elif found[0] not in datasets:
            datasets.append(found[0])
    if tasks:
        return {"task": tasks[0] if len(tasks) == 1 else tasks}, sources
    if datasets:
        return {"dataset": datasets[0]}, sources
    return None


def with_parent_data(settings: TaskOrDataset, parent: Checkpoint, stage: str, need: str):
    """``settings`` as given when they name data; else with the data ``parent``'s lineage
    was trained on, and what to record about it (said in the log too). ``need`` says what the
    data is for, in the error when the lineage has none."""
    if settings.task is not None or settings.dataset is not None:
        return settings, {}
    found = lineage_data(parent)
    if found is None:
        raise PolmError(
            f"{stage} needs {need}: give `task` (built-in) or `dataset` (local file); the "
            f"lineage of {parent.path} records no training data to take instead."
        )
    data, sources = found
    origin = ", ".join(f"{c.stage} ({c.path})" for c in sources)
    what = f"task {data['task']}" if "task" in data else f"dataset {data['dataset']}"
    log.info("%s: no data given; using the parent's %s, from %s", stage, what, origin)
    filled = settings.model_copy(update=data)
    return filled, {"data.from_lineage": f"{what} from {origin}"}


# --- prompts --------------------------------------------------------------------------------


@dataclass
class Prompt:
    messages: list[dict]
    task: str | None = None
    example: object = None  # the task's Example (answer, verifier) for built-in prompts

    @property
    def text(self) -> str:
        return next(m["content"] for m in self.messages if m["role"] == "user")


def load_prompts(
    task: str | list[str] | None, dataset: str | None, split: str = "train", n: int | None = None
) -> list[Prompt]:
    """Prompts of built-in task(s) (``n`` per task, from ``split``) or of a local file with a
    ``prompt`` column (text or chat messages); a file has no held-out split of ours, so
    ``split="test"`` gives none from it."""
    from polm.data import check_columns, load_dataset_source
    from polm.tasks import get_task

    if task is not None:
        return [
            Prompt([{"role": "user", "content": ex.prompt}], t, ex)
            for t in task_names(task)
            for ex in get_task(t).examples(split, n)
        ]
    if split == "test":
        return []
    ds = load_dataset_source(dataset, n)
    check_columns(ds, dataset, [{"prompt"}])
    return [
        Prompt(p if isinstance(p, list) else [{"role": "user", "content": p}]) for p in ds["prompt"]
    ]


def left_padded_positions(attention_mask):
    """Position ids of a left-padded batch: counting from each row's first real token (pad
    positions get 0), as the model saw them unpadded."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)
