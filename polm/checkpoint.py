"""The one contract between stages: a checkpoint directory with a ``polm.json`` manifest.

A checkpoint is a Hugging Face model directory (or the layout its format's consumer expects)
plus the manifest, which records the stage and settings that made it, its format, its parents
with their content hashes, library versions, the seed and its metrics.

Writes are atomic: a stage writes into a hidden temporary sibling, the manifest goes in last,
and the directory is renamed into place only when complete. A directory without a valid
manifest is never taken as a checkpoint, so an interrupted stage cannot leave a half
checkpoint that looks whole.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from polm.errors import PolmError

MANIFEST = "polm.json"
# the trainer's log history (loss, lr, rewards per logged step): a record of how the weights
# were made, like the manifest, so not part of the content hash. A stage resumed from a saved
# step writes the same weights as an uninterrupted run but a different log (transformers and TRL
# do not save their logging accumulators), and must not make every stage downstream re-run.
TRAIN_LOG = "train_log.json"
RECORDS = (MANIFEST, TRAIN_LOG)
FORMATS = ("hf", "peft-adapter", "bottleneck-adapter", "gptq", "onebit", "onnx", "gguf")
# the files that hold a checkpoint's weights, in every format
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".data", ".gguf")
TRACKED_LIBRARIES = (
    "polm",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "safetensors",
    "tokenizers",
    "mergekit",
    "gptqmodel",
    "optimum",
    "onnxruntime",
    "onnxruntime-genai",
    "llama-cpp-python",
)


class Parent(BaseModel):
    path: str = Field(description="Where the parent checkpoint was when this one was made.")
    content_hash: str = Field(description="The parent's content hash at that time.")
    stage: str = Field(description="The stage that made the parent.")


class Manifest(BaseModel):
    """The contents of ``polm.json``."""

    model_config = ConfigDict(extra="allow")  # newer writers may add fields; keep them

    stage: str = Field(description="Dotted stage name, e.g. 'align.sft' or 'import'.")
    format: str = Field(description=f"One of {FORMATS}.")
    settings: dict[str, Any] = Field(default_factory=dict)
    parents: list[Parent] = Field(default_factory=list)
    seed: int | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    content_hash: str = ""
    input_hash: str | None = Field(
        default=None,
        description="Hash of stage, settings and parents' content hashes, set by "
        "the recipe runner so an unchanged stage is skipped.",
    )
    metrics: dict[str, Any] = Field(default_factory=dict)
    created: str = ""


class Checkpoint:
    """A finished checkpoint on disk. Opening one validates its manifest."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = Path(path).absolute()
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike) -> Checkpoint:
        path = Path(path)
        if not path.is_dir():
            raise PolmError(f"no checkpoint at {path}: it is not a directory.")
        mf = path / MANIFEST
        if not mf.is_file():
            raise PolmError(
                f"{path} is not a polm checkpoint: it has no {MANIFEST}. A directory without a "
                "manifest may be an interrupted write and is never used as an input; bring an "
                f"outside model in with `polm import {path} --out DIR`."
            )
        try:
            manifest = Manifest.model_validate_json(mf.read_text())
        except (ValidationError, ValueError) as e:
            raise PolmError(f"{mf} is not a valid polm manifest ({_first_line(e)}).") from None
        return cls(path, manifest)

    @property
    def format(self) -> str:
        return self.manifest.format

    @property
    def stage(self) -> str:
        return self.manifest.stage

    def require_format(self, *formats: str, stage: str) -> None:
        """Refuse an input of the wrong format before any weights are loaded."""
        if self.format not in formats:
            raise PolmError(
                f"{stage} expects a checkpoint of format {' or '.join(map(repr, formats))}, but "
                f"{self.path} has format {self.format!r} (made by {self.stage})."
            )

    def update_metrics(self, metrics: dict[str, Any], **fields: Any) -> None:
        """Merge ``metrics`` (and set other manifest fields) with an atomic rewrite."""
        self.manifest.metrics.update(metrics)
        for k, v in fields.items():
            setattr(self.manifest, k, v)
        # the new manifest is written beside the checkpoint, not in it: a kill before the rename
        # leaves a `.<name>.*` sibling (which `polm run` cleans up), never a file inside the
        # checkpoint that its content hash would count
        tmp = self.path.with_name(f".{self.path.name}.{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}")
        write_json_atomic(self.path / MANIFEST, self.manifest.model_dump(mode="json"), tmp)

    def verify(self) -> None:
        """Raise if the files no longer match the manifest's content hash."""
        actual = content_hash(self.path)
        if actual != self.manifest.content_hash:
            raise PolmError(
                f"{self.path} was modified after it was written: content hash {actual[:12]} "
                f"does not match the manifest's {self.manifest.content_hash[:12]}."
            )

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, stage={self.stage!r}, format={self.format!r})"


