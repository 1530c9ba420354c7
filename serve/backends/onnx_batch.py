"""Continuous batching for the ONNX backend: concurrent requests decode together, one forward
pass of the export's decoder graph per step for every running request, run by onnxruntime
directly.

Why not onnxruntime-genai's own batching: on CPU, 0.18's ``Engine`` batches only statically (4
rows), refuses per-request seeds ("requires an Engine configured for dynamic batching", which
needs a paged-KV model the CPU export is not), samples inside (no logits: no log-probs,
penalties, ``logit_bias`` or polm's structured outputs), and fails on Gemma 3's sliding-window
layers as soon as two prompts differ in length; its batched ``Generator`` takes no rows
mid-flight. So polm steps the graph itself, as the builder wrote it:

- a request joins between two steps: its prompt runs alone (batch 1, no padding, which the
  sliding-window kernel requires), and its key/value cache joins the batch's;
- the batch's cache is right-padded: each row's ``attention_mask`` counts its own tokens, and
  ``GroupQueryAttention`` reads each row's length from it, so rows of any length decode in one
  pass (sliding-window layers keep their fixed window-sized cache);
- each row samples with its own :class:`~serve.backends.base.Sampler` (settings, seed,
  structured output), so an answer does not depend on what it was batched with;
- a finished or cancelled request leaves between two steps.

Greedy answers equal one-at-a-time answers (``tests/serve/test_onnx_batching.py``). Requests
that need the prompt's log-probs or a LoRA adapter run on their own onnxruntime-genai generator
(see :class:`serve.backends.onnx.OnnxBackend`).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from pathlib import Path

from serve.backends.base import Job, deliver

log = logging.getLogger("polm.serve")
NUMPY = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32",
         "tensor(float16)": "float16"}  # fmt: skip


class Row:
    """One running request: its job, sampler, tokens so far and limits."""

    def __init__(self, job: Job, sampler, length: int, max_length: int):
        self.job, self.sampler = job, sampler
        self.length = length  # tokens in the cache
        self.max_length = max_length
        self.made = 0
        self.next = -1  # the token the next step feeds


def supported(path: Path) -> bool:
    """Whether the export runs on onnxruntime's CPU provider (what this decoder uses)."""
    config = json.loads((Path(path) / "genai_config.json").read_text())["model"]["decoder"]
    return not (config.get("session_options") or {}).get("provider_options")


