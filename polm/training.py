"""Trainer code every training stage shares: the trainer arguments built from the common
settings (``polm.stage.TrainingSettings``), scratch space and resuming, the training summary,
and writing the trained model.

Stages stay one file each (``align/sft.py``, ``align/dpo.py``, ...): they choose a TRL trainer
and its own settings; this module keeps CPU/GPU placement, seeding, determinism, scratch space
and multi-process saving the same everywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from polm import progress
from polm.checkpoint import TRAIN_LOG, Checkpoint, staging
from polm.errors import PolmError
from polm.settings import StageSettings
from polm.stage import DataSettings, TrainingSettings

log = logging.getLogger("polm")


def task_examples(s: DataSettings) -> int | None:
    """How many examples of a built-in task to prepare: ``n_train``, else with ``max_steps``
    set as many as those steps consume, else all. TRL tokenizes the whole dataset up front;
    for the 20,000-example task splits that was 11 s of a 15-step SFT's 16 s (measured)."""
    import os

    if s.n_train is not None or s.max_steps <= 0:
        return s.n_train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return s.max_steps * s.per_device_train_batch_size * s.gradient_accumulation_steps * world


TUNED_BASE = "base"  # an adapter's own trained base, inside its checkpoint (polm.loading)
RESUME_PREFIX = "resume-"
SAVED_MARKER = ".polm-saved"


def scratch_dir(
    out: Path, settings: TrainingSettings | None = None, parents: list[Checkpoint] = ()
) -> Path:
    """The trainer's scratch space, beside the output.

    Without ``save_steps`` it is a fresh temporary directory that `polm run` removes after a
    kill. With ``save_steps`` it is ``.<out>.resume-<key>``, where the key hashes the stage
    settings and the inputs' content hashes: the same stage re-run on the same inputs finds its
    saved steps there and resumes; anything else starts over (older resume dirs are removed).
    """
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    if settings is None or settings.save_steps is None:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    blob = json.dumps(
        {
            "settings": settings.model_dump(mode="json"),
            "settings_class": type(settings).__qualname__,
            "inputs": [p.manifest.content_hash for p in parents],
        },
        sort_keys=True,
    )
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    workdir = out.parent / f".{out.name}.{RESUME_PREFIX}{key}"
    for old in out.parent.glob(f".{out.name}.{RESUME_PREFIX}*"):
        if old != workdir:
            shutil.rmtree(old, ignore_errors=True)
    workdir.mkdir(exist_ok=True)
    return workdir


def last_saved_step(workdir: Path) -> Path | None:
    """The newest trainer checkpoint in ``workdir`` that was written completely."""
    saved = [
        d
        for d in Path(workdir).glob("checkpoint-*")
        if d.name.split("-")[-1].isdigit() and (d / SAVED_MARKER).exists()
    ]
    return max(saved, key=lambda d: int(d.name.split("-")[-1]), default=None)


