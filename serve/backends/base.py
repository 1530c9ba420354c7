"""What every engine shares: generation parameters, the streamed :class:`Piece`,
:class:`Sampler` (one request's choice of the next token from the model's logits) and
:class:`TokenBackend`, which turns a worker thread's token ids into text once for the
transformers, onnxruntime-genai and llama.cpp engines (detokenizing, stop strings, log-probs,
finish reason)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class GenParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token (echo)
    # decoding held to a grammar: ("json_schema", schema) or ("lark", llguidance Lark text)
    constraint: tuple | None = None
    adapter: str | None = None  # a LoRA adapter served by name, None for the base
    ignore_eos: bool = False  # the end-of-sequence tokens are never drawn
    min_tokens: int = 0  # ... nor before this many tokens

    def plain_greedy(self) -> bool:
        """Greedy with nothing to adjust or report: an argmax over the raw logits is enough."""
        return (
            self.temperature == 0
            and not self.ignore_eos
            and not self.min_tokens
            and not self.logit_bias
            and not self.presence_penalty
            and not self.frequency_penalty
            and self.logprobs is None
            and self.constraint is None
        )


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (its raw distribution, before penalties,
    biases and temperature, as vLLM reports by default) and the ``top`` most likely tokens."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Piece:
    """New text, the log-probs of the tokens it came from (when asked for), and on the last
    piece the finish reason and the completion's token count."""

    text: str
    finish_reason: str | None = None  # "stop" | "length"
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Sampler:
    """One request's next token from the model's logits (a numpy vector): the logit bias, the
    presence and frequency penalties over the tokens generated so far (OpenAI's definitions),
    the end-of-sequence tokens (``eos``) masked with ``ignore_eos`` or before ``min_tokens``
    (as llama.cpp and vLLM do), then the structured-output mask (``matcher``:
    :class:`serve.grammar.Matcher`), then greedy at temperature 0, else nucleus sampling with
    the request's own seeded generator; and, when asked for, the chosen token's log-prob and
    the most likely alternatives. Every token backend samples through it, so that all of them
    sample alike."""

    def __init__(self, params: GenParams, matcher=None, eos=()):
        import numpy as np

        self.np, self.p, self.matcher = np, params, matcher
        self.eos = sorted(eos)
        self.rng = np.random.default_rng(params.seed)
        self.counts: Counter[int] = Counter()

    def pick(self, logits) -> tuple[int, TokenLogprob | None]:
        np, p = self.np, self.p
        raw = np.asarray(logits, dtype=np.float32)
        z = raw
        no_eos = self.eos and (p.ignore_eos or self.counts.total() < p.min_tokens)
        if (
            no_eos
            or p.logit_bias
            or self.matcher is not None
            or (self.counts and (p.presence_penalty or p.frequency_penalty))
        ):
            z = raw.astype(np.float64)  # a copy: the engine's buffer stays as it was
        if no_eos:
            z[self.eos] = -np.inf
        if p.logit_bias:
            ids = list(p.logit_bias)
            z[ids] += np.fromiter(p.logit_bias.values(), np.float64, len(ids))
        if self.counts and (p.presence_penalty or p.frequency_penalty):
            ids = list(self.counts)
            seen = np.fromiter(self.counts.values(), np.float64, len(ids))
            z[ids] -= p.frequency_penalty * seen + p.presence_penalty
        if self.matcher is not None:
            self.matcher.mask(z)
        if p.temperature == 0:
            tok = int(np.argmax(z))
        else:
            tok = self._sample(z)
        self.counts[tok] += 1
        if self.matcher is not None:
            self.matcher.take(tok)
        lp = None if p.logprobs is None else token_logprob(raw, tok, p.logprobs)
        return tok, lp

    def _sample(self, z) -> int:
        """Nucleus sampling at the request's temperature, with the request's generator."""
        np, p = self.np, self.p
        w = np.subtract(z, z.max(), dtype=np.float64)
        w *= 1.0 / p.temperature
        np.exp(w, out=w)
        if p.top_p < 1.0:
            w /= w.sum()
            order = np.argsort(-w, kind="stable")
            ranked = w[order]
            ranked[np.cumsum(ranked) - ranked >= p.top_p] = 0  # keep the smallest nucleus
            w = np.zeros_like(w)
            w[order] = ranked
        return draw(w, self.rng.random())


BLOCK = 1024


