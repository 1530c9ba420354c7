"""What every engine shares: generation parameters, the streamed :class:`Piece`, and
:class:`TokenBackend`, which turns a worker thread's token ids into text once for the
transformers and onnxruntime-genai engines (detokenizing, stop strings, finish reason)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


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

    def _decode(self, job: Job) -> None:
        """Generate ``job`` on the worker thread: ``job.emit`` each token, then ``job.finish``."""
        raise NotImplementedError

    def _run(self, job: Job) -> None:
        """A worker's task: :meth:`_decode`, with a failure logged and ended as an error."""
        try:
            self._decode(job)
        except Exception:
            import logging

            logging.getLogger("polm.serve").exception("generation failed")
            job.finish("error")

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
