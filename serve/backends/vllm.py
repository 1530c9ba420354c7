"""The vLLM backend: hf and GPTQ checkpoints on a GPU, with vLLM's continuous batching and
paged KV cache. Imported only when chosen (``pip install 'polm[vllm]'`` on a GPU machine).

vLLM's async engine belongs to the event loop it was created in, and polm's service loads the
model on a background thread. So the engine gets a loop of its own, on its own thread;
:meth:`generate` hands each request to that loop and receives the pieces back through a queue.
Stop strings, ``max_tokens``, seeds and detokenizing are vLLM's own.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator

from serve.backends.base import Backend, GenParams, Piece, TokenLogprob


class VllmBackend(Backend):
    name = "vllm"

    def __init__(self, ckpt, gpu_memory_utilization: float = 0.85, max_model_len=None, **_):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from polm.loading import load_tokenizer

        self.tokenizer = load_tokenizer(ckpt.path)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="polm-vllm", daemon=True).start()
        args = AsyncEngineArgs(
            model=str(ckpt.path),
            tokenizer=str(ckpt.path),
            trust_remote_code=False,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            quantization="gptq" if ckpt.format == "gptq" else None,
        )

        async def start():
            return AsyncLLMEngine.from_engine_args(args)

        self.engine = asyncio.run_coroutine_threadsafe(start(), self.loop).result()
        self.context_length = int(self.engine.model_config.max_model_len)
        self.vocab_size = int(self.engine.model_config.get_vocab_size())

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    async def generate(self, prompt_ids: list[int], params: GenParams) -> AsyncIterator[Piece]:
        from vllm import SamplingParams

        sampling = SamplingParams(
            max_tokens=max(params.max_tokens, 1),  # vLLM generates at least one token
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            stop=params.stop or None,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            logit_bias=params.logit_bias or None,
            logprobs=params.logprobs,
            prompt_logprobs=params.prompt_logprobs,
            ignore_eos=params.ignore_eos,
            min_tokens=params.min_tokens,
            **_structured(params),
        )
        rid = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        async def run():  # on the engine's loop
            try:
                async for out in self.engine.generate(
                    {"prompt_token_ids": prompt_ids}, sampling, rid
                ):
                    loop.call_soon_threadsafe(queue.put_nowait, out)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's loop
                loop.call_soon_threadsafe(queue.put_nowait, e)
            loop.call_soon_threadsafe(queue.put_nowait, None)

        task = asyncio.run_coroutine_threadsafe(run(), self.loop)
        sent, n_lp, first = 0, 0, True
        try:
            while (req := await queue.get()) is not None:
                if isinstance(req, BaseException):
                    raise RuntimeError("vLLM failed while generating") from req
                if first and params.prompt_logprobs is not None:
                    yield Piece(
                        "",
                        logprobs=_logprobs(
                            prompt_ids, req.prompt_logprobs, 0, params.prompt_logprobs
                        ),
                    )
                first = False
                if params.max_tokens == 0:  # what was asked for is the prompt's log-probs
                    yield Piece("", "length", 0)
                    return
                out = req.outputs[0]
                text = out.text[sent:]
                sent = len(out.text)
                lps = []
                if params.logprobs is not None and out.logprobs:
                    lps = _logprobs(out.token_ids, out.logprobs, n_lp, params.logprobs)
                    n_lp = len(out.token_ids)
                if out.finish_reason is not None:
                    reason = "length" if out.finish_reason == "length" else "stop"
                    yield Piece(text, reason, len(out.token_ids), lps)
                elif text or lps:
                    yield Piece(text, logprobs=lps)
        finally:
            if not task.done():
                asyncio.run_coroutine_threadsafe(self.engine.abort(rid), self.loop)

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            self.loop.call_soon_threadsafe(shutdown)
        self.loop.call_soon_threadsafe(self.loop.stop)


def _logprobs(token_ids, per_token, start: int, k: int) -> list[TokenLogprob | None]:
    """vLLM's log-probs (per position, a dict of token id -> ``Logprob`` holding the chosen
    token and the ``k`` most likely, ranked) from ``start`` on, as polm's ``TokenLogprob``."""
    out: list[TokenLogprob | None] = []
    for tok, d in zip(token_ids[start:], per_token[start:]):
        if d is None:
            out.append(None)
            continue
        top = sorted(
            (v.rank, t, v.logprob) for t, v in d.items() if v.rank is not None and v.rank <= k
        )
        chosen = d[tok].logprob if tok in d else float("-inf")
        out.append(TokenLogprob(tok, chosen, [(t, lp) for _, t, lp in top]))
    return out


def _structured(params: GenParams) -> dict:
    """A constraint as vLLM's structured outputs (its own grammar backends; Lark grammars as
    llguidance reads them go to vLLM's guidance backend)."""
    if params.constraint is None:
        return {}
    from vllm.sampling_params import StructuredOutputsParams

    kind, value = params.constraint
    if kind == "json_schema":
        return {"structured_outputs": StructuredOutputsParams(json=value)}
    return {"structured_outputs": StructuredOutputsParams(grammar=value)}