def draw(w, u: float) -> int:
    """The index where ``u`` (in [0, 1)) falls in the cumulative sum of the weights ``w``: the
    first ``i`` with ``cumsum(w)[i] >= u * sum(w)``. A whole-vocabulary cumsum is a serial pass
    (0.8 ms for Gemma 3's 262k tokens, a fifth of a 16-row batch's step, bench/serve.py), so
    the sum goes by blocks: the block it falls in first, then the token within that block."""
    import numpy as np

    n = len(w)
    if n <= 4 * BLOCK:
        cdf = np.cumsum(w)
        return min(int(np.searchsorted(cdf, u * cdf[-1])), n - 1)
    starts = np.arange(0, n, BLOCK)
    sums = np.cumsum(np.add.reduceat(w, starts))
    target = u * sums[-1]
    k = min(int(np.searchsorted(sums, target)), len(starts) - 1)
    rest = target - (sums[k - 1] if k else 0.0)
    cdf = np.cumsum(w[starts[k] : starts[k] + BLOCK])
    return int(starts[k]) + min(int(np.searchsorted(cdf, rest)), len(cdf) - 1)


def log_softmax(logits):
    import numpy as np

    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def token_logprob(logits, token: int, top: int) -> TokenLogprob:
    """``token``'s log-prob under ``logits`` and the ``top`` most likely tokens, best first."""
    import numpy as np

    lp = log_softmax(logits)
    best: list[tuple[int, float]] = []
    if top:
        idx = np.argpartition(-lp, top - 1)[:top]
        idx = idx[np.argsort(-lp[idx], kind="stable")]
        best = [(int(i), float(lp[i])) for i in idx]
    return TokenLogprob(token, float(lp[token]), best)


def prompt_logprobs(logits, ids: list[int], top: int) -> list[TokenLogprob | None]:
    """Each prompt token's log-prob given the tokens before it, from the logits after each
    prefix (``logits[i]`` follows ``ids[: i + 1]``); the first token has none (OpenAI's
    ``null``)."""
    out: list[TokenLogprob | None] = [None]
    for i in range(1, len(ids)):
        out.append(token_logprob(logits[i - 1], ids[i], top))
    return out


class Backend:
    name: str = ""
    context_length: int = 0
    vocab_size: int = 0  # the logits' length: token ids in requests are checked against it
    chat_template: str | None = None  # the Jinja template render_chat uses

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def generate(self, prompt_ids: list[int], params: GenParams) -> AsyncIterator[Piece]:
        raise NotImplementedError

    def add_adapters(self, adapters: dict) -> None:
        """Serve these LoRA adapters (name -> directory) beside the base, picked per request."""
        from polm.errors import PolmError

        raise PolmError(f"the {self.name} backend serves no adapters by name (transformers does)")

    def close(self) -> None:
        pass


class Job:
    """One request handed to a backend's worker thread; tokens flow back to the event loop."""

    def __init__(self, prompt_ids: list[int], params: GenParams, loop):
        self.prompt_ids, self.params, self.loop = prompt_ids, params, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, token: int, logprob: TokenLogprob | None = None) -> None:
        item = token if logprob is None else logprob
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def emit_prompt(self, logprobs: list[TokenLogprob | None]) -> None:
        """The prompt tokens' log-probs (``prompt_logprobs``), before any generated token."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ("prompt", logprobs))

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

    _guide = None
    eos: frozenset[int] | set[int] = frozenset()  # the end-of-sequence token ids

    def sampler(self, params: GenParams) -> Sampler:
        """A request's :class:`Sampler`, with its structured-output matcher if it asks for one."""
        eos = self.eos if params.ignore_eos or params.min_tokens else ()
        if params.constraint is None:
            return Sampler(params, eos=eos)
        if self._guide is None:
            from serve.grammar import Guide

            self._guide = Guide(self._guide_tokenizer)
        return Sampler(params, self._guide.matcher(params.constraint), eos=eos)

    def _guide_tokenizer(self):
        """This backend's tokenizer as llguidance's ``LLTokenizer`` (structured outputs)."""
        raise NotImplementedError

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
        """Pieces of text as the worker's tokens arrive. With ``prompt_logprobs`` the first
        piece is empty text carrying the prompt's log-probs (``None`` for its first token)."""
        job = Job(prompt_ids, params, asyncio.get_running_loop())
        self.submit(job)
        stream = TextStream(self.decode, params.stop)
        n, pending = 0, []  # log-probs of tokens whose text has not been handed out yet
        try:
            while True:
                item = await job.queue.get()
                if isinstance(item, tuple):  # ("prompt", log-probs)
                    yield Piece("", logprobs=item[1])
                    continue
                if isinstance(item, str):
                    if item == "error":
                        raise RuntimeError("the backend failed while generating")
                    yield Piece(stream.flush(), item, n, pending)
                    return
                if isinstance(item, TokenLogprob):
                    pending.append(item)
                    item = item.token
                n += 1
                text = stream.push(item)
                if stream.stopped:
                    yield Piece(text, "stop", n, pending)
                    return
                if text:
                    yield Piece(text, logprobs=pending)
                    pending = []
        finally:
            job.cancelled.set()  # a finished, stopped or disconnected request frees its slot
