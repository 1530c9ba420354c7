"""Model merging with mergekit's Python API (``run_merge``): every method mergekit ships that fits
dense causal LMs of one architecture.

Settings use mergekit's own names and shape, so a mergekit YAML runs unchanged apart from its
model paths, which must be polm checkpoints (``polm merge mergekit --config merge.yml --out DIR``
takes the models from the file)::

    merge_method: ties
    base_model: base            # an input: its recipe name, its path or its position
    models:
      - model: add_expert
        parameters: {weight: 1.0, density: 0.5}
      - model: reverse_expert
        parameters: {weight: 1.0, density: 0.5}
    parameters: {normalize: true}
    dtype: float32

polm's additions: ``models`` may be left out (every input but the base, ``weight: 1``); a method
that needs a base gets the inputs' nearest shared ancestor from their lineage when
``base_model`` is not given; parameter names are checked against the method before any weight is
read; ``seed`` seeds the stochastic methods (DARE, DELLA), so the same seed writes the same
bytes; the output is checked for NaN/Inf before it is committed; every model merged, the base
included, is a parent in the manifest. Memory stays near the size of one input: each input's
memory-mapped file is closed after every read, and the output is written in files of an eighth
of the largest input (``out_shard_size``; mergekit holds a whole file's tensors until it writes
it, and its default is 5 GB).

mergekit's ``slices`` work as mergekit writes them: each output slice merges its sources'
layer ranges, and the output's layers are the slices' in order. That is how a gradient
``slerp`` over layer groups is written, and with ``merge_method: passthrough`` (layers copied
as they are) how a model is stacked: depth up-scaling from one base, or a frankenmerge of
several. Each source's layer range is checked against its model's depth, and each slice's
inputs against the method, before any weight is read; every source is a parent::

    slices:
      - sources:
          - {model: base, layer_range: [0, 4]}
      - sources:
          - {model: base, layer_range: [2, 4]}
    merge_method: passthrough     # 6 layers from a 4-layer base
    dtype: float32

Methods: Wortsman et al. 2022 (model soups, ``linear``), Ilharco et al. 2023 (task arithmetic),
Yadav et al. 2023 (TIES), Yu et al. 2024 (DARE), Jang et al. 2024 (model stock), Deep et al.
2024 (DELLA), Davari & Belilovsky 2024 (breadcrumbs), and the spherical family (``slerp``,
``nuslerp``, ``multislerp``, ``karcher``); see mergekit's docs for each method's parameters.
"""

from __future__ import annotations

import contextlib
import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from polm.checkpoint import Checkpoint, shared_ancestor, staging
from polm.errors import PolmError
from polm.settings import StageSettings, check_choice
from polm.stage import carry_files

STAGE = "merge.mergekit"

# mergekit 0.1.5's methods that merge same-architecture dense models (the RAM family, made for
# RL-tuned weights, is left out); passthrough copies layer slices as they are (layer stacking)
METHODS = (
    "passthrough",
    "linear",
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "della",
    "della_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "model_stock",
    "sce",
    "nearswap",
    "arcee_fusion",
)


class ModelEntry(BaseModel):
    """One entry of mergekit's ``models`` list."""

    model_config = ConfigDict(extra="forbid")

    model: str | int = Field(description="An input: recipe name, checkpoint path or position.")
    parameters: dict[str, Any] = Field(default_factory=dict)


