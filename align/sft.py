"""Supervised fine-tuning with TRL's ``SFTTrainer``: full, LoRA, bottleneck adapters, prefix and
prompt tuning, P-tuning.

- Instruction tuning on chat data (``messages``) with the loss on assistant tokens only,
  whatever the model's chat template (:mod:`align.chat_masks`: the template's
  ``{% generation %}`` markers, TRL's training version of a template it knows, or polm's own
  masks from rendering each turn); prompt/completion data
  trains on completions only; plain ``text`` is continued pretraining (domain adaptation).
- ``replay`` mixes in data from outside the task (rehearsal: the base's pretraining chats, or a
  user's general data) so that the tuned model keeps what the task data does not show. Without
  it, an expert tuned on one task answers every prompt in that task's shape (an ``add`` expert
  writes a scratchpad for ``reverse x``), and its task vector overrides the others in a merge.
- PEFT methods through PEFT: LoRA (Hu et al., arXiv 2106.09685), prefix tuning (Li & Liang,
  arXiv 2101.00190), prompt tuning (Lester et al., arXiv 2104.08691), P-tuning (Liu et al.,
  arXiv 2103.10385: the virtual tokens come out of a prompt encoder, an MLP or an LSTM, PEFT's
  ``PromptEncoderConfig``). A LoRA run writes a merged ``hf`` checkpoint by default, or the
  adapter with ``output_format: peft-adapter``; prefix and prompt tuning and P-tuning can only
  be stored as adapters (their virtual tokens are inputs, not weights to fold in).
- Bottleneck adapters (Houlsby et al., arXiv 1902.00751) through :mod:`polm.bottleneck`
  (no maintained library offers them with transformers 5; it says why): a small
  down-projection, non-linearity and up-projection after each layer's attention and/or MLP,
  stored as a ``bottleneck-adapter`` on the base and served unmerged (the non-linearity keeps
  it out of the weights).

Runs on CPU (``use_cpu``) or GPU, in one process or N (``--nproc``, DDP through accelerate).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from polm.checkpoint import Checkpoint
from polm.stage import DataSettings, LoraSettings, single_input
from polm.tasks import validate_task_names
from polm.training import save_trained, scratch_dir, task_examples, train, trainer_args

STAGE = "align.sft"
VIRTUAL = ("prefix", "prompt", "ptuning")  # methods that learn virtual tokens: adapters only
ADAPTER = "bottleneck-adapter"
SELF = "self:"  # replay source: the input model's own answers to a built-in task's prompts
log = logging.getLogger("polm")


class SFTSettings(DataSettings, LoraSettings):
    """Settings of ``align.sft``; training fields use TRL / transformers names."""

    method: Literal["full", "lora", "adapter", "prefix", "prompt", "ptuning"] = Field(
        default="full", description="Full fine-tuning or a parameter-efficient method."
    )
    output_format: Literal["hf", "peft-adapter", "bottleneck-adapter"] | None = Field(
        default=None,
        description="hf (merged, default for full/lora) or peft-adapter (default and only "
        "choice for prefix/prompt/ptuning); method adapter writes a bottleneck-adapter.",
    )
    reduction_factor: int = Field(
        default=16, gt=0, description="Bottleneck adapters: hidden size / bottleneck size."
    )
    adapter_placement: list[Literal["attention", "mlp"]] = Field(
        default=["attention", "mlp"],
        min_length=1,
        description="Bottleneck adapters: after each layer's attention and/or MLP (both: "
        "Houlsby's placement; mlp alone: Pfeiffer's).",
    )
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field(
        default="relu", description="Bottleneck adapters: the activation between the two."
    )
    num_virtual_tokens: int = Field(
        default=16, gt=0, description="Prefix/prompt length (prefix, prompt, ptuning)."
    )
    encoder: Literal["mlp", "lstm"] = Field(
        default="mlp", description="P-tuning's prompt encoder (PEFT's reparameterization type)."
    )
    encoder_hidden_size: int | None = Field(
        default=None, gt=0, description="P-tuning's encoder width (default: the model's)."
    )
    tune_model: bool = Field(
        default=False,
        description="P-tuning with the model's weights trained too (the P-tuning paper's tuned-"
        "model setting; frozen is its other): the tuned weights are stored under base/ in the "
        "adapter checkpoint, as the adapter's base.",
    )
    replay: str | list[str] | None = Field(
        default=None,
        description="Rehearsal data mixed into the training data (same format), one source or "
        "several sharing the replay equally: builtin:pretraining (the chats builtin:tiny-base "
        "was pretrained on), a local file, or self:TASK (the input model's own greedy answers "
        "to a built-in task's training prompts: holds the model to what it did on inputs the "
        "task data lacks, like DreamBooth's prior preservation). Keeps the model's other "
        "skills, and its task vector mergeable.",
    )
    replay_fraction: float = Field(
        default=0.25, gt=0, lt=1, description="Share of the training examples taken from replay."
    )
    critique: bool = Field(
        default=False,
        description="Teach the task's self-refine skills instead of the task (tasks with a "
        "critic): the input model's own greedy answers to the task's training prompts, each "
        "critiqued by the task's verifier (where it is wrong, or that it is right), and the "
        "wrong ones revised to the reference answer (polm.refine), beside the model's own "
        "answers (so that its first answer stays its own).",
    )
    packing: bool = Field(default=False, description="Pack sequences into max_length blocks.")

    assistant_only_loss: bool = Field(
        default=True, description="Loss on assistant tokens only (chat data)."
    )

    @model_validator(mode="after")
    def _critique_needs_a_critic(self):
        from polm.refine import CRITICS

        if self.critique:
            missing = [t for t in self.tasks or [] if t not in CRITICS]
            if self.task is None or missing:
                raise ValueError(
                    "critique: true needs a built-in task with a critic "
                    f"({', '.join(CRITICS)}); got {', '.join(missing) or 'no task'}"
                )
        return self

    @field_validator("replay")
    @classmethod
    def _known_replay_tasks(cls, value):
        for source in [value] if isinstance(value, str) else value or []:
            if source.startswith(SELF):
                validate_task_names(source.removeprefix(SELF))
        return value

    @model_validator(mode="after")
    def _check(self):
        if self.tune_model and self.method != "ptuning":
            raise ValueError("tune_model applies to method: ptuning only")
        if (self.method == "adapter") != (self.resolved_output_format == ADAPTER):
            raise ValueError(
                f"method adapter writes output_format {ADAPTER} (a bottleneck adapter cannot "
                "be folded into the weights), and only it does"
            )
        if self.method in VIRTUAL and self.output_format == "hf":
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
        if self.method == "adapter":
            return ADAPTER
        return "peft-adapter" if self.method in VIRTUAL else "hf"

    def bottleneck_config(self) -> dict:
        return {
            "reduction_factor": self.reduction_factor,
            "placement": self.adapter_placement,
            "non_linearity": self.non_linearity,
        }


FORMATS = [{"messages"}, {"prompt", "completion"}, {"text"}]


def build_dataset(s: SFTSettings, answer=None):
    """The training data, with replay mixed in; ``answer(prompts) -> completions`` (the input
    model's greedy answers) is needed for ``self:TASK`` replay sources."""
    from polm.data import check_columns, load_dataset_source, task_dataset

    if s.critique:
        ds = critique_dataset(s, answer)
    elif s.task is not None:
        ds = task_dataset(s.tasks, "messages", task_examples(s), s.seed)
    else:
        ds = load_dataset_source(s.dataset, s.n_train)
        check_columns(ds, s.dataset, FORMATS)
    return with_replay(ds, s, answer) if s.replay else ds


def critique_dataset(s: SFTSettings, answer):
    """The self-refine skills' training rows (:func:`polm.refine.critique_rows`) from the input
    model's own answers to each task's training prompts, beside those answers themselves as
    rows (the model held to its first answers, as ``self:`` replay does: trained on critiques
    alone, a 12.8% add model fell to 1.0%; with the task's reference rows instead, it learned
    the task, to 94.4%), shuffled."""
    import datasets

    from polm.refine import critique_rows
    from polm.tasks import get_task

    n = task_examples(s) or 2000
    rows = []
    for task in s.tasks:
        examples = get_task(task).examples("train", n)
        log.info("critique: answering %d %s prompts with the input model", len(examples), task)
        answers = [a.strip() for a in answer([e.prompt for e in examples])]
        rows += critique_rows(task, examples, answers)
        rows += [
            {
                "prompt": [{"role": "user", "content": e.prompt}],
                "completion": [{"role": "assistant", "content": a}],
            }
            for e, a in zip(examples, answers)
        ]
    return datasets.Dataset.from_list(rows).shuffle(seed=s.seed)


def with_replay(ds, s: SFTSettings, answer=None):
    """``ds`` with replay examples making up ``replay_fraction`` of the result, shuffled; with
    several sources, each gives an equal share (the first ones one more when it does not
    divide)."""
    from datasets import concatenate_datasets

    from polm.data import load_dataset_source
    from polm.errors import PolmError

    n = max(1, round(len(ds) * s.replay_fraction / (1 - s.replay_fraction)))
    sources = [s.replay] if isinstance(s.replay, str) else list(s.replay)
    want = next(f for f in FORMATS if f <= set(ds.column_names))
    parts = [ds.select_columns(sorted(want))]
    for i, source in enumerate(sources):
        share = n // len(sources) + (i < n % len(sources))
        if source.startswith(SELF):
            replay = own_answers(source.removeprefix(SELF), share, want, answer)
        else:
            replay = load_dataset_source(source, share)
        if not want <= set(replay.column_names):
            raise PolmError(
                f"{STAGE}: replay {source} has columns {sorted(replay.column_names)}; the "
                f"training data is {'+'.join(sorted(want))}, and replay must be the same format."
            )
        parts.append(replay.select_columns(sorted(want)))
    return concatenate_datasets(parts).shuffle(seed=s.seed)


def own_answers(task: str, n: int, want: set[str], answer):
    """The first ``n`` training prompts of ``task`` with the input model's greedy answers, in
    the training data's format (chat messages or prompt/completion)."""
    import datasets

    from polm.errors import PolmError
    from polm.tasks import get_task

    if want == {"text"} or answer is None:
        raise PolmError(
            f"{STAGE}: replay {SELF}{task} needs chat training data and the input model; "
            "plain-text training has no prompts to answer."
        )
    prompts = [e.prompt for e in get_task(task).examples("train", n)]
    log.info("replay %s%s: answering %d prompts with the input model", SELF, task, len(prompts))
    completions = [c.strip() for c in answer(prompts)]
    user = [[{"role": "user", "content": p}] for p in prompts]
    reply = [[{"role": "assistant", "content": c}] for c in completions]
    if want == {"messages"}:
        return datasets.Dataset.from_dict({"messages": [u + r for u, r in zip(user, reply)]})
    return datasets.Dataset.from_dict({"prompt": user, "completion": reply})


def peft_config(s: SFTSettings):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    if s.method == "lora":
        return s.lora_config()
    if s.method == "prefix":
        return PrefixTuningConfig(
            num_virtual_tokens=s.num_virtual_tokens, task_type=TaskType.CAUSAL_LM
        )
    if s.method == "prompt":
        return PromptTuningConfig(
            num_virtual_tokens=s.num_virtual_tokens, task_type=TaskType.CAUSAL_LM
        )
    if s.method == "ptuning":
        extra = {"encoder_hidden_size": s.encoder_hidden_size} if s.encoder_hidden_size else {}
        return PromptEncoderConfig(
            num_virtual_tokens=s.num_virtual_tokens,
            encoder_reparameterization_type=s.encoder.upper(),
            task_type=TaskType.CAUSAL_LM,
            **extra,
        )
    return None


def assistant_masks(s: SFTSettings, tokenizer, dataset):
    """``(dataset, trl_masks, metrics)``: where the loss is on the assistant's tokens only,
    either TRL masks them (``trl_masks``: the template has ``{% generation %}`` markers, or TRL
    knows a training version of it) or polm tokenizes the data with the masks
    (:mod:`align.chat_masks`); the way taken goes into the metrics."""
    from align import chat_masks

    if not (s.assistant_only_loss and "messages" in dataset.column_names):
        return dataset, False, {}
    source = chat_masks.mask_source(tokenizer)
    log.info("assistant-only loss: masks from %s", chat_masks.DESCRIPTIONS[source])
    if source == chat_masks.POLM:
        dataset = chat_masks.tokenize_dataset(tokenizer, dataset)
    return dataset, source != chat_masks.POLM, {"train.assistant_mask": source}


def _greedy_answers(model, tokenizer, prompts: list[str]) -> list[str]:
    import torch

    from polm.evaluate import greedy_generate

    if torch.cuda.is_available():
        model.cuda()  # where the trainer puts it anyway
    return greedy_generate(model, tokenizer, prompts)


def build_trainer(base: Checkpoint, settings: SFTSettings, out: Path):
    """``(trainer, tokenizer, metrics)``: TRL's ``SFTTrainer`` on ``base`` with its data set
    prepared (replay mixed in, assistant masks), ready to train; ``metrics`` says how the
    assistant's tokens were found."""
    import torch
    from trl import SFTConfig, SFTTrainer

    from polm.loading import load_model

    s = settings
    torch.manual_seed(s.seed)
    model, tokenizer = load_model(base)
    if s.method == "adapter":
        from polm import bottleneck

        targets = bottleneck.add_adapters(model, s.bottleneck_config())
        model.enable_input_require_grads()  # the embeddings are frozen: checkpointing needs it
        log.info("bottleneck adapters after %d modules", len(targets))
    dataset = build_dataset(s, answer=lambda prompts: _greedy_answers(model, tokenizer, prompts))
    dataset, trl_masks, mask_metrics = assistant_masks(s, tokenizer, dataset)
    args = SFTConfig(
        **trainer_args(s, scratch_dir(out, s, [base])),
        packing=s.packing,
        assistant_only_loss=trl_masks,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config(s),
    )
    if s.tune_model:  # PEFT froze the model for the prompt encoder: train both
        trainer.model.base_model.requires_grad_(True)
    return trainer, tokenizer, mask_metrics


def run(inputs: list[Checkpoint], settings: SFTSettings, out: Path) -> Checkpoint | None:
    base = single_input(inputs, STAGE, "hf")
    s = settings
    trainer, tokenizer, mask_metrics = build_trainer(base, s, out)
    metrics = {**train(trainer), **mask_metrics}
    fmt = s.resolved_output_format
    save_model = None
    if fmt == ADAPTER:
        from polm import bottleneck

        config = {**s.bottleneck_config(), "targets": bottleneck.targets_of(trainer.model)}
        save_model = lambda model, directory: bottleneck.save(model, config, directory)  # noqa: E731
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
        save_model=save_model,
        save_base=s.tune_model,
    )
