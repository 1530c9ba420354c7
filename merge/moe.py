"""Sparse mixture of experts from dense checkpoints, assembled with mergekit's MoE builder
(mergekit-moe; Goddard et al. 2024, arXiv 2403.13257), then checked as no peer does: every expert
finite, non-zero, distinct and of one dtype, and a routing report of where each task's tokens go.

Experts that share a base become one Mixtral-style MoE (Jiang et al. 2024, arXiv 2401.04088):
attention, embeddings and norms come from the base, each expert's MLP becomes one expert of
every layer, and each layer's router is set from prompts. Settings use mergekit-moe's names::

    base_model: base                # an input; default: the inputs' nearest shared ancestor
    gate_mode: hidden               # hidden | hidden_avg | cheap_embed | random | uniform_random
    experts_per_token: 1
    experts:
      - source_model: add_expert    # an input: recipe name, path or position
        task: add                   # polm's shortcut: prompts from add's train split
      - source_model: reverse_expert
        positive_prompts: ["reverse abc", "reverse wxyz"]

``hidden`` sets a router row to the base's normalized hidden state at the last token of the
expert's prompts, averaged; polm cuts each task conversation at a random point of its text so
that the average covers every position, and uses the other experts' prompts as negatives.
Those gates route most tokens home, but one token sent astray derails an answer, and the
gates are read from the wrong place (the residual before attention, not the router's input):
``router_fit_steps`` then fits each router by logistic regression on its real inputs (polm's
addition; no maintained library trains a mergekit-moe router, and BTX, Sukhbaatar et al. 2024,
arXiv 2403.07816, trains it with the whole model). The MoE keeps only the base's attention, so
experts should differ from it in their MLPs only (LoRA on gate/up/down_proj): see
``recipes/moe.yaml`` for a measured recipe.

Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): ``num_experts: N`` copies one
dense model into N experts (random gates, ``noise_scale`` to break the symmetry) to train on.
``architecture: qwen`` writes a Qwen2-MoE (the base's MLP is the shared expert) from a Qwen2 base.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merge import mergekit
from merge.mergekit import check_finite
from polm.checkpoint import Checkpoint, shared_ancestor
from polm.errors import PolmError
from polm.settings import StageSettings, check_choice
from polm.stage import carry_files
from polm.tasks import get_task, validate_task_names

STAGE = "merge.moe"
GATE_MODES = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random")
PROMPTLESS = ("random", "uniform_random")


class ExpertEntry(BaseModel):
    """One entry of mergekit-moe's ``experts`` list, plus polm's ``task`` shortcut."""

    model_config = ConfigDict(extra="forbid")

    source_model: str | int = Field(description="An input: recipe name, path or position.")
    task: str | None = Field(default=None, description="Built-in task routed to this expert.")
    positive_prompts: list[str] = Field(default_factory=list, description="Prompts for it.")
    negative_prompts: list[str] | None = Field(
        default=None, description="Prompts away from it (default: the other experts' prompts)."
    )
    noise_scale: float | None = Field(default=None, ge=0, description="Noise on its weights.")

    _known_task = field_validator("task")(validate_task_names)


class MoESettings(StageSettings):
    """Settings of ``merge.moe``: mergekit-moe's configuration fields, plus polm's additions."""

    base_model: str | int | None = Field(
        default=None,
        description="Gives attention, embeddings, norms: an input's recipe name, path or "
        "position; default: the inputs' nearest shared ancestor.",
    )
    experts: list[ExpertEntry] | None = Field(
        default=None, description="The experts; default every non-base input (random gates)."
    )
    gate_mode: str = Field(default="hidden", description=f"One of: {', '.join(GATE_MODES)}.")
    experts_per_token: int = Field(default=2, ge=1, description="Experts each token uses.")
    architecture: Literal["mixtral", "qwen"] = Field(
        default="mixtral", description="mixtral, or qwen (Qwen2-MoE, from a Qwen2 base)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Dtype of the written weights."
    )
    num_experts: int | None = Field(
        default=None, ge=2, description="Sparse upcycling: copy the one dense input N times."
    )
    noise_scale: float | None = Field(
        default=None, ge=0, description="Upcycling: noise added to each copy's weights."
    )
    prompts_per_expert: int = Field(default=64, gt=0, description="Train examples per task.")
    router_fit_steps: int = Field(
        default=0, ge=0, description="Fit the routers to the prompts (0: mergekit's gates)."
    )
    routing_tasks: list[str] | None = Field(
        default=None, description="Tasks of the routing report; default the experts' tasks."
    )
    routing_n: int = Field(default=100, gt=0, description="Test examples per task reported.")
    seed: int = Field(default=0, description="Seed for random gates, noise and prompt cuts.")

    _known_tasks = field_validator("routing_tasks")(validate_task_names)

    @field_validator("gate_mode")
    @classmethod
    def _known_gate_mode(cls, v: str) -> str:
        return check_choice("gate_mode", v, GATE_MODES)

    @model_validator(mode="after")
    def _check(self):
        prompted = self.gate_mode not in PROMPTLESS or self.router_fit_steps > 0
        if self.num_experts is not None and (self.experts is not None or prompted):
            raise ValueError(
                "num_experts copies one model with no prompts per copy: use gate_mode random "
                "and no experts list, or list the experts (one source_model) with prompts"
            )
        n = self.num_experts or len(self.experts or [])
        if n and self.experts_per_token > n:
            raise ValueError(f"experts_per_token {self.experts_per_token} exceeds {n} experts")
        for i, e in enumerate(self.experts or []):
            if prompted and not (e.task or e.positive_prompts):
                raise ValueError(f"experts[{i}] needs a task or positive_prompts")
        return self

    def model_paths(self) -> list[str]:
        """Paths named in the settings, for a mergekit-moe YAML run without ``--from``."""
        refs = [self.base_model] + [e.source_model for e in self.experts or []]
        return [r for r in dict.fromkeys(refs) if isinstance(r, str)]


def resolve(ref: str | int, inputs: list[Checkpoint], what: str) -> Checkpoint:
    return mergekit.resolve(ref, inputs, what, STAGE)


def plan(s: MoESettings, inputs: list[Checkpoint]) -> tuple[Checkpoint, list[tuple], bool]:
    """The base, the experts as (checkpoint, entry), and whether this is upcycling."""
    base = resolve(s.base_model, inputs, "base_model") if s.base_model is not None else None
    if base is None and (base := shared_ancestor(inputs)) is None:
        raise PolmError(
            f"{STAGE}: the inputs share no ancestor on disk; name the base_model (an input's "
            "recipe name, path or position)."
        )
    others = [c for c in inputs if c.path != base.path]
    if s.num_experts is not None:
        if len(others) > 1:
            raise PolmError(f"{STAGE}: num_experts upcycles one dense model, got {len(others)}.")
        dense = (others or [base])[0]
        entry = ExpertEntry(source_model=str(dense.path), noise_scale=s.noise_scale)
        return base, [(dense, entry)] * s.num_experts, True
    if s.experts is not None:
        experts = [(resolve(e.source_model, inputs, "source_model"), e) for e in s.experts]
    elif s.gate_mode not in PROMPTLESS:
        raise PolmError(f"{STAGE}: {s.gate_mode} gates need the experts listed with prompts.")
    else:
        experts = [(c, ExpertEntry(source_model=str(c.path))) for c in others]
    if not 2 <= len(experts) or s.experts_per_token > len(experts):
        raise PolmError(f"{STAGE}: {len(experts)} experts for {s.experts_per_token} per token.")
    return base, experts, len({c.path for c, _ in experts}) == 1


def conversation(tokenizer, ex) -> tuple[str, list[tuple[int, int]]]:
    """An example rendered as a chat, and the character spans of its task text (prompt and
    answer); the rest is chat-template markup, the same in every task."""
    messages = [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    p = text.index(ex.prompt)
    a = text.index(ex.answer, p + len(ex.prompt))
    return text, [(p, p + len(ex.prompt)), (a, a + len(ex.answer))]


def task_prompts(task: str, n: int, tokenizer, rng: random.Random) -> list[str]:
    """``n`` train conversations of ``task`` (never test data), each cut at a random point of
    its task text, so that the gate's last-token average covers every position."""
    out = []
    for ex in get_task(task).examples("train", n):
        text, spans = conversation(tokenizer, ex)
        cut = rng.choice([end for start, stop in spans for end in range(start + 1, stop + 1)])
        out.append(text[:cut].removeprefix(tokenizer.bos_token or ""))  # mergekit adds a BOS
    return out


