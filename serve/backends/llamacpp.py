"""The llama.cpp backend: ``gguf`` checkpoints (``optimize.gguf``), on llama-cpp-python.

One llama.cpp context serves the requests one at a time on a worker thread (a llama.cpp
context holds one sequence here; llama-cpp-python is not thread-safe), keeping the KV cache of
the longest prompt prefix the next request shares with the last one (a chat's earlier turns,
a system prompt). llama.cpp releases the GIL inside every decoding step. polm samples from the
logits itself, as the onnx backend does, so that every backend samples alike (temperature,
top_p, a seeded generator per request) and greedy answers equal ``polm eval``'s.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

from serve.backends.base import Job, TokenBackend, prompt_logprobs


class LlamaCppBackend(TokenBackend):
    name = "llamacpp"

    def __init__(self, path, threads: int | None = None, n_ctx: int | None = None, device=None):
        import numpy as np

        from polm.llamacpp import GgufLM

        self.np = np
        threads = threads or int(os.environ.get("POLM_LLAMACPP_THREADS", 0) or 0) or None
        n_ctx = n_ctx or int(os.environ.get("POLM_LLAMACPP_CTX", 0) or 0) or 4096
        self.lm = GgufLM(path, threads=threads or os.cpu_count(), n_ctx=n_ctx)
        self.llm = self.lm.llm
        self.context_length = self.llm.n_ctx()
        self.n_vocab = self.vocab_size = self.llm.n_vocab()
        self.chat_template = self.lm.template
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="polm-llamacpp")

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        return self.lm.render(messages, tools)

    def encode(self, text: str) -> list[int]:
        return self.lm.tokenize(text)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", "replace")

    def submit(self, job: Job) -> None:
        self.pool.submit(self._run, job)

    @functools.cached_property
    def eos(self) -> frozenset[int]:
        """llama.cpp's end-of-generation tokens (eos, eot, ...), found once when first asked."""
        return frozenset(t for t in range(self.n_vocab) if self.lm.is_end(t))

    def _guide_tokenizer(self):
        import warnings

        from llguidance.llamacpp import lltokenizer_from_vocab

        ends = sorted(self.eos)
        vocab = self.llm._model.vocab  # noqa: SLF001
        with warnings.catch_warnings():  # llguidance calls a deprecated alias once per token
            warnings.simplefilter("ignore", DeprecationWarning)
            return lltokenizer_from_vocab(vocab, n_vocab=self.n_vocab, eos_token=ends)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.llm.close()

    def _feed(self, tokens: list[int]):
        """Evaluate ``tokens`` after what the context already holds; the last logits."""
        self.llm.eval(tokens)
        return self.np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))  # noqa: SLF001

    def _decode(self, job: Job) -> None:
        p, llm = job.params, self.llm
        if job.cancelled.is_set():
            return
        prompt = job.prompt_ids
        if p.prompt_logprobs is not None:
            # the logits after every prompt prefix: the prompt goes in one token at a time
            llm.n_tokens = 0
            rows = [self._feed([tok]).copy() for tok in prompt]
            job.emit_prompt(prompt_logprobs(rows, prompt, p.prompt_logprobs))
            logits = rows[-1]
        else:
            # keep the KV cache of the prefix this prompt shares with the context (at least
            # the last prompt token is evaluated again, for its logits)
            held = llm.input_ids[: llm.n_tokens].tolist()
            keep = 0
            while keep < min(len(held), len(prompt) - 1) and held[keep] == prompt[keep]:
                keep += 1
            llm.n_tokens = keep
            logits = self._feed(prompt[keep:])
        sampler, made = self.sampler(p), 0
        while not job.cancelled.is_set():
            if made >= p.max_tokens or len(prompt) + made >= self.context_length:
                job.finish("length")
                return
            tok, lp = sampler.pick(logits)
            if self.lm.is_end(tok):
                job.finish("stop")
                return
            job.emit(tok, lp)
            made += 1
            logits = self._feed([tok])