def _mark_saved_callback():
    from transformers import TrainerCallback

    class MarkSaved(TrainerCallback):
        """Marks a trainer checkpoint as complete once transformers has written all of it."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    (ckpt / SAVED_MARKER).touch()

    return MarkSaved()


def trainer_args(s: TrainingSettings, workdir: Path, config_cls=None) -> dict:
    """Keyword arguments for a TRL config class, from the common settings (only the fields
    ``config_cls`` has, when given: GRPO's config has no ``max_length``, for instance)."""
    import dataclasses

    import torch

    args = dict(
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
        seed=s.seed,
        data_seed=s.seed,
        logging_steps=s.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if s.save_steps else "no",
        save_steps=s.save_steps or 500,
        save_total_limit=2,  # the older is deleted only after the newer is complete
        report_to="none",
        full_determinism=True,
        dataloader_num_workers=0,
        gradient_checkpointing=s.gradient_checkpointing,
    )
    if config_cls is not None:
        known = {f.name for f in dataclasses.fields(config_cls)}
        args = {k: v for k, v in args.items() if k in known}
    clash = sorted(set(s.trainer_kwargs) & set(args))
    if clash:
        raise PolmError(
            f"trainer_kwargs sets {', '.join(clash)}, which polm sets itself (it keeps runs on "
            "CPU, deterministic and resumable); leave them out."
        )
    return {**args, **s.trainer_kwargs}


@contextlib.contextmanager
def logprob_tiles_fit_vocab(model):
    """TRL's fused LM head (SFT, GRPO) projects onto the vocabulary in tiles 32,768 columns wide,
    and allocates a whole tile's buffer on every forward and backward, however small the
    vocabulary. Under ``full_determinism`` torch fills each fresh buffer with NaN, so on CPU a
    384-token vocabulary paid for 85x the memory it used: 28% of an SFT step, 17% of a GRPO run
    (measured on tiny-base). Tiles no wider than the vocabulary give the same bits (one tile
    either way) in less time; larger vocabularies keep TRL's width."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:  # pragma: no cover - TRL is a dependency
        yield
        return
    default = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", None)
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(default, int) or not isinstance(vocab, int) or vocab >= default:
        yield
        return
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = vocab
    try:
        yield
    finally:
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = default


# Longest sequence that trains faster through SDPA's math kernel than its fused one (below).
SHORT_ATTENTION = 256


@contextlib.contextmanager
def short_sequences_attend_in_math():
    """PyTorch's fused (flash) attention is slow to differentiate on CPU in bf16 at short
    sequences: one forward and backward at batch 32, 4 heads, 48 tokens, head size 32 took
    14.2 ms against 3.5 ms through SDPA's math kernel, 37% of an SFT step on tiny-base
    (measured, AMD EPYC with avx512_bf16, one thread). The two are even at 256 tokens and the
    fused kernel wins beyond (3x at 1,024). While a model trains, attention calls on bf16 CPU
    tensors (or under bf16 autocast) with grad on and at most ``SHORT_ATTENTION`` query tokens
    go through the math kernel; the rest (GPUs, fp32, inference, long sequences) are left to
    SDPA's own choice. Same function, same masks: only the kernel differs (100 SFT steps of
    tiny-base: 17.1 s -> 12.8 s)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    default = AttentionInterface._global_mapping.get("sdpa")

    def attend(module, query, *args, **kwargs):
        bf16 = query.dtype == torch.bfloat16 or (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
        short = query.device.type == "cpu" and query.shape[-2] <= SHORT_ATTENTION
        math = bf16 and short and torch.is_grad_enabled()
        with sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext():
            return sdpa_attention_forward(module, query, *args, **kwargs)

    if default is not sdpa_attention_forward:  # someone else's attention: leave it be
        yield
        return
    AttentionInterface.register("sdpa", attend)
    try:
        yield
    finally:
        AttentionInterface.register("sdpa", default)


def train(trainer) -> dict:
    """Run ``trainer`` and return the training summary for the manifest."""
    workdir = Path(trainer.args.output_dir)
    resume = last_saved_step(workdir) if trainer.args.save_strategy != "no" else None
    if trainer.args.save_strategy != "no":
        trainer.add_callback(_mark_saved_callback())
    if resume is not None:
        log.info("resuming from %s", resume)
    if progress.current() is not None:  # under the CLI: the stage's bar, not the trainer's
        trainer.add_callback(progress.trainer_callback())
    t0 = time.perf_counter()
    with logprob_tiles_fit_vocab(trainer.model), short_sequences_attend_in_math():
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "train.first_loss": losses[0] if losses else None,
        "train.last_loss": losses[-1] if len(losses) > 1 else result.training_loss,
        "train.final_avg_loss": result.training_loss,
        "train.steps": result.global_step,
        "train.wall_s": round(wall, 2),
        "train.world_size": trainer.args.world_size,
        "train.trainable_params": sum(
            p.numel() for p in trainer.model.parameters() if p.requires_grad
        ),
    }
    logged = [h for h in trainer.state.log_history if "loss" in h]
    for key in ("reward", "kl"):  # RL trainers: how the reward and the KL moved
        values = [h[key] for h in logged if isinstance(h.get(key), (int, float))]
        if values:
            metrics[f"train.first_{key}"], metrics[f"train.last_{key}"] = values[0], values[-1]
    last = logged[-1] if logged else {}
    for key, value in last.items():  # trainer-specific diagnostics, e.g. DPO's reward margins
        if key.startswith("rewards/") and isinstance(value, (int, float)):
            metrics[f"train.{key.replace('/', '_')}"] = value
    if resume is not None:
        metrics["train.resumed_from_step"] = int(resume.name.split("-")[-1])
    return metrics


def _timeless(log_history: list[dict]) -> list[dict]:
    """The log without wall-clock fields, so the same seed writes the same bytes (the time is in
    the manifest's metrics)."""
    drop = ("runtime", "per_second")
    return [{k: v for k, v in h.items() if not any(d in k for d in drop)} for h in log_history]


def save_trained(
    trainer,
    tokenizer,
    out: Path,
    *,
    stage: str,
    settings: StageSettings,
    parents: list[Checkpoint],
    metrics: dict,
    format: str = "hf",
    merge_lora: bool = False,
    extra_files: dict[str, str] | None = None,
    save_model=None,
    save_base: bool = False,
) -> Checkpoint | None:
    """Write the trained model as a checkpoint; rank 0 writes, every rank must call this.
    ``save_model(model, directory)`` writes the weights where ``save_pretrained`` would not do
    (a bottleneck adapter's own weights only). ``save_base`` also writes an adapter's trained
    base model under ``base/`` (P-tuning with the model tuned too).

    Full models are gathered through accelerate first, so FSDP / DeepSpeed ZeRO-3 runs (which
    shard the weights) write whole checkpoints.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    is_peft = hasattr(model, "peft_config")
    state_dict = None if is_peft else trainer.accelerator.get_state_dict(trainer.model)
    if not trainer.is_world_process_zero():
        return None
    if is_peft and merge_lora:
        model = model.merge_and_unload()
    with staging(out) as st:
        if save_model is not None:
            save_model(model, st.dir)
        else:
            model.save_pretrained(st.dir, state_dict=state_dict)
        if save_base:
            model.get_base_model().save_pretrained(st.dir / TUNED_BASE)
            tokenizer.save_pretrained(st.dir / TUNED_BASE)
        tokenizer.save_pretrained(st.dir)
        (st.dir / TRAIN_LOG).write_text(json.dumps(_timeless(trainer.state.log_history)) + "\n")
        for name, text in (extra_files or {}).items():
            (st.dir / name).write_text(text)
        ckpt = st.commit(
            stage=stage,
            format=format,
            settings=settings,
            parents=parents,
            seed=settings.seed,
            metrics=metrics,
        )
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)  # scratch and saved steps
    return ckpt