def mergekit_config(s: MoESettings, base: Checkpoint, experts: list[tuple], tokenizer) -> dict:
    """mergekit-moe's configuration: prompts from tasks, negatives from the other experts."""
    rng = random.Random(s.seed)
    prompts = [
        e.positive_prompts
        + (task_prompts(e.task, s.prompts_per_expert, tokenizer, rng) if e.task else [])
        for _, e in experts
    ]
    entries = []
    for i, (c, e) in enumerate(experts):
        entry = {"source_model": str(c.path), "noise_scale": e.noise_scale}
        if s.gate_mode not in PROMPTLESS:
            others = [p for j, ps in enumerate(prompts) if j != i for p in ps]
            entry["positive_prompts"] = prompts[i]
            entry["negative_prompts"] = others if e.negative_prompts is None else e.negative_prompts
        entries.append(entry)
    cfg = {
        "base_model": str(base.path),
        "experts": entries,
        "gate_mode": s.gate_mode,  # mergekit's hidden: the last token's hidden state
        "dtype": s.dtype,
        "experts_per_token": s.experts_per_token,
        "architecture": s.architecture,
    }
    if s.architecture == "qwen":  # Qwen2-MoE's shared expert: the base's MLP, on every prompt
        shared = {"source_model": str(base.path)}
        if s.gate_mode not in PROMPTLESS:
            shared["positive_prompts"] = [p for ps in prompts for p in ps]
        cfg["shared_experts"] = [shared]
    return cfg


