"""One small interface over the engines that generate: transformers, onnxruntime-genai, vLLM.

A backend renders chats with the checkpoint's own template, counts tokens and streams
:class:`Piece` s for a prompt. The transformers and onnxruntime-genai backends produce token
ids from a worker thread (:class:`TokenBackend`); detokenizing, stop strings and the finish
reason are handled once, here, for both. vLLM does all of that itself.

:func:`open_backend` picks the engine from the checkpoint's manifest format and the hardware
(``onnx`` -> onnxruntime-genai; any torch format -> vLLM on a GPU where vLLM is installed and
reads the format, else transformers), unless the caller names one. Engines are imported only
when chosen, so the transformers backend never imports vLLM and the onnx one never imports
torch.
"""

from serve.backends.base import (
    Backend,
    GenParams,
    Job,
    Piece,
    Sampler,
    TextStream,
    TokenBackend,
    TokenLogprob,
    deliver,
)
from serve.backends.choose import BACKENDS, VLLM_FORMATS, choose_backend, open_backend

__all__ = [
    "BACKENDS",
    "VLLM_FORMATS",
    "Backend",
    "GenParams",
    "Job",
    "Piece",
    "Sampler",
    "TextStream",
    "TokenBackend",
    "TokenLogprob",
    "choose_backend",
    "deliver",
    "open_backend",
]
