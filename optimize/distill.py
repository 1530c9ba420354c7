"""Knowledge distillation from a teacher checkpoint into a smaller student, on TRL's GKD trainer.

The student is a given checkpoint (``from: [teacher, student]``) or is derived from the teacher:
``student_layers`` keeps some of its decoder layers (``every_other`` halves the depth, as
DistilBERT did), ``student_config`` builds a narrower model of the same family, randomly
initialised, with the teacher's tokenizer. Teacher and student must share the vocabulary.

The loss compares the student's next-token distribution with the teacher's on the completion
tokens (:func:`distill_loss`): forward KL (Hinton et al., arXiv 1503.02531), reverse KL (MiniLLM,
arXiv 2306.08543) or the generalized Jensen-Shannon divergence of GKD (Agarwal et al., arXiv
2306.13649), at a softmax temperature (scaled by T² so gradients keep their size), mixed with
the cross-entropy to the completion tokens by ``label_weight``. Which completions:

- off-policy: the dataset's completions (``lmbda: 0``, the default);
- sequence-level KD: the teacher's own completions (``seq_kd: true``), so only prompts are
  needed: the reference answers are blanked and never seen;
- on-policy: the student's samples (``lmbda``: the share of steps that use them; GKD).

TRL's ``GKDTrainer`` drives generation and the on-/off-policy switch; polm replaces its loss
(TRL's applies no temperature to the loss and has no label term) and passes position ids for
the left-padded batches it builds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from polm.checkpoint import Checkpoint
from polm.errors import PolmError
from polm.stage import DataSettings, left_padded_positions, require_policy, with_parent_data

STAGE = "optimize.distill"


class KDSettings(DataSettings):
    """The distillation loss and where its completions come from (also the recovery training
    of ``optimize.onebit``); generation and on-policy names follow TRL's GKDConfig. Without
    `task` or `dataset`, the teacher's own training data, from its lineage."""

    data_from_lineage: ClassVar[bool] = True

    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        default="forward_kl",
        description="Divergence between teacher and student next-token distributions: "
        "forward_kl KL(teacher||student), reverse_kl KL(student||teacher), jsd the generalized "
        "JSD with interpolation `beta`.",
    )
    beta: float = Field(
        default=0.5, gt=0, lt=1, description="Generalized JSD interpolation (loss: jsd only)."
    )
    temperature: float = Field(
        default=1.0, gt=0, description="Softmax temperature of the distillation loss."
    )
    label_weight: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Weight of the cross-entropy to the completion tokens; the divergence gets "
        "1 - label_weight.",
    )
    lmbda: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Share of steps trained on the student's own samples (on-policy, GKD); "
        "0 is off-policy.",
    )
    seq_kd: bool = Field(
        default=False,
        description="Train on the teacher's completions instead of the dataset's "
        "(sequence-level KD): prompts alone are enough.",
    )
    sampling_temperature: float = Field(
        default=1.0, ge=0, description="Temperature of on-policy / seq_kd sampling; 0 is greedy."
    )
    max_new_tokens: int = Field(default=48, gt=0, description="Tokens per sampled completion.")

    @model_validator(mode="after")
    def _check_kd(self):
        if self.lmbda == 1 and self.label_weight > 0:
            raise ValueError(
                "label_weight needs completions to imitate, but lmbda: 1 trains only on the "
                "student's own samples; lower lmbda or set label_weight: 0"
            )
        return self

    @property
    def uses_reference_answers(self) -> bool:
        return not self.seq_kd and self.lmbda < 1