def build(cfg: dict, out: Path, allow_all_same: bool) -> None:
    """mergekit-moe's build; it logs why it refuses a configuration, then calls ``sys.exit``:
    that becomes one PolmError quoting the log."""
    import logging
    from logging.handlers import BufferingHandler

    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts import moe

    try:
        config = MoEMergeConfig.model_validate(cfg)
    except Exception as e:  # pydantic's error, in mergekit's words
        raise PolmError(f"{STAGE}: mergekit-moe refused the configuration: {e}") from None
    options = MergeOptions(
        trust_remote_code=False,
        lazy_unpickle=False,
        safe_serialization=True,
        device="cpu",
        quiet=True,
        copy_tokenizer=False,
        write_model_card=False,
    )
    log = BufferingHandler(capacity=1000)
    log.setLevel(logging.WARNING)
    logging.getLogger().addHandler(log)
    try:
        moe.build(config, str(out), options, device="cpu", allow_all_same=allow_all_same)
    except SystemExit:
        why = " ".join(r.getMessage() for r in log.buffer) or "no reason given"
        raise PolmError(f"{STAGE}: mergekit-moe refused the configuration: {why}") from None
    except (RuntimeError, ValueError, KeyError, AssertionError) as e:
        raise PolmError(f"{STAGE}: mergekit-moe failed: {e}") from e
    finally:
        logging.getLogger().removeHandler(log)


def open_moe(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from polm.loading import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=False, use_safetensors=True
    )
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "right"
    return model, tokenizer


