"""Which engine serves a checkpoint, and opening it there: ``onnx`` -> onnxruntime-genai;
``gguf`` -> llama.cpp; any torch format -> vLLM on a GPU where vLLM is installed and reads the
format, else transformers, unless the caller names one. Engines are imported only when
chosen."""

from __future__ import annotations

from polm.errors import PolmError
from serve.backends.base import Backend

BACKENDS = ("transformers", "onnx", "vllm", "llamacpp")
# the formats that run on one engine only, and how to get there from a torch checkpoint
ENGINE_FORMATS = {
    "onnx": ("onnx", "onnxruntime-genai", "polm optimize onnx --from CKPT --out DIR"),
    "gguf": ("llamacpp", "llama.cpp", "polm optimize gguf --from CKPT --out DIR"),
}
VLLM_FORMATS = ("hf", "gptq")  # formats vLLM reads from a polm checkpoint directory


def choose_backend(fmt: str, requested: str | None = None) -> str:
    """The engine for a checkpoint format: the requested one if it can serve it, else the best
    one available on this machine."""
    if requested not in (None, "", "auto") and requested not in BACKENDS:
        raise PolmError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}.")
    if fmt in ENGINE_FORMATS:
        backend, engine, _ = ENGINE_FORMATS[fmt]
        if requested not in (None, "", "auto", backend):
            raise PolmError(
                f"a {fmt} checkpoint runs on the {backend} backend ({engine}), not {requested!r}."
            )
        return backend
    for other, (backend, _, export) in ENGINE_FORMATS.items():
        if requested == backend:
            raise PolmError(
                f"the {backend} backend serves {other} checkpoints; this one has format {fmt!r}. "
                f"Export it first: {export}."
            )
    if requested == "vllm":
        if fmt not in VLLM_FORMATS:
            raise PolmError(
                f"vLLM does not read polm's {fmt!r} format; serve it with the transformers "
                "backend (or merge/dequantize it to hf first)."
            )
        return "vllm"
    if requested == "transformers":
        return "transformers"
    if fmt in VLLM_FORMATS and _vllm_usable():
        return "vllm"
    return "transformers"


def _vllm_usable() -> bool:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def open_backend(ckpt, requested: str | None = None, **options) -> Backend:
    """Load ``ckpt`` (a :class:`polm.checkpoint.Checkpoint`) on the chosen engine."""
    name = choose_backend(ckpt.format, requested)
    if options.get("draft") is not None and name != "transformers":
        why = {
            "onnx": "onnxruntime-genai 0.18 has no draft-model speculative decoding (its "
            "MtpGenerator runs a model's own multi-token-prediction heads)",
            "llamacpp": "polm's llama.cpp backend runs llama-cpp-python, whose draft models are "
            "prompt-lookup only",
            "vllm": "polm does not pass a draft to vLLM yet",
        }[name]
        raise PolmError(
            f"a draft model runs on the transformers backend; {ckpt.path} is served on the "
            f"{name} backend, and {why}. Serve it with --backend transformers."
        )
    if name == "onnx":
        from serve.backends.onnx import OnnxBackend

        return OnnxBackend(ckpt.path, **options)
    if name == "llamacpp":
        from serve.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(ckpt.path, **options)
    if name == "vllm":
        from serve.backends.vllm import VllmBackend

        return VllmBackend(ckpt, **options)
    from serve.backends.transformers import TransformersBackend

    return TransformersBackend(ckpt, **options)
