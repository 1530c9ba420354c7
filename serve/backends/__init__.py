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

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from polm.errors import PolmError

BACKENDS = ("transformers", "onnx", "vllm")
VLLM_FORMATS = ("hf", "gptq")  # formats vLLM reads from a polm checkpoint directory


@dataclass
class GenParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Piece:
    """New text, and on the last piece the finish reason and the completion's token count."""

    text: str
    finish_reason: str | None = None  # "stop" | "length"
    completion_tokens: int = 0


class Backend:
    name: str = ""
    context_length: int = 0

    def render_chat(self, messages: list[dict]) -> str:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def generate(self, prompt_ids: list[int], params: GenParams) -> AsyncIterator[Piece]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Job:
    """One request handed to a backend's worker thread; tokens flow back to the event loop."""

    def __init__(self, prompt_ids: list[int], params: GenParams, loop):
        self.prompt_ids, self.params, self.loop = prompt_ids, params, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, token: int) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def finish(self, reason: str) -> None:
        """``reason``: "stop" (end of sequence), "length" or "error"."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, reason)


def deliver(items: list[tuple[Job, int | str]]) -> None:
    """Hand one decoding step's tokens (or finish reasons) to their requests: one wake-up of
    each event loop per step, not one per request."""
    by_loop: dict = {}
    for job, item in items:
        by_loop.setdefault(job.loop, []).append((job.queue, item))
    for loop, batch in by_loop.items():
        loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


class TextStream:
    """Incremental detokenization with stop strings.

    The text is decoded from all ids so far (tokenizers merge bytes across tokens), and text
    that could still become the start of a stop string is held back until it cannot.
    """

    def __init__(self, decode, stop: list[str]):
        self.decode, self.stop = decode, stop
        self.ids: list[int] = []
        self.sent = 0  # characters already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s)))
            if at != -1:
                self.stopped = True
                return self._take(text[:at])
        hold = max(
            (k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0
        )
        return self._take(text[: len(text) - hold])

    def flush(self) -> str:
        return "" if self.stopped else self._take(self.decode(self.ids).rstrip("\ufffd"))

    def _take(self, text: str) -> str:
        new = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return new


class TokenBackend(Backend):
    """A backend whose worker produces token ids; subclasses implement :meth:`submit`."""

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def submit(self, job: Job) -> None:
        raise NotImplementedError

    async def generate(self, prompt_ids: list[int], params: GenParams) -> AsyncIterator[Piece]:
        job = Job(prompt_ids, params, asyncio.get_running_loop())
        self.submit(job)
        stream = TextStream(self.decode, params.stop)
        n = 0
        try:
            while True:
                item = await job.queue.get()
                if isinstance(item, str):
                    if item == "error":
                        raise RuntimeError("the backend failed while generating")
                    yield Piece(stream.flush(), item, n)
                    return
                n += 1
                text = stream.push(item)
                if stream.stopped:
                    yield Piece(text, "stop", n)
                    return
                if text:
                    yield Piece(text)
        finally:
            job.cancelled.set()  # a finished, stopped or disconnected request frees its slot


def choose_backend(fmt: str, requested: str | None = None) -> str:
    """The engine for a checkpoint format: the requested one if it can serve it, else the best
    one available on this machine."""
    if requested not in (None, "", "auto") and requested not in BACKENDS:
        raise PolmError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}.")
    if fmt == "onnx":
        if requested not in (None, "", "auto", "onnx"):
            raise PolmError(
                f"an onnx checkpoint runs on the onnx backend (onnxruntime-genai), not "
                f"{requested!r}."
            )
        return "onnx"
    if requested == "onnx":
        raise PolmError(
            f"the onnx backend serves onnx checkpoints; this one has format {fmt!r}. Export it "
            "first: polm optimize onnx --from CKPT --out DIR."
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
    if name == "onnx":
        from serve.backends.onnx import OnnxBackend

        return OnnxBackend(ckpt.path, **options)
    if name == "vllm":
        from serve.backends.vllm import VllmBackend

        return VllmBackend(ckpt, **options)
    from serve.backends.transformers import TransformersBackend

    return TransformersBackend(ckpt, **options)