class BatchDecoder:
    """Decode every submitted job in one batch per step, on its own thread."""

    def __init__(self, backend, threads: int, max_rows: int = 32):
        import numpy as np
        import onnxruntime as ort

        self.np, self.backend, self.max_rows = np, backend, max_rows
        path = Path(backend.path)
        config = json.loads((path / "genai_config.json").read_text())["model"]
        decoder = config["decoder"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # no arena: each step's cache outputs are freed to the allocator, not kept at their peak
        options.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(
            str(path / decoder.get("filename", "model.onnx")),
            options,
            providers=["CPUExecutionProvider"],
        )
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.id_type = np.dtype(NUMPY[inputs["input_ids"].type])
        self.mask_type = np.dtype(NUMPY[inputs["attention_mask"].type])
        layers = decoder["num_hidden_layers"]
        self.past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        self.present = [n.replace("past_key_values.", "present.") for n in self.past]
        self.cache_type = np.dtype(NUMPY[inputs[self.past[0]].type])
        self.kv_heads, self.head_size = decoder["num_key_value_heads"], decoder["head_size"]
        window = decoder.get("sliding_window") or {}
        # layers whose cache is a fixed window (onnxruntime's sliding_window_cache)
        self.windowed = {2 * i + k for i in window.get("layers", []) for k in (0, 1)}
        self.window = int(window.get("window_size") or 0)
        self.full = [j for j in range(len(self.past)) if j not in self.windowed]
        self.outputs = ["logits", *self.present]
        self.jobs: queue.Queue = queue.Queue()
        self.stats = {"steps": 0, "requests": 0, "max_rows": 0}
        self.thread = threading.Thread(target=self._loop, name="polm-onnx-batch", daemon=True)
        self.thread.start()

    def takes(self, job: Job) -> bool:
        """Whether ``job`` decodes in the batch: not when it asks for the prompt's log-probs,
        an adapter or no tokens at all, nor past a sliding window's length (those run on their
        own generator)."""
        p = job.params
        if p.prompt_logprobs is not None or p.adapter is not None or p.max_tokens < 1:
            return False
        return not self.windowed or len(job.prompt_ids) + p.max_tokens <= self.window

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    # --- the graph ---------------------------------------------------------------------

    def _empty(self, rows: int, j: int, width: int = 0):
        width = self.window if j in self.windowed else width
        return self.np.zeros((rows, self.kv_heads, width, self.head_size), self.cache_type)

    def _run(self, ids, mask, cache: list):
        feeds = dict(zip(self.past, cache))
        feeds["input_ids"] = ids.astype(self.id_type)
        feeds["attention_mask"] = mask.astype(self.mask_type)
        logits, *present = self.session.run(self.outputs, feeds)
        return logits[:, -1], present

    # --- the loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        rows: list[Row] = []
        cache: list = []
        while True:
            try:
                rows, cache = self._admit(rows, cache)
                if rows is None:
                    return
                if rows:
                    rows, cache = self._step(rows, cache)
            except Exception:
                log.exception("batched generation failed")
                deliver([(r.job, "error") for r in rows])
                rows, cache = [], []

    def _admit(self, rows: list[Row], cache: list):
        """Take new jobs (waiting for one when nothing runs): each prompt runs alone, picks
        its first token, and joins the batch unless that already ended it."""
        np = self.np
        while len(rows) < self.max_rows:
            try:
                job = self.jobs.get(block=not rows)
            except queue.Empty:
                break
            if job is None:
                deliver([(r.job, "error") for r in rows])
                return None, None
            if job.cancelled.is_set():
                continue
            ids = np.array([job.prompt_ids])
            try:
                logits, present = self._run(
                    ids, np.ones_like(ids), [self._empty(1, j) for j in range(len(self.past))]
                )
            except Exception:  # this request fails, not the ones already running
                log.exception("the prompt's forward pass failed")
                deliver([(job, "error")])
                continue
            p = job.params
            max_length = self.backend.lm.max_length(len(job.prompt_ids), max(p.max_tokens, 1))
            row = Row(job, self.backend.sampler(p), len(job.prompt_ids), max_length)
            self.stats["requests"] += 1
            out, done = self._pick(row, logits[0])
            deliver(out)
            if done:
                continue
            cache = self._join(cache, present, rows)
            rows.append(row)
        return rows, cache

    def _join(self, cache: list, present: list, rows: list[Row]) -> list:
        """The batch's cache with one more row, right-padded to the longest."""
        np = self.np
        if not rows:
            return present
        out = []
        for j, (a, b) in enumerate(zip(cache, present)):
            if j not in self.windowed and a.shape[2] != b.shape[2]:
                width = max(a.shape[2], b.shape[2])
                a = np.pad(a, ((0, 0), (0, 0), (0, width - a.shape[2]), (0, 0)))
                b = np.pad(b, ((0, 0), (0, 0), (0, width - b.shape[2]), (0, 0)))
            out.append(np.concatenate([a, b]))
        return out

    def _pick(self, row: Row, logits) -> tuple[list, bool]:
        """Sample ``row``'s next token: what to deliver (the token, and a finish reason), and
        whether the row is done."""
        tok, lp = row.sampler.pick(logits)
        if tok in self.backend.eos:
            return [(row.job, "stop")], True
        row.made += 1
        row.next = tok
        out = [(row.job, lp if lp is not None else tok)]
        if row.made >= row.job.params.max_tokens or row.length + 1 >= row.max_length:
            out.append((row.job, "length"))
            return out, True
        return out, False

    def _step(self, rows: list[Row], cache: list):
        """One forward pass for every row; rows that finished or were cancelled leave."""
        np = self.np
        width = max((cache[j].shape[2] for j in self.full), default=self.window) + 1
        lengths = np.array([r.length for r in rows])
        mask = (np.arange(width)[None, :] <= lengths[:, None]).astype(np.int64)
        ids = np.array([[r.next] for r in rows])
        logits, cache = self._run(ids, mask, cache)
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        out, keep = [], []
        for b, row in enumerate(rows):
            row.length += 1
            if row.job.cancelled.is_set():
                continue
            items, done = self._pick(row, logits[b])
            out += items
            if not done:
                keep.append(b)
        deliver(out)
        if len(keep) == len(rows):
            return rows, cache
        rows = [rows[b] for b in keep]
        if not rows:
            return [], []
        cache = [a[keep] for a in cache]
        longest = max(r.length for r in rows)  # the padding no row needs any more
        cache = [
            a if j in self.windowed or a.shape[2] <= longest else a[:, :, :longest]
            for j, a in enumerate(cache)
        ]
        return rows, cache
