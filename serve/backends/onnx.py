"""The onnxruntime-genai backend: ``onnx`` checkpoints (polm's ONNX export), on CPU, an edge
device or CUDA. It imports neither torch nor transformers.

Each request runs its own ``og.Generator`` on a pool of worker threads: onnxruntime releases
the GIL inside every decoding step, so concurrent requests decode in parallel rather than one
after another, each with its own sampling settings and seed. (onnxruntime-genai's batched
generator takes one set of search options for the whole batch, and its continuous-batching
``Engine`` is experimental in 0.18.)
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from serve.backends import Job, TokenBackend


class OnnxBackend(TokenBackend):
    name = "onnx"

    def __init__(self, path, max_batch: int = 16, threads: int | None = None, device=None):
        import numpy as np
        import onnxruntime_genai as og

        from polm.onnxrt import OnnxLM

        self.np, self.og = np, og
        threads = threads or int(os.environ.get("POLM_ONNX_THREADS", 0) or 0) or None
        self.lm = OnnxLM(path, threads=threads)
        self.model, self.tokenizer = self.lm.model, self.lm.tokenizer
        cfg = json.loads((Path(path) / "genai_config.json").read_text())["model"]
        self.context_length = int(cfg.get("context_length") or 2048)
        self.eos = self.lm.eos
        self.pool = ThreadPoolExecutor(max_batch, thread_name_prefix="polm-onnx")

    def render_chat(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(self.np.array(ids, dtype=self.np.int32))

    def submit(self, job: Job) -> None:
        self.pool.submit(self._run, job)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, job: Job) -> None:
        try:
            self._decode(job)
        except Exception:
            import logging

            logging.getLogger("polm.serve").exception("generation failed")
            job.finish("error")

    def _decode(self, job: Job) -> None:
        og, p = self.og, job.params
        if job.cancelled.is_set():
            return
        params = og.GeneratorParams(self.model)
        options = {"max_length": len(job.prompt_ids) + p.max_tokens, "do_sample": p.temperature > 0}
        if p.temperature > 0:
            options.update(temperature=p.temperature, top_p=p.top_p, top_k=0)
            if p.seed is not None:
                options["random_seed"] = p.seed % 2**31
        params.set_search_options(**options)
        gen = og.Generator(self.model, params)
        gen.append_tokens(self.np.array(job.prompt_ids, dtype=self.np.int32))
        made = 0
        while not job.cancelled.is_set():
            gen.generate_next_token()
            tok = int(gen.get_next_tokens()[0])
            if tok in self.eos:
                job.finish("stop")
                return
            job.emit(tok)
            made += 1
            if made >= p.max_tokens or gen.is_done():
                job.finish("length")
                return
