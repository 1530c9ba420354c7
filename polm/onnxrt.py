"""The ``onnx`` checkpoint format, run by onnxruntime-genai alone (this module imports neither
torch nor transformers).

An ``onnx`` checkpoint is what onnxruntime-genai's model builder writes (``model.onnx``,
``model.onnx.data``, ``genai_config.json``, the tokenizer and its chat template) plus polm's
manifest. :class:`OnnxLM` renders prompts with the checkpoint's own chat template, tokenizes
with onnxruntime-genai's tokenizer and decodes greedily in batches of prompts of one token
length (at most 32 a batch in onnxruntime-genai 0.18).

Why one length a batch: onnxruntime-genai 0.18 pads a batch of prompts on the right, and the
GroupQueryAttention kernel of a sliding-window model (Gemma 3) refuses the shorter rows of
the first step (``seqlens_k[0] = 16 is too small for sequence_length 19``). Prompts of equal
length need no padding, so grouping them works for every model.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

MAX_BATCH = 32


class OnnxLM:
    """Greedy generation and next-token logits from an onnx checkpoint directory."""

    def __init__(self, path, threads: int | None = None, lazy: bool = False):
        """``lazy``: the weights load at the first generation, not here (the ONNX backend's
        continuous batching runs the graph in its own session and needs this one only for what
        it does not batch)."""
        import onnxruntime_genai as og

        from polm.errors import PolmError

        path = Path(path)
        for name in ("genai_config.json", "model.onnx"):
            if not (path / name).is_file():
                raise PolmError(
                    f"{path} has no {name}: an onnx checkpoint is onnxruntime-genai's model "
                    "builder output (model.onnx, genai_config.json, tokenizer files)."
                )
        genai = json.loads((path / "genai_config.json").read_text())["model"]
        self.context_length = int(genai.get("context_length") or 2048)
        self.vocab_size = int(genai.get("vocab_size") or 0)
        # sliding-window layers (Gemma 3) need a KV cache at least one window long
        window = (genai.get("decoder", {}).get("sliding_window") or {}).get("window_size", 0)
        self.min_cache = min(int(window or 0), self.context_length)
        config = og.Config(str(path))
        threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0) or 0)
        if threads:
            opts = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
        self.og, self._config = og, config
        self._model = None
        self._lock = threading.Lock()
        self.tokenizer = og.Tokenizer(config)  # from the config: no weights loaded for it
        self.eos = set(int(t) for t in self.tokenizer.eos_token_ids)
        if not lazy:
            self.load()

    @property
    def model(self):
        """onnxruntime-genai's model (the weights in onnxruntime sessions), loaded on first use."""
        return self._model if self._model is not None else self.load()

    def load(self):
        with self._lock:
            if self._model is None:
                self._model = self.og.Model(self._config)
        return self._model

    def max_length(self, prompt_tokens: int, new_tokens: int) -> int:
        """The generator's ``max_length`` (its KV cache size) for a prompt and answer."""
        return min(self.context_length, max(prompt_tokens + new_tokens, self.min_cache))

    def chat_prompt(self, prompt: str) -> str:
        """A user turn rendered with the checkpoint's chat template, ready for the answer."""
        messages = json.dumps([{"role": "user", "content": prompt}])
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def generate(self, texts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of already rendered ``texts``, in batches of one prompt length
        (see the module docstring), returned in the order of ``texts``."""
        by_length: dict[int, list[int]] = {}
        for i, text in enumerate(texts):
            by_length.setdefault(len(self.tokenizer.encode(text)), []).append(i)
        outs: list[str] = [""] * len(texts)
        for rows in by_length.values():
            for k in range(0, len(rows), MAX_BATCH):
                chunk = rows[k : k + MAX_BATCH]
                for i, out in zip(chunk, self._batch([texts[i] for i in chunk], max_new_tokens)):
                    outs[i] = out
        return outs

    def _batch(self, texts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of ``texts`` that tokenize to the same length (no padding)."""
        import numpy as np

        og = self.og
        batch = self.tokenizer.encode_batch(texts)
        width = batch.shape()[1]
        params = og.GeneratorParams(self.model)
        params.set_search_options(
            max_length=self.max_length(width, max_new_tokens),
            do_sample=False,
            batch_size=len(texts),
        )
        gen = og.Generator(self.model, params)
        gen.append_tokens(batch)
        new: list[list[int]] = [[] for _ in texts]
        done = [False] * len(texts)
        for _ in range(max_new_tokens):
            if gen.is_done() or all(done):
                break
            gen.generate_next_token()
            for j, token in enumerate(gen.get_next_tokens()):
                if not done[j]:
                    token = int(token)
                    done[j] = token in self.eos
                    if not done[j]:
                        new[j].append(token)
        return [self.tokenizer.decode(np.array(ids, dtype=np.int32)) for ids in new]

    def greedy(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy answers to chat ``prompts`` (user turns)."""
        return self.generate([self.chat_prompt(p) for p in prompts], max_new_tokens)

    def decode_exactly(self, text: str, new_tokens: int) -> tuple[int, float]:
        """Decode up to ``new_tokens`` greedy tokens after ``text``, past the end of text (a
        fixed amount of work, for timing); return how many came after the first (the prefill's)
        token and the seconds they took."""
        import time

        ids = self.tokenizer.encode(text)
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(
            max_length=self.max_length(len(ids), new_tokens),
            min_length=len(ids) + new_tokens,  # no early end of text
            do_sample=False,
        )
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(ids)
        gen.generate_next_token()  # the prefill and first token
        t0, done = time.perf_counter(), 1
        while done < new_tokens and not gen.is_done():
            gen.generate_next_token()
            done += 1
        return done - 1, time.perf_counter() - t0

    def next_token_logits(self, text: str):
        """The logits after ``text`` (a numpy vector over the vocabulary)."""
        import numpy as np

        og = self.og
        ids = self.tokenizer.encode(text)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length(len(ids), 1), do_sample=False)
        gen = og.Generator(self.model, params)
        gen.append_tokens(ids)
        return np.array(gen.get_logits())[0, -1].astype("float32")


def write_onnx_adapter(adapter: Path, export: Path, dst: Path) -> None:
    """A ``peft-adapter`` (PEFT LoRA) as onnxruntime's adapter format (``.onnx_adapter``) for an
    export with LoRA slots (``optimize.onnx`` ``lora_slots``, its ``lora_slots.json``): each
    module's A and B transposed to the graph's MatMul layout, B times LoRA's scaling. Refuses,
    naming why, what the graph cannot take: another PEFT method, DoRA, per-module rank or alpha
    patterns, trained weights outside LoRA's A and B, modules without a slot."""
    import numpy as np
    import onnxruntime as ort
    from safetensors.numpy import load_file

    from polm.errors import PolmError

    adapter, export = Path(adapter), Path(export)
    slots_file = export / "lora_slots.json"
    if not slots_file.is_file():
        raise PolmError(
            f"{export} takes no LoRA adapters: export it with optimize.onnx lora_slots "
            "(e.g. all-linear) to serve adapters on it by name"
        )
    slots = json.loads(slots_file.read_text())["modules"]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    refused = [
        (cfg.get("peft_type") != "LORA", f"a {cfg.get('peft_type')} adapter, not LoRA"),
        (cfg.get("use_dora"), "DoRA"),
        (cfg.get("rank_pattern") or cfg.get("alpha_pattern"), "per-module rank or alpha"),
        (cfg.get("lora_bias"), "a LoRA bias"),
    ]
    why = next((what for hit, what in refused if hit), None)
    if why:
        raise PolmError(f"{adapter}: {why}; the ONNX backend serves plain LoRA adapters")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    params = {}
    for key, w in weights.items():
        module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        slot = slots.get(module)
        if part not in ("A.weight", "B.weight") or slot is None:
            raise PolmError(
                f"{adapter}: {key} has no slot in {export} (its LoRA slots are on "
                f"{len(slots)} modules, e.g. {next(iter(slots), '-')}); export with lora_slots "
                "that cover the adapter's target modules"
            )
        dtype = np.dtype(slot["dtype"])
        if part == "A.weight":
            params[slot["A"]] = np.ascontiguousarray(w.T, dtype=dtype)
        else:
            rank = w.shape[1]
            alpha = float(cfg.get("lora_alpha", rank))
            scale = alpha / (rank**0.5 if cfg.get("use_rslora") else rank)
            params[slot["B"]] = np.ascontiguousarray(w.T * scale, dtype=dtype)
    out = ort.AdapterFormat()
    out.set_adapter_version(1)
    out.set_model_version(1)
    out.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    out.export_adapter(str(dst))