class SliceSource(BaseModel):
    """One source of an output slice: layers ``[start, end)`` of a model."""

    model_config = ConfigDict(extra="forbid")

    model: str | int = Field(description="An input: recipe name, checkpoint path or position.")
    layer_range: tuple[int, int] = Field(description="The layers [start, end) it contributes.")
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class SliceEntry(BaseModel):
    """One entry of mergekit's ``slices`` list: an output slice merged from its sources' layer
    ranges (all of one length), in order: the output's layers are the slices' one after another."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | int | None = None
    residual_weight: float | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


def shard_bytes(v: int | str) -> int:
    """mergekit's size syntax (its ``parse_kmb``): an integer, or one with a K, M or B suffix
    (thousand, million, billion); 0 for anything else."""
    if isinstance(v, int):
        return v
    text = str(v).strip().upper()
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    return int(digits) * scale if digits.isdigit() else 0


class MergekitSettings(StageSettings):
    """Settings of ``merge.mergekit``: mergekit's configuration fields, plus ``seed``."""

    merge_method: str = Field(description=f"One of: {', '.join(METHODS)}.")
    base_model: str | int | None = Field(
        default=None,
        description="The base (for task-vector methods, slerp, model_stock): an input's recipe "
        "name, path or position; default: the inputs' nearest shared ancestor.",
    )
    models: list[ModelEntry] | None = Field(
        default=None, description="Models and their parameters; default every non-base input."
    )
    slices: list[SliceEntry] | None = Field(
        default=None,
        description="Instead of models: the output's layers slice by slice, each merged from "
        "its sources' layer ranges (mergekit's slices: gradient merges over layer groups, "
        "frankenmerges, and with passthrough layer stacking).",
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="Parameters shared by all models (mergekit's names)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Dtype the merge computes in."
    )
    out_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        default=None, description="Dtype of the written weights (default: dtype)."
    )
    tokenizer_source: str | None = Field(
        default=None,
        description="mergekit's tokenizer_source (base, union, or a model); default: copy the "
        "base's (or first model's) tokenizer unchanged.",
    )
    seed: int = Field(default=0, description="Seed for stochastic methods (DARE, DELLA).")
    out_shard_size: int | str | None = Field(
        default=None,
        description="Largest output safetensors file, in bytes, with mergekit's K/M/B suffixes "
        "(mergekit's --out-shard-size). mergekit's writer holds one file's tensors in memory "
        "until it writes it, so this bounds the merge's own memory; default: an eighth of the "
        "largest input, between 64M and 2B.",
    )

    @field_validator("out_shard_size")
    @classmethod
    def _shard_size(cls, v: int | str | None) -> int | str | None:
        if v is not None and shard_bytes(v) < 10**6:
            raise ValueError(f"must be at least 1M (bytes, e.g. 512M or 2B), got {v!r}")
        return v

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return check_choice("merge_method", v, METHODS)

    @model_validator(mode="after")
    def _models_or_slices(self):
        if self.models is not None and self.slices is not None:
            raise ValueError("give models or slices, not both (as mergekit takes them)")
        if self.merge_method == "passthrough" and self.slices is None:
            raise ValueError("passthrough copies layer slices: give slices")
        return self

    def model_paths(self) -> list[str]:
        """Paths named in the settings, for a mergekit YAML run without ``--from``."""
        refs = [m.model for m in self.models or []]
        for piece in self.slices or []:
            refs += [piece.base_model] if piece.base_model is not None else []
            refs += [src.model for src in piece.sources]
        if self.base_model is not None:
            refs.insert(0, self.base_model)
        return [r for r in dict.fromkeys(refs) if isinstance(r, str)]


def resolve(ref: str | int, inputs: list[Checkpoint], what: str, stage: str = STAGE) -> Checkpoint:
    """An input named by position, path or recipe name (the checkpoint directory's name)."""
    if isinstance(ref, int):
        if not 0 <= ref < len(inputs):
            raise PolmError(
                f"{stage}: {what} {ref} is not an input position (0..{len(inputs) - 1})."
            )
        return inputs[ref]
    path = Path(ref).expanduser().absolute()
    for c in inputs:
        if c.path == path:
            return c
    named = [c for c in inputs if c.path.name == ref]
    if len(named) == 1:
        return named[0]
    names = ", ".join(c.path.name for c in inputs)
    if len(named) > 1:
        raise PolmError(f"{stage}: {what} {ref!r} names several inputs; give its path.")
    raise PolmError(f"{stage}: {what} {ref!r} is not one of the inputs ({names}).")


def method_spec(name: str):
    from mergekit.merge_methods.registry import registered_methods

    for m in registered_methods():
        if m.spec.name == name:
            return m.spec
    raise PolmError(f"{STAGE}: mergekit {_mergekit_version()} has no method {name!r}.")


def _mergekit_version() -> str:
    from importlib.metadata import version

    return version("mergekit")


