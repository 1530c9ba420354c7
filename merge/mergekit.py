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

from pydantic import BaseModel, ConfigDict, Field, field_validator

from polm.checkpoint import Checkpoint, shared_ancestor, staging
from polm.errors import PolmError
from polm.settings import StageSettings, check_choice
from polm.stage import carry_files

STAGE = "merge.mergekit"

# mergekit 0.1.5's methods that merge same-architecture dense models (passthrough, which stacks
# layer slices, and the RAM family, made for RL-tuned weights, are left out)
METHODS = (
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

    def model_paths(self) -> list[str]:
        """Paths named in the settings, for a mergekit YAML run without ``--from``."""
        refs = [m.model for m in self.models or []]
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
    known = {p.name: p for p in spec.parameters}
    for where, params in [("parameters", s.parameters)] + [
        (f"models[{c.path.name}].parameters", p) for c, p in entries
    ]:
        for key in params:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                raise PolmError(
                    f"{STAGE}: {where}: {key!r} is not a parameter of {s.merge_method}"
                    f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; it takes: "
                    f"{', '.join(known) or 'none'}."
                )
    for p in spec.parameters:
        if not p.required or p.name in s.parameters:
            continue
        if p.scope.value == "shared":
            raise PolmError(f"{STAGE}: {s.merge_method} needs parameters.{p.name}.")
        for _, params in entries:  # per-model parameter, e.g. weight: default 1 (equal weights)
            params.setdefault(p.name, 1.0)

    cfg: dict[str, Any] = {
        "merge_method": s.merge_method,
        "dtype": s.dtype,
        "models": [{"model": str(c.path), "parameters": p} for c, p in entries],
    }
    if s.out_dtype:
        cfg["out_dtype"] = s.out_dtype
    if s.parameters:
        cfg["parameters"] = dict(s.parameters)
    if base is not None:
        cfg["base_model"] = str(base.path)
    if s.tokenizer_source:
        cfg["tokenizer_source"] = s.tokenizer_source
    used = ([base] if base is not None else []) + [c for c, _ in entries]
    return cfg, list({c.path: c for c in used}.values())


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
                "merge.models": ", ".join(Path(m["model"]).name for m in cfg["models"]),
            },
        )
