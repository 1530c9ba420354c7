"""The transformers backend: any checkpoint polm loads as a torch model (hf, peft-adapter, gptq,
onebit, MoE), on CPU or one GPU.

Concurrent requests are batched: a worker thread takes every request waiting (up to
``max_batch``), left-pads their prompts into one batch, prefills it and decodes all rows
together, one forward pass per token, sampling each row with its own settings and seed. Rows
that finish (end of sequence, ``max_tokens``, a stop string, a client that went away) leave the
batch and its KV cache at once. Requests that arrive meanwhile wait for the next batch: this is
static batching, not vLLM's continuous batching, which is the GPU backend's job.

Speculative decoding with a draft model (``draft``: a polm checkpoint with the same vocabulary,
e.g. the ``optimize.distill`` student of the served model): a request that decodes alone and
greedily has the draft propose ``draft_tokens`` tokens, one cheap forward pass each, and the
served model checks them all in one forward pass; the longest prefix it agrees with is kept,
plus its own next token. Greedy answers are the served model's own, token for token; only the
number of its forward passes changes. ``stats["draft"]`` counts tokens proposed and accepted
(the acceptance rate on ``/metrics``). Rows of a batch, and sampled requests, decode without it.
"""

from __future__ import annotations

import queue
import threading
import time

from polm.loading import load_model
from polm.stage import left_padded_positions
from polm.virtual import for_decoding
from serve.backends.base import Job, Sampler, TokenBackend, deliver, prompt_logprobs