class DistillSettings(KDSettings):
    """Settings of ``optimize.distill``."""

    student_layers: Literal["every_other"] | list[int] | None = Field(
        default=None,
        description="Derive the student from the teacher by keeping these decoder layers "
        "(every_other: 0, 2, 4, ...).",
    )
    student_config: dict[str, int] | None = Field(
        default=None,
        description="Derive a fresh, randomly initialised student: the teacher's config with "
        "these fields changed, e.g. {hidden_size: 64, intermediate_size: 256}.",
    )

    draft_for_teacher: bool = Field(
        default=False,
        description="Record this student as its teacher's draft model: serving the teacher on "
        "the transformers backend then decodes greedy requests speculatively with it (found in "
        "the directory beside the teacher's, as a recipe's stages are; its onnx export, where "
        "one sits there too).",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.student_layers is not None and self.student_config is not None:
            raise ValueError("give student_layers or student_config, not both")
        return self


def distill_loss(
    student_logits,
    teacher_logits,
    mask=None,
    loss: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
):
    """Mean per-token divergence between teacher and student over the positions where ``mask``
    is true (logits ``[batch, seq, vocab]``, mask ``[batch, seq]``), times ``temperature**2``.

    ``forward_kl`` is KL(teacher || student), mode-covering; ``reverse_kl`` is
    KL(student || teacher), mode-seeking; ``jsd`` is GKD's generalized JSD:
    beta·KL(teacher || m) + (1 - beta)·KL(student || m), m = beta·teacher + (1 - beta)·student.
    """
    import math

    import torch
    import torch.nn.functional as F

    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if loss == "forward_kl":
        per_token = (t.exp() * (t - s)).sum(-1)
    elif loss == "reverse_kl":
        per_token = (s.exp() * (s - t)).sum(-1)
    elif loss == "jsd":
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)]), dim=0)
        per_token = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    else:
        raise ValueError(f"unknown distillation loss {loss!r}")
    if mask is not None:
        per_token = per_token[mask.bool()]
    if per_token.numel() == 0:
        return student_logits.sum() * 0.0
    return per_token.mean() * temperature**2


