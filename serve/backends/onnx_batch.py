"""Continuous batching for the ONNX backend: concurrent requests decode together, one forward
pass of the export's decoder graph per step for every running request, run by onnxruntime
directly.

Why not onnxruntime-genai's own batching: on CPU, 0.18's ``Engine`` batches only statically (4
rows), refuses per-request seeds ("requires an Engine configured for dynamic batching", which
needs a paged-KV model the CPU export is not), samples inside (no logits: no log-probs,
penalties, ``logit_bias`` or polm's structured outputs), and fails on Gemma 3's sliding-window
layers as soon as two prompts differ in length; its batched ``Generator`` takes no rows
mid-flight. So polm steps the graph itself, as the builder wrote it:

- the batch's cache is one buffer per layer's keys and values, with a row for every running
  request: each past input and its present output are bound to the same buffer (I/O binding),
  and ``GroupQueryAttention`` writes each step's position in place (its shared-buffer mode,
  as onnxruntime-genai runs the export), so no step copies the cache. Before, every step wrote
  a new copy of the whole cache: Gemma 3 270M under 16 clients, 216 tok/s and a 1335 MB peak
  (bench/serve.py); now 293 tok/s and 770 MB;
- a request joins between two steps: its prompt runs alone (batch 1, no padding, which the
  sliding-window kernel requires) into the next free row;
- rows are right-padded: each row's ``attention_mask`` counts its own tokens, and
  ``GroupQueryAttention`` reads each row's length from it, so rows of any length decode in one
  pass (sliding-window layers need a buffer as long as their window);
- each row samples with its own :class:`~serve.backends.base.Sampler` (settings, seed,
  structured output), so an answer does not depend on what it was batched with;
- a finished or cancelled request leaves between two steps, and the last rows move into
  the freed ones.

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

        self.np, self.ort, self.backend, self.max_rows = np, ort, backend, max_rows
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
        vocab = self.session.get_outputs()[0].shape[-1]
        self.vocab = vocab if isinstance(vocab, int) else int(config["vocab_size"])
        self.jobs: queue.Queue = queue.Queue()
        self.stats = {"steps": 0, "requests": 0, "max_rows": 0, "regrown": 0}
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

    # --- the cache ---------------------------------------------------------------------

    def _fit(self, cache: list, used: int, length: int) -> list:
        """``cache`` with a free row of at least ``length`` positions after its first ``used``
        rows. The buffers hold ``max_rows`` rows from the start, in pages the system hands out
        as they are first written (:func:`_zeros`): a row costs memory only for the positions
        a request has written.
        Positions round up to 64, up to the sliding window where there is one; a longer
        request regrows the buffers, keeping the rows in use."""
        have = cache[0].shape[2] if cache else 0
        if length <= have:
            return cache
        want = max(have, -(-length // 64) * 64)
        if self.window:
            want = min(want, self.window)
        out = []
        for j in range(len(self.past)):
            a = _zeros((self.max_rows, self.kv_heads, want, self.head_size), self.cache_type)
            if used:
                a[:used, :, :have] = cache[j][:used]
            out.append(a)
        self.stats["regrown"] += bool(used)
        return out

    # --- the graph ---------------------------------------------------------------------

    def _run(self, ids, mask, cache: list, first: int, rows: int):
        """One forward pass for rows ``first .. first + rows`` of the batch's cache. Each past
        input and its present output are bound to the same buffer, and GroupQueryAttention
        writes the new positions in place (its shared-buffer mode, as onnxruntime-genai runs
        the export), so no step copies the cache."""
        np, ort = self.np, self.ort
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=self.id_type))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=self.mask_type))
        for past, present, buf in zip(self.past, self.present, cache):
            value = ort.OrtValue.ortvalue_from_numpy(buf[first : first + rows])
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)
        logits = np.empty((rows, ids.shape[1], self.vocab), np.float32)
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(io)
        return logits[:, -1]

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
        """Take new jobs (waiting for one when nothing runs): each prompt runs alone into the
        next free row of the cache, picks its first token, and joins the batch unless that
        already ended it."""
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
            p = job.params
            max_length = self.backend.lm.max_length(len(job.prompt_ids), max(p.max_tokens, 1))
            cache = self._fit(cache, len(rows), max_length)
            ids = np.array([job.prompt_ids])
            try:
                logits = self._run(ids, np.ones_like(ids), cache, len(rows), 1)
            except Exception:  # this request fails, not the ones already running
                log.exception("the prompt's forward pass failed")
                deliver([(job, "error")])
                continue
            row = Row(job, self.backend.sampler(p), len(job.prompt_ids), max_length)
            self.stats["requests"] += 1
            out, done = self._pick(row, logits[0])
            deliver(out)
            if not done:
                rows.append(row)
        return rows, cache

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
        """One forward pass for every row; rows that finished or were cancelled leave, and
        the last rows move into their places (the rows in use stay the first of the cache)."""
        np = self.np
        lengths = np.array([r.length for r in rows])
        width = int(lengths.max()) + 1
        mask = (np.arange(width)[None, :] <= lengths[:, None]).astype(np.int64)
        ids = np.array([[r.next] for r in rows])
        logits = self._run(ids, mask, cache, 0, len(rows))
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
        for slot, b in enumerate(keep):
            if slot != b:  # the positions the row has written (the rest stay untouched pages)
                n = min(rows[b].length, cache[0].shape[2])
                for a in cache:
                    a[slot, :, :n] = a[b, :, :n]
        if not keep:  # nothing runs: the cache's memory goes back until the next request
            return [], []
        return [rows[b] for b in keep], cache


def _zeros(shape: tuple, dtype):
    """A zeroed array in its own anonymous memory map, with transparent huge pages off: the
    system hands out its 4 KiB pages as they are first written, so a cache buffer with room
    for ``max_rows`` rows of a whole window costs only what the rows have written. (With huge
    pages, the first position a row writes brings in 2 MiB: Gemma 3 270M under 16 clients
    held its whole 300 MB cache capacity resident, 17.5 MB a row, from the prompt on.)"""
    import mmap

    import numpy as np

    size = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mem.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mem, dtype=dtype).reshape(shape)
