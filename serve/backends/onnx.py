"""The onnxruntime-genai backend: ``onnx`` checkpoints (polm's ONNX export), on CPU, an edge
device or CUDA. It imports neither torch nor transformers.

On CPU, concurrent requests decode together in one batch per step (continuous batching,
serve/backends/onnx_batch.py: the export's graph stepped by onnxruntime directly, each row
with its own sampling settings and seed; ``POLM_ONNX_BATCH=0`` turns it off). The others (the
prompt's log-probs, a LoRA adapter, a prompt and answer longer than a sliding window, a CUDA
export) each run their own ``og.Generator`` on a pool of ``workers`` threads (default: one per
core), which onnxruntime-genai's batching cannot replace: its batched generator takes no new
rows mid-flight, and its ``Engine`` batches on CPU only statically and without per-request seeds.
Each generator's step gets ``threads`` intra-op threads (default: cores / workers).
On an export with LoRA slots, LoRA adapters are served by name: each request's generator runs
with its own adapter active (``og.Adapters``; see optimize/onnx.py).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from serve.backends.base import Job, TokenBackend, prompt_logprobs


class OnnxBackend(TokenBackend):
    name = "onnx"

    def __init__(self, path, workers: int | None = None, threads: int | None = None, device=None):
        import numpy as np
        import onnxruntime_genai as og

        from polm.onnxrt import OnnxLM

        self.np, self.og = np, og
        cores = os.cpu_count() or 1
        workers = workers or int(os.environ.get("POLM_ONNX_WORKERS", 0) or 0) or cores
        threads = threads or int(os.environ.get("POLM_ONNX_THREADS", 0) or 0)
        self.path = Path(path)
        batching = os.environ.get("POLM_ONNX_BATCH", "1") != "0"
        if batching:
            from serve.backends.onnx_batch import BatchDecoder, supported

            batching = supported(self.path)
        # With batching, onnxruntime-genai's own copy of the weights loads only when a request
        # needs it (the prompt's log-probs, an adapter, past a sliding window): a second copy
        # in memory otherwise (Gemma 3 270M int4, the server's peak RSS under 16 clients: 1746
        # MB with both copies, 1397 MB without; bench/serve.py)
        self.lm = OnnxLM(path, threads=threads or max(1, cores // workers), lazy=batching)
        self.tokenizer = self.lm.tokenizer
        self.context_length = self.lm.context_length
        self.vocab_size = self.lm.vocab_size
        self.chat_template = _template(self.path)
        self.bos_text, self.eos_text = _special_tokens(self.path)  # read once, not per request
        self.eos = self.lm.eos
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="polm-onnx")
        self.batch = None  # continuous batching (serve/backends/onnx_batch.py), where it runs
        if batching:
            self.batch = BatchDecoder(self, threads=int(threads or 0) or cores)
        self.adapters = None  # og.Adapters, once LoRA adapters are served by name
        self._adapter_dir = None

    def add_adapters(self, adapters: dict) -> None:
        """LoRA adapters by name on an export with LoRA slots: each ``peft-adapter`` becomes an
        ``.onnx_adapter`` (a temporary directory, removed at close) that onnxruntime-genai
        loads once; a request's generator runs with its adapter active (the base: none)."""
        import tempfile

        from polm.onnxrt import write_onnx_adapter

        self._adapter_dir = tempfile.TemporaryDirectory(prefix="polm-onnx-adapters-")
        self.adapters = self.og.Adapters(self.lm.model)
        for i, (name, path) in enumerate(adapters.items()):
            file = Path(self._adapter_dir.name) / f"{i}.onnx_adapter"
            write_onnx_adapter(Path(path), self.path, file)
            self.adapters.load(str(file), name)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        if self.chat_template is None:  # onnxruntime-genai's own template for the model type
            return self.tokenizer.apply_chat_template(
                json.dumps(messages), tools=json.dumps(tools) if tools else None
            )
        from polm.tokenizer import render_template

        return render_template(self.chat_template, messages, tools, self.bos_text, self.eos_text)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(self.np.array(ids, dtype=self.np.int32))

    def submit(self, job: Job) -> None:
        if self.batch is not None and self.batch.takes(job):
            self.batch.submit(job)
        else:
            self.pool.submit(self._run, job)

    def _guide_tokenizer(self):
        from llguidance import LLTokenizer

        text = (self.path / "tokenizer.json").read_text()
        return LLTokenizer(text, n_vocab=self.vocab_size or None, eos_token=sorted(self.eos))

    def close(self) -> None:
        if self.batch is not None:
            self.batch.close()
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self._adapter_dir is not None:
            self._adapter_dir.cleanup()

    def _decode(self, job: Job) -> None:
        og, np, p = self.og, self.np, job.params
        if job.cancelled.is_set():
            return
        params = og.GeneratorParams(self.lm.model)
        # polm samples from the logits itself: onnxruntime-genai's sampler sorts the whole
        # vocabulary at every step (50 ms a token for Gemma's 262k, 3x the forward pass), and
        # this way every backend samples alike (serve.backends.base.Sampler)
        max_length = self.lm.max_length(len(job.prompt_ids), max(p.max_tokens, 1))
        params.set_search_options(max_length=max_length, do_sample=False)
        gen = og.Generator(self.lm.model, params)
        if p.adapter is not None:
            gen.set_active_adapter(self.adapters, p.adapter)
        if p.prompt_logprobs is not None:
            # the logits after every prompt prefix: the prompt goes in one token at a time
            # (the generator hands out the last position's logits only)
            rows = []
            for tok in job.prompt_ids:
                gen.append_tokens(np.array([tok], dtype=np.int32))
                rows.append(np.array(gen.get_logits())[0, -1])
            job.emit_prompt(prompt_logprobs(rows, job.prompt_ids, p.prompt_logprobs))
        else:
            gen.append_tokens(np.array(job.prompt_ids, dtype=np.int32))
        sampler, made = self.sampler(p), 0
        while not job.cancelled.is_set():
            if made >= p.max_tokens or len(job.prompt_ids) + made >= max_length:
                job.finish("length")
                return
            tok, lp = sampler.pick(np.asarray(gen.get_logits())[0, -1])
            if tok in self.eos:
                job.finish("stop")
                return
            job.emit(tok, lp)
            made += 1
            gen.append_tokens(np.array([tok], dtype=np.int32))


def _template(path: Path) -> str | None:
    """The export's chat template (chat_template.jinja, else tokenizer_config.json's)."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = path / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def _special_tokens(path: Path) -> tuple[str, str]:
    """The export's bos and eos token texts (tokenizer_config.json), for its chat template."""
    config = path / "tokenizer_config.json"
    data = json.loads(config.read_text()) if config.is_file() else {}

    def text(key: str) -> str:
        value = data.get(key) or ""
        return value.get("content", "") if isinstance(value, dict) else str(value)

    return text("bos_token"), text("eos_token")