def plan(s: MergekitSettings, inputs: list[Checkpoint]) -> tuple[dict, list[Checkpoint]]:
    """mergekit's configuration for these inputs, and every checkpoint it reads (base first)."""
    if s.slices is not None:
        return plan_slices(s, inputs)
    spec = method_spec(s.merge_method)
    base_policy = spec.contract.base.value  # required | optional | ignored
    base = None
    if s.base_model is not None:
        if base_policy == "ignored":
            raise PolmError(f"{STAGE}: {s.merge_method} takes no base_model; leave it out.")
        base = resolve(s.base_model, inputs, "base_model")
    elif base_policy != "ignored":
        base = shared_ancestor(inputs)
        if base_policy == "optional" and all(base is None or c.path != base.path for c in inputs):
            base = None  # optional: only an input that is the others' ancestor
        elif base is None and base_policy == "required":
            raise PolmError(
                f"{STAGE}: {s.merge_method} needs a base_model and the inputs share no ancestor "
                "on disk; name one (an input's recipe name, path or position)."
            )
    if s.models is not None:
        entries = [(resolve(m.model, inputs, "model"), dict(m.parameters)) for m in s.models]
    else:
        entries = [(c, {}) for c in inputs if base is None or c.path != base.path]
    if not entries:
        raise PolmError(f"{STAGE}: nothing to merge: every input is the base.")

    _check_counts(s.merge_method, spec.contract, base, len(entries))
    _check_parameters(s.merge_method, spec, [("parameters", s.parameters)] + [
        (f"models[{c.path.name}].parameters", p) for c, p in entries
    ])  # fmt: skip
    for p in spec.parameters:
        if not p.required or p.name in s.parameters:
            continue
        if p.scope.value == "shared":
            raise PolmError(f"{STAGE}: {s.merge_method} needs parameters.{p.name}.")
        for _, params in entries:  # per-model parameter, e.g. weight: default 1 (equal weights)
            params.setdefault(p.name, 1.0)

    models = [{"model": str(c.path), "parameters": p} for c, p in entries]
    used = ([base] if base is not None else []) + [c for c, _ in entries]
    return _config(s, base, models=models), list({c.path: c for c in used}.values())


def _config(s: MergekitSettings, base: Checkpoint | None, **inputs) -> dict[str, Any]:
    """mergekit's configuration: the method, dtypes, shared parameters, base and tokenizer
    source from the settings, with the inputs (``models=`` or ``slices=``) as planned."""
    cfg: dict[str, Any] = {"merge_method": s.merge_method, "dtype": s.dtype, **inputs}
    if s.out_dtype:
        cfg["out_dtype"] = s.out_dtype
    if s.parameters:
        cfg["parameters"] = dict(s.parameters)
    if base is not None:
        cfg["base_model"] = str(base.path)
    if s.tokenizer_source:
        cfg["tokenizer_source"] = s.tokenizer_source
    return cfg