def fit_router(path: Path, texts: list[list[str]], steps: int) -> float:
    """Fit each layer's router, from mergekit's gate, so that every token of expert i's texts
    picks expert i: logistic regression on the router's inputs, collected with every token
    sent to its own expert. Rewrites the weights; returns the token accuracy reached."""
    import torch
    from safetensors.torch import load_file, save_file

    model, tokenizer = open_moe(path)
    gates = [layer.mlp.gate for layer in model.model.layers]
    xs: list[list] = [[] for _ in gates]
    state = {}

    def record(i):
        def hook(gate, args, out):
            xs[i].append(args[0].reshape(-1, args[0].shape[-1])[state["keep"]])
            n = out[0].shape[0]
            return out[0], torch.ones(n, 1), torch.full((n, 1), state["expert"])

        return hook

    hooks = [g.register_forward_hook(record(i)) for i, g in enumerate(gates)]
    labels = []
    for expert, batch in enumerate(texts):
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        state.update(expert=expert, keep=enc["attention_mask"].flatten().bool())
        with torch.no_grad():
            model(**enc)
        labels.append(torch.full((int(state["keep"].sum()),), expert))
    for h in hooks:
        h.remove()
    y = torch.cat(labels)
    # tokens all texts share (the chat template's opening) cannot be told apart: a slightly
    # larger weight sends them to the first expert, best the one furthest from the base
    prefer = 1 + 1e-2 * torch.arange(len(texts), 0, -1).float() / len(texts)
    fitted, accuracy = {}, 0.0
    for i, gate in enumerate(gates):
        x, w = torch.cat(xs[i]), gate.weight.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(x @ w.T, y, weight=prefer).backward()
            opt.step()
        fitted[f"model.layers.{i}.mlp.gate.weight"] = w.detach()
        accuracy += float(((x @ w.T).argmax(-1) == y).float().mean()) / len(gates)
    for f in Path(path).glob("*.safetensors"):
        tensors = load_file(f)
        if keys := [k for k in tensors if k in fitted]:
            tensors.update({k: fitted[k].to(tensors[k].dtype) for k in keys})
            save_file(tensors, f, metadata={"format": "pt"})
    return accuracy


def check_experts(path: str | Path, allow_duplicates: bool = False) -> dict:
    """Check every expert of an MoE checkpoint, layer by layer: each tensor finite and not all
    zero, one dtype throughout, no expert a copy of another (relative difference under 1e-4).
    A failure is a PolmError naming layer and expert; with ``allow_duplicates`` (upcycled copies
    start identical) duplicates are only counted. Reads Mixtral's fused layout (transformers 5:
    ``experts.gate_up_proj``, experts first) and one tensor per expert (Qwen2-MoE)."""
    import torch
    from safetensors import safe_open

    split = re.compile(r"layers\.(\d+)\..*\.experts\.(\d+)\.(.+)$")
    fused = re.compile(r"layers\.(\d+)\..*\.experts\.(\w+)$")
    layers: dict[int, dict[int, dict]] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                if m := split.search(name):
                    layers.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = (
                        st.get_tensor(name)
                    )
                elif m := fused.search(name):
                    for e, t in enumerate(st.get_tensor(name)):
                        layers.setdefault(int(m[1]), {}).setdefault(e, {})[m[2]] = t
    if not layers:
        raise PolmError(f"{STAGE}: {path} has no expert weights; is it an MoE?")
    dtypes, duplicates = set(), 0
    for layer, experts in sorted(layers.items()):
        for e, parts in sorted(experts.items()):
            for part, t in parts.items():
                where = f"{STAGE}: layer {layer}, expert {e} ({part})"
                dtypes.add(str(t.dtype).removeprefix("torch."))
                if len(dtypes) > 1:
                    raise PolmError(f"{where} breaks dtype consistency: {sorted(dtypes)}.")
                if not torch.isfinite(t).all():
                    raise PolmError(f"{where} has NaN or Inf values.")
                if not t.any():
                    raise PolmError(f"{where} is all zeros: the expert contributes nothing.")
        flat = {
            e: torch.cat([p[k].float().flatten() for k in sorted(p)]) for e, p in experts.items()
        }
        for a in sorted(flat):
            for b in (b for b in sorted(flat) if b > a):
                if (flat[a] - flat[b]).norm() > 1e-4 * flat[a].norm():
                    continue
                if not allow_duplicates:
                    raise PolmError(
                        f"{STAGE}: layer {layer}, expert {b} duplicates expert {a}: the MoE "
                        "pays for an expert that adds nothing."
                    )
                duplicates += 1
    n = max(len(e) for e in layers.values())
    return {"layers": len(layers), "experts": n, "dtype": dtypes.pop(), "duplicates": duplicates}


