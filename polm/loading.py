"""Opening every checkpoint format for evaluation and serving.

Loading is part of the checkpoint contract, so it lives in the spine: a stage that adds a
format adds its loader here, and evaluation and serving call :func:`load_model` without
importing the stage that wrote the checkpoint. Loads are safetensors-only and never run remote
code.
"""

from __future__ import annotations

from pathlib import Path

from polm.checkpoint import Checkpoint, check_safetensors
from polm.errors import PolmError


def saved_as_plain_tokenizer(path) -> bool:
    """Whether ``path`` holds a plain ``tokenizer.json`` (polm's own tokenizer), to be loaded
    exactly as saved: AutoTokenizer would pick the model type's class instead, and Qwen2's
    adds an ``<|endoftext|>`` the model has no row for. llama.cpp's converter reads it so too."""
    import json
    from pathlib import Path

    cfg = Path(path) / "tokenizer_config.json"
    cls = json.loads(cfg.read_text()).get("tokenizer_class") if cfg.is_file() else None
    return cls in ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if saved_as_plain_tokenizer(path):
            return PreTrainedTokenizerFast.from_pretrained(path)
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise PolmError(f"cannot load the tokenizer of {path}: {e}") from None


def _load_hf(path, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    check_safetensors(Path(path))  # a corrupt or truncated file is a clear error, not a crash
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=False, use_safetensors=True, dtype=dtype or torch.float32
        )
    except (OSError, ValueError) as e:
        raise PolmError(
            f"cannot load the model in {path} as a Hugging Face causal LM with "
            f"safetensors weights: {str(e).splitlines()[0]}"
        ) from None


def gptqmodel_env() -> None:
    """GPTQModel's CPU worker pool needs at least two workers, but its default is half the
    cores (one on a 2-core machine, where it then fails): set it unless the user did."""
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))


def _load_gptq(path, dtype=None):
    """A GPTQ checkpoint through transformers (which needs optimum and GPTQModel)."""
    import importlib.util

    missing = [m for m in ("optimum", "gptqmodel") if importlib.util.find_spec(m) is None]
    if missing:
        raise PolmError(
            f"{path} is a GPTQ checkpoint; loading it through transformers needs "
            f"{' and '.join(missing)} (pip install 'polm[gptq]')."
        )
    gptqmodel_env()
    model = _load_hf(path, dtype)
    for module in model.modules():
        # GPTQModel's torch kernels wrap their dequantization in torch.compile, which costs
        # seconds on every first call of each shape on CPU; eager is as fast for decoding here
        if getattr(module, "optimized", False) and "dequantize_weight" in vars(module):
            del module.dequantize_weight
    return model


def _adapter_base(ckpt: Checkpoint, dtype=None):
    """The base model an adapter checkpoint (``peft-adapter``, ``bottleneck-adapter``) was
    trained on: its first parent, unchanged since; or, where the base was trained with the
    adapter (P-tuning with ``tune_model``), the tuned base it carries under ``base/``."""
    if (ckpt.path / "base" / "config.json").is_file():
        return _load_hf(ckpt.path / "base", dtype)
    if not ckpt.manifest.parents:
        raise PolmError(f"{ckpt.path} is an adapter whose manifest names no base model.")
    base_ref = ckpt.manifest.parents[0]
    base = Checkpoint.open(base_ref.path)
    if base.manifest.content_hash != base_ref.content_hash:
        raise PolmError(
            f"the base model of adapter {ckpt.path} changed since the adapter was "
            f"trained ({base.path}); re-run the stage that made it."
        )
    model, _ = load_model(base, dtype)
    return model


def _load_peft_adapter(ckpt: Checkpoint, dtype=None):
    from peft import PeftModel

    return PeftModel.from_pretrained(_adapter_base(ckpt, dtype), ckpt.path, is_trainable=False)


# the formats load_model opens as a torch model
TORCH_FORMATS = ("hf", "peft-adapter", "bottleneck-adapter", "gptq", "onebit")


def load_model(ckpt: Checkpoint | str, dtype=None):
    """Return ``(model, tokenizer)`` for a checkpoint of any format polm knows."""
    if not isinstance(ckpt, Checkpoint):
        ckpt = Checkpoint.open(ckpt)
    if ckpt.format == "hf":
        model = _load_hf(ckpt.path, dtype)
    elif ckpt.format == "peft-adapter":
        model = _load_peft_adapter(ckpt, dtype)
    elif ckpt.format == "bottleneck-adapter":
        from polm import bottleneck

        model = bottleneck.load(_adapter_base(ckpt, dtype), ckpt.path)
    elif ckpt.format == "gptq":
        model = _load_gptq(ckpt.path, dtype)
    elif ckpt.format == "onebit":
        from polm.onebit import load_onebit

        model = load_onebit(ckpt.path, dtype)
    else:
        raise PolmError(
            f"{ckpt.path} has format {ckpt.format!r}, which polm does not load as a torch "
            f"model (it loads {', '.join(TORCH_FORMATS)}; onnx checkpoints run through "
            "polm.onnxrt, gguf ones through polm.llamacpp)."
        )
    model.eval()
    return model, load_tokenizer(ckpt.path)


def is_reward_model(ckpt: Checkpoint) -> bool:
    """A checkpoint with a sequence-classification head (``align.reward``'s output)."""
    import json

    cfg = ckpt.path / "config.json"
    if ckpt.format != "hf" or not cfg.is_file():
        return False
    archs = json.loads(cfg.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load_reward_model(ckpt: Checkpoint | str):
    """Return ``(model, tokenizer)`` for a reward model (one score per sequence)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    if not isinstance(ckpt, Checkpoint):
        ckpt = Checkpoint.open(ckpt)
    if not is_reward_model(ckpt):
        raise PolmError(
            f"{ckpt.path} is not a reward model: expected an hf checkpoint with a "
            f"sequence-classification head (made by align.reward), got {ckpt.stage} "
            f"[{ckpt.format}]."
        )
    check_safetensors(ckpt.path)
    model = AutoModelForSequenceClassification.from_pretrained(
        ckpt.path, trust_remote_code=False, use_safetensors=True, dtype=torch.float32
    )
    model.eval()
    return model, load_tokenizer(ckpt.path)
