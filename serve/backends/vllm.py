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

from serve.backends.base import Backend, GenParams, Piece


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

    def render_chat(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    async def generate(self, prompt_ids: list[int], params: GenParams) -> AsyncIterator[Piece]:
        from vllm import SamplingParams

        sampling = SamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            stop=params.stop or None,
        )
        rid = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        async def run():  # on the engine's loop
            try:
                async for out in self.engine.generate(
                    {"prompt_token_ids": prompt_ids}, sampling, rid
                ):
                    loop.call_soon_threadsafe(queue.put_nowait, out.outputs[0])
            except BaseException as e:  # noqa: BLE001 - handed to the caller's loop
                loop.call_soon_threadsafe(queue.put_nowait, e)
            loop.call_soon_threadsafe(queue.put_nowait, None)

        task = asyncio.run_coroutine_threadsafe(run(), self.loop)
        sent = 0
        try:
            while (out := await queue.get()) is not None:
                if isinstance(out, BaseException):
                    raise RuntimeError("vLLM failed while generating") from out
                text = out.text[sent:]
                sent = len(out.text)
                if out.finish_reason is not None:
                    reason = "length" if out.finish_reason == "length" else "stop"
                    yield Piece(text, reason, len(out.token_ids))
                elif text:
                    yield Piece(text)
        finally:
            if not task.done():
                asyncio.run_coroutine_threadsafe(self.engine.abort(rid), self.loop)

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            self.loop.call_soon_threadsafe(shutdown)
        self.loop.call_soon_threadsafe(self.loop.stop)