def routing_report(path: Path, tasks: list[str], n: int) -> dict[str, list[list[float]]]:
    """{task: per layer, the share of its tokens whose top-1 expert is each expert}, over the
    prompt and answer text of ``n`` held-out (test) examples, chat markup left out."""
    import torch

    model, tokenizer = open_moe(path)
    report = {}
    for task in tasks:
        texts, spans = zip(
            *(conversation(tokenizer, x) for x in get_task(task).examples("test", n))
        )
        enc = tokenizer(
            list(texts), return_tensors="pt", padding=True, add_special_tokens=False,
            return_offsets_mapping=True,
        )  # fmt: skip
        offsets = enc.pop("offset_mapping")
        keep = torch.zeros_like(enc["attention_mask"], dtype=torch.bool)
        for row, row_spans in enumerate(spans):
            for start, stop in row_spans:
                keep[row] |= (offsets[row, :, 0] < stop) & (offsets[row, :, 1] > start)
        keep = (keep & enc["attention_mask"].bool()).flatten()
        with torch.no_grad():
            logits = model(**enc, output_router_logits=True).router_logits
        report[task] = [
            (torch.bincount(lg[keep].argmax(-1), minlength=lg.shape[-1]) / keep.sum()).tolist()
            for lg in logits
        ]
    return report


def print_routing(report: dict, names: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="merge.moe routing (top-1)")
    for col in ("task", *names):
        table.add_column(col, justify="right")
    for task, layers in report.items():
        table.add_row(task, *[f"{sum(c) / len(c):.1%}" for c in zip(*layers)])
    Console(stderr=True).print(table)


def run(inputs: list[Checkpoint], settings: MoESettings, out: Path) -> Checkpoint:
    import torch

    from polm.checkpoint import staging
    from polm.loading import load_tokenizer

    s = settings
    if not inputs:
        raise PolmError(f"{STAGE} needs the base and the experts: --from CKPT... or experts.")
    for c in inputs:
        c.require_format("hf", stage=STAGE)
    inputs = list({c.path: c for c in inputs}.values())
    base, experts, upcycling = plan(s, inputs)
    base_type = json.loads((base.path / "config.json").read_text()).get("model_type")
    if s.architecture == "qwen" and base_type != "qwen2":
        raise PolmError(f"{STAGE}: architecture qwen needs a Qwen2 base, not {base_type}.")
    tokenizer = load_tokenizer(base.path)
    cfg = mergekit_config(s, base, experts, tokenizer)
    names = [c.path.name for c, _ in experts]
    names = [f"{x}#{i}" if names.count(x) > 1 else x for i, x in enumerate(names)]
    with staging(out) as st:
        torch.manual_seed(s.seed)  # random gates and noise
        build(cfg, st.dir, allow_all_same=upcycling)
        carry_files(base.path, st.dir)
        metrics = {"moe.base": base.path.name, "moe.experts": names}
        if s.router_fit_steps:
            texts = [
                [
                    conversation(tokenizer, x)[0]
                    for x in get_task(e.task).examples("train", s.prompts_per_expert)
                ]
                if e.task
                else [(tokenizer.bos_token or "") + p for p in e.positive_prompts]
                for _, e in experts
            ]
            metrics["moe.router_fit_accuracy"] = fit_router(st.dir, texts, s.router_fit_steps)
        check_finite(st.dir)
        metrics["moe.duplicate_experts"] = check_experts(st.dir, upcycling)["duplicates"]
        tasks = s.routing_tasks or list(dict.fromkeys(e.task for _, e in experts if e.task))
        report = routing_report(st.dir, tasks, s.routing_n) if tasks else {}
        if report:
            print_routing(report, names)
        for task, layers in report.items():
            for e, name in enumerate(names):
                shares = [layer[e] for layer in layers]
                metrics[f"moe.routing.{task}.{name}"] = sum(shares) / len(shares)
                metrics[f"moe.routing_layers.{task}.{name}"] = shares
        parents = {c.path: c for c in [base] + [c for c, _ in experts]}
        return st.commit(
            stage=STAGE,
            format="hf",
            settings=s,
            parents=list(parents.values()),
            seed=s.seed,
            metrics=metrics,
        )