def plan_slices(s: MergekitSettings, inputs: list[Checkpoint]) -> tuple[dict, list[Checkpoint]]:
    """:func:`plan` for a configuration by ``slices``: each source resolved to an input, its
    layer range checked against that model's depth, each slice's inputs counted against the
    method, and parameter names checked, all before any weight is read."""
    spec = method_spec(s.merge_method)
    ignored = spec.contract.base.value == "ignored"
    if ignored and (s.base_model is not None or any(x.base_model is not None for x in s.slices)):
        raise PolmError(f"{STAGE}: {s.merge_method} takes no base_model; leave it out.")
    top = None if s.base_model is None else resolve(s.base_model, inputs, "base_model")
    checks = [("parameters", s.parameters)]
    used = [top] if top is not None else []
    slices = []
    for i, piece in enumerate(s.slices):
        where = f"slices[{i}]"
        base = top
        if piece.base_model is not None:
            base = resolve(piece.base_model, inputs, f"{where}.base_model")
        sources, lengths = [], set()
        for j, src in enumerate(piece.sources):
            c = resolve(src.model, inputs, f"{where}.sources[{j}].model")
            start, end = src.layer_range
            depth = _depth(c)
            if depth is not None and end > depth:
                raise PolmError(
                    f"{STAGE}: {where}.sources[{j}]: layer_range [{start}, {end}] is past "
                    f"{c.path.name}'s {depth} layers."
                )
            lengths.add(end - start)
            checks.append((f"{where}.sources[{j}].parameters", src.parameters))
            entry: dict[str, Any] = {"model": str(c.path), "layer_range": [start, end]}
            if src.parameters:
                entry["parameters"] = dict(src.parameters)
            sources.append(entry)
            used.append(c)
        if len(lengths) > 1:
            raise PolmError(
                f"{STAGE}: {where}: its sources' layer ranges differ in length "
                f"({', '.join(str(n) for n in sorted(lengths))}); a slice merges layer by layer."
            )
        n_base = base is not None and any(e["model"] == str(base.path) for e in sources)
        if base is not None and not n_base and not ignored:
            raise PolmError(
                f"{STAGE}: {where}: the base {base.path.name} is none of its sources; "
                "add its layer range to the slice's sources."
            )
        _check_counts(
            f"{s.merge_method} ({where})", spec.contract, base if n_base else None,
            len(sources) - n_base,
        )  # fmt: skip
        checks.append((f"{where}.parameters", piece.parameters))
        out: dict[str, Any] = {"sources": sources}
        if piece.base_model is not None:
            out["base_model"] = str(base.path)
            used.append(base)
        if piece.residual_weight is not None:
            out["residual_weight"] = piece.residual_weight
        if piece.parameters:
            out["parameters"] = dict(piece.parameters)
        slices.append(out)
    _check_parameters(s.merge_method, spec, checks)
    for p in spec.parameters:
        if p.required and p.scope.value == "shared" and p.name not in s.parameters:
            if not all(p.name in x.parameters for x in s.slices):
                raise PolmError(f"{STAGE}: {s.merge_method} needs parameters.{p.name}.")
    return _config(s, top, slices=slices), list({c.path: c for c in used}.values())


def _depth(c: Checkpoint) -> int | None:
    """The model's number of decoder layers (its config.json), where it says."""
    import json

    config = c.path / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    data = data.get("text_config", data)
    n = data.get("num_hidden_layers")
    return n if isinstance(n, int) else None


def _check_parameters(method: str, spec, where_params: list[tuple[str, dict]]) -> None:
    """Every parameter name is one the method takes (with a suggestion for a typo)."""
    known = {p.name: p for p in spec.parameters}
    for where, params in where_params:
        for key in params:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                raise PolmError(
                    f"{STAGE}: {where}: {key!r} is not a parameter of {method}"
                    f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; it takes: "
                    f"{', '.join(known) or 'none'}."
                )


def _check_counts(method: str, contract, base: Checkpoint | None, n_models: int) -> None:
    """mergekit's input contract for the method, checked before any weight is read."""
    total = n_models + (base is not None)
    limits = [
        ("models in all, base included", total, contract.min_inputs, contract.max_inputs),
        ("models besides the base", n_models, contract.min_non_base, contract.max_non_base),
    ]
    for what, n, lo, hi in limits:
        if (lo is not None and n < lo) or (hi is not None and n > hi):
            want = f"exactly {lo}" if lo == hi else f"{lo or 0} to {hi if hi else 'any number'}"
            raise PolmError(
                f"{STAGE}: {method} merges {want} {what}, got {n} "
                f"({'base ' + base.path.name if base else 'no base'}, {n_models} other)."
            )


# Below this size an input's mapped pages are small next to the interpreter's own RSS (~480 MB
# with torch and mergekit imported), and reopening its shard at every read costs more than it
# saves: 8% of a tiny-base merge's time (bench/overhead.py).
CLOSE_SHARDS_FROM_BYTES = 64 * 2**20


@contextlib.contextmanager
def shards_closed_between_reads(enabled: bool = True):
    """mergekit reads each input through a ``LazyTensorLoader`` that keeps its current shard
    open, a safetensors memory map, until the merge ends; every page read stays mapped, so a
    merge's resident memory grows by the whole of every input (its own copies aside). Closing
    the shard after each read (reopening costs a header parse) keeps the bytes the same and
    drops that: a TIES merge of three 190 MB single-file checkpoints peaked at 1371 MB RSS
    with the shards open and 851 MB with them closed, in the same time (bench/merge_memory.py).
    """
    if not enabled:
        yield
        return
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader

    get = LazyTensorLoader.get_tensor

    def get_and_close(self, *args, **kwargs):
        try:
            return get(self, *args, **kwargs)
        finally:
            self.flush()

    LazyTensorLoader.get_tensor = get_and_close
    try:
        yield
    finally:
        LazyTensorLoader.get_tensor = get