class TransformersBackend(TokenBackend):
    name = "transformers"

    def __init__(
        self,
        ckpt,
        device: str | None = None,
        max_batch: int = 32,
        batch_wait_s=0.005,
        draft=None,
        draft_tokens: int = 4,
    ):
        import torch

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        if self.device.startswith("cuda"):
            # with a padding mask, SDPA picks cuDNN's kernel, which builds a new plan for every
            # new sequence length: 13 ms per attention call while decoding on an H200 (measured)
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.model, self.tokenizer = load_model(ckpt, dtype=dtype)
        self.model.to(self.device)
        # prompt, P- and prefix tuning: their virtual tokens put in front by polm (polm.virtual)
        self.model = for_decoding(self.model)
        cfg = self.model.config
        cfg = getattr(cfg, "get_text_config", lambda: cfg)()
        self.context_length = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or len(self.tokenizer))
        self.chat_template = self.tokenizer.chat_template
        eos = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = min(self.eos)
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.draft, self.draft_tokens = None, draft_tokens
        # a sliding-window cache cannot be cut back once past its window (Gemma 3)
        self.window = int(getattr(cfg, "sliding_window", 0) or 0)
        self.on_draft = None  # called with (proposed, accepted) after each check (/metrics)
        if draft is not None:
            self.draft = self._load_draft(draft, dtype)
        self.adapters: set[str] = set()
        self.stats = {"batches": 0, "requests": 0, "max_rows": 0}  # what batching achieved
        self.stats["draft"] = {"proposed": 0, "accepted": 0, "checks": 0}
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.worker = threading.Thread(target=self._serve, name="polm-transformers", daemon=True)
        self.worker.start()

    def _load_draft(self, draft, dtype):
        """The draft model, refused unless it reads and writes the same tokens: a torch
        checkpoint, or an ``onnx`` export run by onnxruntime-genai (a forward pass of a small
        model there costs a fraction of one through transformers)."""
        from polm.errors import PolmError

        if draft.format == "onnx":
            from tokenizers import Tokenizer

            vocab = Tokenizer.from_file(str(draft.path / "tokenizer.json")).get_vocab()
            made = _OnnxDraft(draft.path)
        else:
            model, tokenizer = load_model(draft, dtype=dtype)
            vocab = tokenizer.get_vocab()
            made = _TorchDraft(model.to(self.device).eval(), self.device)
        if vocab != self.tokenizer.get_vocab():
            raise PolmError(
                f"the draft {draft.path} has another vocabulary than the served model "
                f"({len(vocab)} against {len(self.tokenizer.get_vocab())} tokens): a draft must "
                "share the served model's tokenizer (an optimize.distill student of it does)"
            )
        return made

    # ---- the Backend interface ---------------------------------------------------------

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def add_adapters(self, adapters: dict) -> None:
        """PEFT's LoRA adapters on the base, one per name; a batch mixes them row by row
        (PEFT's ``adapter_names``: each row through its own adapter, or none for the base)."""
        import json

        from peft import PeftModel

        from polm.errors import PolmError

        for name, path in adapters.items():
            kind = json.loads((path / "adapter_config.json").read_text()).get("peft_type")
            if kind != "LORA":
                raise PolmError(f"adapter {name!r} is {kind}: only LoRA adapters are served "
                                "by name (a batch mixes them row by row)")  # fmt: skip
        model = None
        for name, path in adapters.items():
            if model is None:
                model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            else:
                model.load_adapter(path, adapter_name=name)
        self.model = model.eval()
        self.adapters = set(adapters)

    def _guide_tokenizer(self):
        from llguidance import LLTokenizer

        from serve.grammar import hf_tokenizer_json

        return LLTokenizer(
            hf_tokenizer_json(self.tokenizer), n_vocab=self.vocab_size, eos_token=sorted(self.eos)
        )

    def close(self) -> None:
        self.jobs.put(None)
        self.worker.join(timeout=10)

    # ---- the worker --------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            batch = [job]
            time.sleep(self.batch_wait_s)  # let requests sent together arrive together
            while len(batch) < self.max_batch:
                try:
                    nxt = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.jobs.put(None)
                    break
                batch.append(nxt)
            batch = [j for j in batch if not j.cancelled.is_set()]
            try:
                if batch:
                    with self.torch.inference_mode():
                        self._run(batch)
            except Exception:  # one bad batch must not take the server down
                import logging

                logging.getLogger("polm.serve").exception("generation failed")
                for j in batch:
                    j.finish("error")

    def _run(self, batch: list[Job]) -> None:
        torch = self.torch
        dev = self.device
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(batch))
        if len(batch) == 1 and self._speculates(batch[0]):
            return self._speculate(batch[0])
        width = max(len(j.prompt_ids) for j in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, j in enumerate(batch):
            n = len(j.prompt_ids)
            ids[i, width - n :] = torch.tensor(j.prompt_ids)
            mask[i, width - n :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = left_padded_positions(mask)
        samplers = [self.sampler(j.params) for j in batch]
        made = [0] * len(batch)
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        routes = [j.params.adapter or "__base__" for j in batch]  # PEFT's name for the base

        def extra(rows: list[int]) -> dict:
            return {"adapter_names": [routes[b] for b in rows]} if self.adapters else {}

        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            **extra(list(range(len(batch)))),
        )
        last, events = out.logits[:, -1, :], []
        for i, j in enumerate(batch):
            if j.params.prompt_logprobs is not None:
                n = len(j.prompt_ids)
                rows = out.logits[i, width - n :].float().cpu().numpy()
                j.emit_prompt(prompt_logprobs(rows, j.prompt_ids, j.params.prompt_logprobs))
            if j.params.max_tokens == 0:
                events.append((j, "length"))
        deliver(events)
        live = [b for b, j in enumerate(batch) if j.params.max_tokens > 0]  # in cache row order
        if len(live) < len(batch):
            if not live:
                return
            idx = torch.tensor(live, device=dev)
            cache.batch_select_indices(idx)
            mask, pos = mask[idx], pos[idx]
            last = last[idx]
        while live:
            rows = [batch[b] for b in live]
            picked = _pick_rows(last, [samplers[b] for b in live])
            tokens, keep, events = [], [], []
            for row, (b, job, (tok, lp)) in enumerate(zip(live, rows, picked)):
                if job.cancelled.is_set():
                    continue
                if tok in self.eos:
                    events.append((job, "stop"))
                    continue
                events.append((job, tok if lp is None else lp))
                made[b] += 1
                if made[b] >= job.params.max_tokens:
                    events.append((job, "length"))
                    continue
                keep.append(row)
                tokens.append(tok)
            deliver(events)
            if not keep:
                return
            if len(keep) < len(live):
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                mask, pos = mask[idx], pos[idx]
                live = [live[r] for r in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            pos = pos[:, -1:] + 1
            step = torch.tensor(tokens, device=dev).unsqueeze(1)
            out = self.model(
                input_ids=step,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
                **extra(live),
            )
            last = out.logits[:, -1, :]

    # ---- speculative decoding ---------------------------------------------------------

    def _speculates(self, job: Job) -> bool:
        p = job.params
        if self.draft is None or not p.plain_greedy() or p.prompt_logprobs is not None:
            return False
        if self.adapters or p.max_tokens < 1:  # adapters: each row names its own
            return False
        end = len(job.prompt_ids) + p.max_tokens + self.draft_tokens
        return end <= self.context_length and (not self.window or end <= self.window)

    def _speculate(self, job: Job) -> None:
        """Greedy decoding of one request, ``draft_tokens`` proposed by the draft a step and
        checked by the served model in one forward pass (the module docstring).

        The served model's cache holds every token emitted so far; ``tok`` is its choice for
        the next one. The draft's cache lacks ``unseen``, the emitted tokens it has not read."""
        from transformers import DynamicCache

        torch, dev, p = self.torch, self.device, job.params
        cache = DynamicCache(config=self.model.config)
        prompt = torch.tensor([job.prompt_ids], device=dev)
        logits = self.model(input_ids=prompt, past_key_values=cache, use_cache=True).logits
        draft = self.draft
        draft.start(job.prompt_ids[:-1], len(job.prompt_ids) + p.max_tokens + self.draft_tokens)
        unseen, tok, made = [job.prompt_ids[-1]], int(logits[0, -1].argmax()), 0
        stats = self.stats["draft"]
        while not job.cancelled.is_set():
            # emit ``tok``, the served model's choice
            if tok in self.eos:
                return job.finish("stop")
            made += 1
            if made >= p.max_tokens:
                return deliver([(job, tok), (job, "length")])
            deliver([(job, tok)])
            # the draft proposes k tokens: at most what may still be emitted after one more
            k = min(self.draft_tokens, p.max_tokens - made - 1)
            unseen.append(tok)
            proposal = draft.propose(unseen, k) if k else []
            # the served model reads tok and the proposal at once: its choice after each
            check = torch.tensor([[tok, *proposal]], device=dev)
            out = self.model(input_ids=check, past_key_values=cache, use_cache=True)
            choice = out.logits[0].argmax(-1).tolist()
            m = 0
            while m < k and proposal[m] == choice[m]:
                m += 1
            stats["proposed"] += k
            stats["accepted"] += m
            stats["checks"] += 1
            if self.on_draft is not None:
                self.on_draft(k, m)
            # both caches back to tok and the m accepted tokens; the draft never read the last
            # proposal, so when all k are accepted it still has that one to read
            cache.crop(-(k - m))
            if m < k:
                draft.back(k - 1 - m)
                unseen = []
            elif k:
                unseen = [proposal[-1]]
            events = []
            for t in proposal[:m]:
                if t in self.eos:
                    deliver(events)
                    return job.finish("stop")
                events.append((job, t))
                made += 1
                if made >= p.max_tokens:
                    return deliver([*events, (job, "length")])
            deliver(events)
            tok = choice[m]


class _TorchDraft:
    """A draft model through transformers: ``start`` reads a prompt, ``propose`` reads the
    tokens it has not seen and proposes ``k`` greedily (reading all but the last), ``back``
    forgets the last ``n`` tokens it read."""

    def __init__(self, model, device):
        import torch

        self.torch, self.model, self.device = torch, model, device

    def start(self, ids: list[int], max_length: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        if ids:
            self._step(ids)

    def _step(self, ids: list[int]) -> int:
        x = self.torch.tensor([ids], device=self.device)
        out = self.model(input_ids=x, past_key_values=self.cache, use_cache=True)
        return int(out.logits[0, -1].argmax())

    def propose(self, unseen: list[int], k: int) -> list[int]:
        out = [self._step(unseen)]
        while len(out) < k:
            out.append(self._step([out[-1]]))
        return out

    def back(self, n: int) -> None:
        self.cache.crop(-n)


class _OnnxDraft(_TorchDraft):
    """The same on an ``onnx`` export, through onnxruntime-genai's generator (``rewind_to``)."""

    def __init__(self, path):
        import numpy as np

        from polm.onnxrt import OnnxLM

        # one thread: a draft step is too small to share, and onnxruntime's pool threads would
        # spin between steps on the cores the served model's forward pass needs
        self.np, self.lm = np, OnnxLM(path, threads=1)
        if self.lm.min_cache:  # a sliding window drops the positions a rewind goes back to
            from polm.errors import PolmError

            raise PolmError(
                f"the draft {path} is an onnx export with sliding-window layers; polm rewinds "
                "an onnx draft only with a full cache: use its torch checkpoint as the draft"
            )

    def start(self, ids: list[int], max_length: int) -> None:
        # one generator for every request, rewound to nothing: making one took 12.7 ms a request
        # on tiny-base, more than the whole draft's proposals for a 32-token answer
        og, need = self.lm.og, self.lm.max_length(max_length, 1)
        if getattr(self, "gen", None) is None or need > self.size:
            params = og.GeneratorParams(self.lm.model)
            self.size = max(need, min(self.lm.context_length, 1024))
            params.set_search_options(max_length=self.size, do_sample=False)
            self.gen = og.Generator(self.lm.model, params)
        elif self.read:
            self.gen.rewind_to(0)
        self.read = 0
        if ids:
            self.gen.append_tokens(self.np.array(ids, dtype=self.np.int32))
            self.read = len(ids)

    def _step(self, ids: list[int]) -> int:
        self.gen.append_tokens(self.np.array(ids, dtype=self.np.int32))
        self.read += len(ids)
        return int(self.np.asarray(self.gen.get_logits())[0, -1].argmax())

    def back(self, n: int) -> None:
        if n:
            self.read -= n
            self.gen.rewind_to(self.read)


def _pick_rows(logits, samplers: list[Sampler]) -> list[tuple[int, object]]:
    """One token per row (and its log-probs, when asked for): rows that are plainly greedy by
    one argmax on the device, the others through their own :class:`Sampler` on the CPU.
    One transfer to the CPU per step."""
    greedy = logits.argmax(-1).tolist()
    out: list[tuple[int, object]] = [(t, None) for t in greedy]
    rest = [i for i, s in enumerate(samplers) if not s.p.plain_greedy()]
    if rest:
        rows = logits[rest].float().cpu().numpy()
        for k, i in enumerate(rest):
            out[i] = samplers[i].pick(rows[k])
    return out