def content_hash(path: Path) -> str:
    """SHA-256 over every file's relative path and bytes, the records (manifest, training log)
    excluded."""
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in RECORDS):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Installed versions of the tracked libraries, read once per process: every manifest
    records them, and reading 14 packages' metadata took 54 ms a commit, 10% of a tiny-base
    merge (bench/overhead.py)."""
    return dict(_library_versions())


@functools.cache
def _library_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class Staging:
    """A temporary sibling directory that becomes a checkpoint on :meth:`commit`."""

    def __init__(self, out: Path):
        self.out = Path(out).absolute()
        self.dir = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"

    def commit(
        self,
        *,
        stage: str,
        format: str,
        settings: dict | BaseModel | None = None,
        parents: list[Checkpoint] = (),
        seed: int | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> Checkpoint:
        if format not in FORMATS:
            raise ValueError(f"unknown checkpoint format {format!r}")
        if isinstance(settings, BaseModel):
            settings = settings.model_dump(mode="json")
        manifest = Manifest(
            stage=stage,
            format=format,
            settings=settings or {},
            seed=seed,
            parents=[
                Parent(path=str(p.path), content_hash=p.manifest.content_hash, stage=p.stage)
                for p in parents
            ],
            versions=library_versions(),
            content_hash=content_hash(self.dir),
            metrics=dict(metrics or {}),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        manifest.metrics.setdefault("size_bytes", weights_bytes(self.dir))
        # the manifest goes in last: until it exists the directory is not a checkpoint
        write_json_atomic(self.dir / MANIFEST, manifest.model_dump(mode="json"))
        _replace_dir(self.dir, self.out)
        return Checkpoint(self.out, manifest)


@contextmanager
def staging(out: str | os.PathLike):
    """Write a checkpoint atomically::

        with staging(out) as st:
            model.save_pretrained(st.dir)
            ckpt = st.commit(stage="align.sft", format="hf", settings=s, parents=inputs)

    On an exception (or without a commit) the temporary directory is removed.
    """
    st = Staging(Path(out))
    st.dir.parent.mkdir(parents=True, exist_ok=True)
    st.dir.mkdir()
    try:
        yield st
    finally:
        if st.dir.exists():
            shutil.rmtree(st.dir, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    trash = None
    if dst.exists():
        trash = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, trash)
    os.rename(src, dst)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def write_json_atomic(path: Path, data: Any, tmp: Path | None = None) -> None:
    """Write ``data`` to ``path`` in one rename, through ``tmp`` (default: a hidden sibling of
    ``path``; it must be on the same file system)."""
    tmp = tmp or path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


DTYPE_BYTES = {"U8": 1, "I8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4,
               "F64": 8, "I64": 8}  # fmt: skip


def tensor_specs(path: str | os.PathLike) -> dict[str, tuple[str, list[int]]]:
    """``{name: (safetensors dtype, shape)}`` of every tensor in a directory's safetensors
    files (or one file), read from the headers without loading any weight."""
    from safetensors import safe_open

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    specs = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                specs[key] = (t.get_dtype(), list(t.get_shape()))
    return specs


def check_safetensors(path: Path) -> None:
    """Read every tensor header and check the data fits the file: corrupt files fail here."""
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(f, framework="pt") as sf:
                for k in sf.keys():
                    sf.get_slice(k).get_shape()
        except Exception as e:  # safetensors raises several error types for bad files
            raise PolmError(
                f"{f} is not a valid safetensors file ({str(e).splitlines()[0]}); "
                "the download or copy may be truncated."
            ) from None


def numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def stored_params(path: str | os.PathLike) -> int:
    """Parameters stored in a checkpoint's safetensors files, counted from their headers."""
    return sum(numel(shape) for _, shape in tensor_specs(path).values())


def weights_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a checkpoint's weight files."""
    return sum(
        f.stat().st_size
        for f in Path(path).rglob("*")
        if f.is_file() and f.suffix in WEIGHT_SUFFIXES
    )


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def lineage(ckpt: Checkpoint) -> list[tuple[int, Checkpoint | Parent]]:
    """Depth-first list of (depth, node) from ``ckpt`` back through its parents' manifests.

    A parent that is no longer on disk (or changed since) is listed from the child's record.
    """
    out: list[tuple[int, Checkpoint | Parent]] = []

    def walk(node: Checkpoint, depth: int) -> None:
        out.append((depth, node))
        for p in node.manifest.parents:
            try:
                parent = Checkpoint.open(p.path)
            except PolmError:
                out.append((depth + 1, p))
                continue
            if parent.manifest.content_hash != p.content_hash:
                out.append((depth + 1, p))
                continue
            walk(parent, depth + 1)

    walk(ckpt, 0)
    return out


def shared_ancestor(inputs: list[Checkpoint]) -> Checkpoint | None:
    """The nearest checkpoint every input descends from (or is), found through the manifests;
    None when the lineages do not meet on disk."""
    chains = []
    for c in inputs:
        chain = {}
        for depth, node in lineage(c):
            if isinstance(node, Checkpoint):
                chain.setdefault(node.manifest.content_hash, (depth, node))
        chains.append(chain)
    common = set(chains[0]).intersection(*chains[1:])
    if not common:
        return None
    best = min(common, key=lambda h: (max(ch[h][0] for ch in chains), h))
    return chains[0][best][1]