def out_shard_bytes(s: MergekitSettings, largest: int) -> int:
    """The output file size: the setting, or an eighth of the largest input (``largest``
    bytes) within [64M, 2B]. On a 947 MB TIES job, 512M files peaked 1033 MB over the
    interpreter and 128M files 560 MB (bench/merge_memory.py); mergekit's own default (5B)
    holds the whole output."""
    if s.out_shard_size is not None:
        return shard_bytes(s.out_shard_size)
    return min(2 * 10**9, max(64 * 10**6, largest // 8))


def merge_options(s: MergekitSettings, largest: int):
    """The ``MergeOptions`` the stage runs mergekit with (``largest``: the largest input's
    weight bytes)."""
    from mergekit.merge import MergeOptions

    return MergeOptions(
        random_seed=s.seed,
        copy_tokenizer=s.tokenizer_source is not None,
        trust_remote_code=False,
        lazy_unpickle=False,
        safe_serialization=True,
        allow_crimes=False,
        device="cpu",
        quiet=True,
        write_model_card=False,
        out_shard_size=out_shard_bytes(s, largest),
    )


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def check_finite(path: Path, stage: str = STAGE) -> None:
    """Refuse to commit weights with NaN or Inf (a merge can produce them, e.g. slerp of
    opposite vectors, a bad normalization or an overflowing adapter scale)."""
    import torch
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            names = list(st.keys())
        for name in names:
            # one tensor per opening: a file held open keeps every page read mapped, which
            # added the whole output to the stage's peak RSS (bench/merge_memory.py)
            with safe_open(f, "pt") as st:
                t = st.get_tensor(name)
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise PolmError(f"{stage}: the merged tensor {name} has NaN or Inf values.")


def _described(cfg: dict) -> str:
    """The models merged, as the manifest's ``merge.models`` says it: names, and with slices
    each slice's sources and layer ranges (``a[0:4] + b[0:4] | a[2:4]``)."""
    if "models" in cfg:
        return ", ".join(Path(m["model"]).name for m in cfg["models"])
    return " | ".join(
        " + ".join(
            f"{Path(src['model']).name}[{src['layer_range'][0]}:{src['layer_range'][1]}]"
            for src in piece["sources"]
        )
        for piece in cfg["slices"]
    )


def run(inputs: list[Checkpoint], settings: MergekitSettings, out: Path) -> Checkpoint:
    s = settings
    if not inputs:
        raise PolmError(f"{STAGE} needs the models to merge: --from CKPT... or a models list.")
    for c in inputs:
        if c.format == "peft-adapter":
            raise PolmError(
                f"{STAGE}: {c.path} is a PEFT adapter; fold it into its base with merge.lora "
                "first (or combine adapters there)."
            )
        c.require_format("hf", stage=STAGE)
    cfg, used = plan(s, inputs)

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    try:
        config = MergeConfiguration.model_validate(cfg)
    except Exception as e:  # pydantic's error, in mergekit's words
        raise PolmError(f"{STAGE}: mergekit refused the configuration: {e}") from None
    largest = max(weights_bytes(c.path) for c in used)
    options = merge_options(s, largest)
    with staging(out) as st:
        try:
            with shards_closed_between_reads(largest >= CLOSE_SHARDS_FROM_BYTES):
                run_merge(config, str(st.dir), options=options)
        except (RuntimeError, ValueError, KeyError) as e:
            raise PolmError(f"{STAGE}: mergekit failed on {s.merge_method}: {e}") from e
        if s.tokenizer_source is None:
            carry_files(used[0].path, st.dir)
        check_finite(st.dir)
        return st.commit(
            stage=STAGE,
            format="hf",
            settings=s,
            parents=used,
            seed=s.seed,
            metrics={
                "merge.method": s.merge_method,
                "merge.base": cfg.get("base_model") and Path(cfg["base_model"]).name,
                "merge.models": _described(cfg),
            },
        )