def derive_student(teacher, s: DistillSettings):
    """A smaller student built from the loaded ``teacher`` model (or None when not asked)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = teacher.config
    if s.student_config is not None:
        unknown = sorted(k for k in s.student_config if not hasattr(cfg, k))
        if unknown:
            raise PolmError(
                f"{STAGE}: student_config names {', '.join(unknown)}, which the teacher's "
                f"{cfg.model_type} config does not have."
            )
        if "vocab_size" in s.student_config:
            raise PolmError(f"{STAGE}: the student must keep the teacher's vocab_size.")
        new = cfg.__class__.from_dict({**cfg.to_dict(), **s.student_config})
        return AutoModelForCausalLM.from_config(new, dtype=torch.float32)
    if s.student_layers is None:
        return None
    n = cfg.num_hidden_layers
    keep = list(range(0, n, 2)) if s.student_layers == "every_other" else list(s.student_layers)
    if not keep or any(not 0 <= i < n for i in keep) or len(set(keep)) != len(keep):
        raise PolmError(
            f"{STAGE}: student_layers {s.student_layers} must name distinct layers of the "
            f"teacher's 0..{n - 1}."
        )
    fields = {"num_hidden_layers": len(keep)}
    if getattr(cfg, "layer_types", None):
        fields["layer_types"] = [cfg.layer_types[i] for i in keep]
    new = cfg.__class__.from_dict({**cfg.to_dict(), **fields})
    student = AutoModelForCausalLM.from_config(new, dtype=torch.float32)
    src = teacher.state_dict()
    state = {}
    for key in student.state_dict():
        parts = key.split(".")
        if "layers" in parts:  # model.layers.<new index>.…  <-  model.layers.<kept index>.…
            at = parts.index("layers") + 1
            parts[at] = str(keep[int(parts[at])])
        state[key] = src[".".join(parts)]
    student.load_state_dict(state)
    return student


def _vocab_size(ckpt: Checkpoint) -> int | None:
    cfg = json.loads((ckpt.path / "config.json").read_text())
    return cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")


def check_inputs(
    inputs: list[Checkpoint], s: DistillSettings
) -> tuple[Checkpoint, Checkpoint | None]:
    """The teacher and the given student (if any), refused before any weights are loaded."""
    if len(inputs) not in (1, 2):
        raise PolmError(
            f"{STAGE} takes the teacher, or the teacher and the student, as inputs; got "
            f"{len(inputs)}."
        )
    for c in inputs:
        c.require_format("hf", stage=STAGE)
        require_policy(c, STAGE)
    teacher = inputs[0]
    student = inputs[1] if len(inputs) == 2 else None
    if student is None and s.student_layers is None and s.student_config is None:
        raise PolmError(
            f"{STAGE}: give the student as a second input, or derive it from the teacher with "
            "student_layers (e.g. every_other) or student_config."
        )
    if student is not None and (s.student_layers is not None or s.student_config is not None):
        raise PolmError(
            f"{STAGE}: a student was given as the second input; student_layers and "
            "student_config derive one from the teacher instead: use one or the other."
        )
    if student is not None and _vocab_size(student) != _vocab_size(teacher):
        raise PolmError(
            f"{STAGE}: the student {student.path} has vocab_size {_vocab_size(student)} and the "
            f"teacher {teacher.path} {_vocab_size(teacher)}; logit distillation needs one "
            "vocabulary."
        )
    return teacher, student


class RecoverySettings(KDSettings):
    """A compression stage's recovery: distillation from its uncompressed parent, to win back
    what the compression cost (``optimize.onebit``, ``optimize.prune``)."""

    recovery: bool = Field(
        default=True,
        description="Distill the parent into the compressed model (onebit: through the "
        "straight-through estimator; prune: the pruned weights held at zero); false writes the "
        "compressed model at once.",
    )
    max_steps: int = Field(default=300, description="Recovery steps.")
    eval_n: int = Field(
        default=200,
        ge=0,
        description="Held-out examples per task on which the compressed model is scored before "
        "recovery (0: skip); the recipe's eval suite scores the output.",
    )


def before_recovery(model, tokenizer, s: RecoverySettings, prefix: str) -> dict:
    """``{prefix}.before_recovery.{task}.accuracy`` for each task (none with ``eval_n: 0``)."""
    from polm.evaluate import accuracy

    if s.eval_n == 0:
        return {}
    model.eval()
    return {
        f"{prefix}.before_recovery.{t}.accuracy": accuracy(model, tokenizer, t, s.eval_n)[
            "accuracy"
        ]
        for t in s.tasks
    }


def recover(student, parent, tokenizer, dataset, s: RecoverySettings, out: Path, inputs,
            callbacks=()) -> dict:  # fmt: skip
    """Train ``student`` by distillation from ``parent`` (a compression stage's recovery); the
    training metrics."""
    import shutil

    from polm.training import train

    student.train()
    trainer = make_trainer(student, parent, tokenizer, dataset, s, out, inputs)
    for callback in callbacks:
        trainer.add_callback(callback)
    metrics = train(trainer)
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    return metrics


def build_dataset(s: KDSettings):
    """Chat ``messages`` rows; the assistant turn is blanked when it is never trained on."""
    from polm.data import check_columns, load_dataset_source, task_dataset

    if s.task is not None:
        ds = task_dataset(s.tasks, "messages", s.n_train, s.seed)
    else:
        ds = load_dataset_source(s.dataset, s.n_train)
        accepted = [{"messages"}, {"prompt", "completion"}]
        if not s.uses_reference_answers:
            accepted.append({"prompt"})
        check_columns(ds, s.dataset, accepted)
        if "messages" not in ds.column_names:
            ds = ds.map(_to_messages, remove_columns=ds.column_names)
    if not s.uses_reference_answers:
        ds = ds.map(lambda row: {"messages": [*row["messages"][:-1], _blank(row["messages"][-1])]})
    return ds.select_columns(["messages"])


def _to_messages(row: dict) -> dict:
    prompt, completion = row["prompt"], row.get("completion") or ""
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    return {"messages": prompt + list(completion)}


def _blank(message: dict) -> dict:
    return {**message, "content": ""} if message.get("role") == "assistant" else message


def _import_gkd():
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKD lives in trl.experimental
    from trl.experimental import gkd

    return gkd


def _trainer_class():
    import random

    import torch
    from transformers import GenerationConfig

    GKDTrainer = _import_gkd().GKDTrainer

    class PolmGKDTrainer(GKDTrainer):
        """GKD with polm's loss (temperature, label mix) and greedy sampling when asked."""

        def __init__(self, *args, settings: KDSettings, **kwargs):
            super().__init__(*args, **kwargs)
            self.settings = settings
            if settings.sampling_temperature == 0:
                self.generation_config = GenerationConfig(
                    **{**self.generation_kwargs, "do_sample": False, "temperature": None}
                )
                self.generation_config.eos_token_id = self.model.generation_config.eos_token_id
            self.rng = random.Random(settings.seed)

        def training_step(self, model, inputs, num_items_in_batch=None):
            # GKD draws from Python's global RNG; a private one keeps runs reproducible
            # whatever else draws from it.
            self.lmbda = 1.0 if self.rng.random() < self.settings.lmbda else 0.0
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            s = self.settings
            mask = inputs["attention_mask"]
            feed = dict(
                input_ids=inputs["input_ids"],
                attention_mask=mask,
                position_ids=left_padded_positions(mask),  # GKD's batches are left-padded
            )
            student = model(**feed)
            self.teacher_model.eval()
            with torch.no_grad():
                teacher = self.teacher_model(**feed)
            labels = inputs["labels"][:, 1:]
            completion = labels != -100
            loss = distill_loss(
                student.logits[:, :-1],
                teacher.logits[:, :-1],
                completion,
                loss=s.loss,
                beta=s.beta,
                temperature=s.temperature,
            )
            if s.label_weight > 0:
                ce = torch.nn.functional.cross_entropy(
                    student.logits[:, :-1][completion].float(), labels[completion]
                )
                loss = (1 - s.label_weight) * loss + s.label_weight * ce
            return (loss, student) if return_outputs else loss

    return PolmGKDTrainer


def make_trainer(student, teacher, tokenizer, dataset, s: KDSettings, out: Path, inputs):
    """A GKD trainer that distills ``teacher`` into ``student`` with polm's loss."""
    from polm.training import scratch_dir, trainer_args

    teacher.eval()
    args = _import_gkd().GKDConfig(
        **trainer_args(s, scratch_dir(out, s, inputs)),
        lmbda=0.0,  # decided per step by the trainer from settings.lmbda
        beta=s.beta,
        temperature=s.sampling_temperature or 1.0,
        max_new_tokens=s.max_new_tokens,
        seq_kd=s.seq_kd,
        disable_dropout=True,
    )
    return _trainer_class()(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        settings=s,
    )


def run(inputs: list[Checkpoint], settings: DistillSettings, out: Path) -> Checkpoint | None:
    import torch

    from polm.loading import load_model
    from polm.training import save_trained, train

    teacher_ckpt, student_ckpt = check_inputs(inputs, settings)
    s, data_note = with_parent_data(settings, teacher_ckpt, STAGE, "prompts to distill on")
    dataset = build_dataset(s)
    torch.manual_seed(s.seed)
    teacher, tokenizer = load_model(teacher_ckpt)
    if student_ckpt is not None:
        student, _ = load_model(student_ckpt)
    else:
        student = derive_student(teacher, s)
    trainer = make_trainer(student, teacher, tokenizer, dataset, s, out, inputs)
    metrics = train(trainer) | data_note
    metrics["distill.teacher_params"] = sum(p.numel() for p in teacher.parameters())
    metrics["distill.student_layers"] = student.config.num_hidden_layers
    params = list(student.parameters())
    metrics["params"] = sum(p.numel() for p in params)
    metrics["bits_per_weight"] = (
        8 * sum(p.numel() * p.element_size() for p in params) / max(1, metrics["params"])
    )
    return save_trained(
        trainer, tokenizer, out, stage=STAGE, settings=s, parents=inputs, metrics=metrics
    )
