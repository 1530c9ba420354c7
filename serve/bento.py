"""Bentos that carry their model: a polm checkpoint inside a bento, as a BentoML model.

    polm package bento CKPT --out DIR [--tar]

The checkpoint is saved as a BentoML model (``polm-<name>:<content hash>``: the checkpoint's
files under ``checkpoint/``, its lineage in ``lineage.json``, since the parents stay behind),
and a bento is built around it, the way BentoVLLM packs its weights: the service names the model
through a bento argument (``bento_model``), and ``bentoml build`` packs what it names. The bento
holds only the code serving needs: the service's own import closure within ``serve`` and
``polm`` (read from the code, lazy imports included), none of the training, merging or
optimization stages; its ``requirements.txt`` is the serving requirements of the checkpoint's
backend.

The bento lands in the local BentoML store (``bentoml containerize polm-<name>:<version>``
works at once), and is copied to ``DIR``: ``bentoml serve DIR`` serves it from anywhere, with
the original checkpoint gone. ``--tar`` also writes ``DIR.bento``, the archive ``bentoml
import`` takes.
"""

from __future__ import annotations

import contextlib
import json
import modulefinder
import re
import shutil
import tempfile
from pathlib import Path

from polm.checkpoint import Checkpoint
from polm.errors import PolmError

SERVICE = "serve.service:Polm"
CHECKPOINT_DIR = "checkpoint"  # inside the BentoML model
LINEAGE = "lineage.json"
PACKAGES = ("polm", "serve")  # the code a bento may carry; never align / merge / optimize
# what the backend of a checkpoint format does not import, of serve/requirements.txt
NOT_NEEDED = {
    "gguf": {"torch", "transformers", "peft", "onnxruntime-genai", "onnxruntime"},
    "onnx": {"torch", "transformers", "peft", "llama-cpp-python"},
}
NOT_NEEDED_BY_TORCH = {"llama-cpp-python", "onnxruntime-genai", "onnxruntime"}  # other formats


def _root() -> Path:
    """The directory that holds the ``serve`` and ``polm`` packages (the repository or
    site-packages)."""
    return Path(__file__).resolve().parent.parent


def serving_modules() -> list[Path]:
    """The files of the service's import closure within polm's own packages, relative to
    :func:`_root`: every module ``serve.service`` can import, directly or lazily, that lives in
    ``serve`` or ``polm`` (other imports are third-party, installed from requirements)."""

    class Finder(modulefinder.ModuleFinder):
        def import_hook(self, name, caller=None, fromlist=None, level=-1):
            if level in (-1, 0) and name.split(".")[0] not in PACKAGES:
                return None  # third-party or standard library: not carried
            return super().import_hook(name, caller, fromlist, level)

    root = _root()
    finder = Finder(path=[str(root)])
    finder.run_script(str(root / "serve" / "service.py"))
    files = {Path(m.__file__).resolve() for m in finder.modules.values() if m.__file__}
    files.add(root / "serve" / "service.py")
    return sorted(f.relative_to(root) for f in files if f.is_relative_to(root))


def requirements(fmt: str) -> str:
    """``serve/requirements.txt`` without what the backend of checkpoint format ``fmt`` does
    not import."""
    drop = NOT_NEEDED.get(fmt, NOT_NEEDED_BY_TORCH)
    lines = []
    for line in (_root() / "serve" / "requirements.txt").read_text().splitlines():
        name = re.split(r"[=<>~!\[ ;#]", line.strip(), maxsplit=1)[0].lower()
        if name and name not in drop:
            lines.append(line.split("#")[0].strip())
    return "\n".join(lines) + "\n"


def _name(ckpt: Checkpoint) -> str:
    name = re.sub(r"[^a-z0-9_.-]+", "-", ckpt.path.name.lower()).strip("-._") or "model"
    return f"polm-{name}"[:60]


def save_model(ckpt: Checkpoint):
    """The checkpoint as a BentoML model in the local store (kept if already there: its
    version is the content hash, so the same tag always holds the same files)."""
    import bentoml
    from bentoml.exceptions import NotFound

    from serve.state import lineage_records

    tag = f"{_name(ckpt)}:{ckpt.manifest.content_hash[:20]}"
    try:
        return bentoml.models.get(tag)
    except NotFound:
        pass
    meta = {
        "name": ckpt.path.name,  # the served model name
        "format": ckpt.format,
        "stage": ckpt.stage,
        "content_hash": ckpt.manifest.content_hash,
    }
    with bentoml.models.create(tag, labels={"polm.format": ckpt.format}, metadata=meta) as m:
        shutil.copytree(ckpt.path, Path(m.path) / CHECKPOINT_DIR)
        (Path(m.path) / LINEAGE).write_text(json.dumps(lineage_records(ckpt), indent=2))
    return m


def packed_checkpoint(tag: str) -> tuple[str, str, list[dict]]:
    """The checkpoint directory, served name and lineage a bento's BentoML model ``tag`` holds
    (looked up in the bento's own model store when a bento is served)."""
    import bentoml

    model = bentoml.models.get(tag)
    path = Path(model.path)
    lineage = json.loads((path / LINEAGE).read_text())
    return str(path / CHECKPOINT_DIR), model.info.metadata["name"], lineage


def package_bento(ckpt: Checkpoint | str, out: str | Path, tar: bool = False) -> Path:
    """Build the bento of a checkpoint into the local BentoML store and copy it to ``out``
    (and ``out.bento`` with ``tar``); returns ``out``."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    if not isinstance(ckpt, Checkpoint):
        ckpt = Checkpoint.open(ckpt)
    ckpt.verify()  # never package a checkpoint that changed after it was written
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    model = save_model(ckpt)
    root = _root()
    with tempfile.TemporaryDirectory(prefix="polm-bento-", dir=out.parent) as tmp:
        ctx = Path(tmp) / "ctx"
        static = [f.relative_to(root) for f in (root / "serve" / "static").glob("*")]
        for rel in [*serving_modules(), *static]:
            (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, ctx / rel)
        (ctx / "requirements.txt").write_text(requirements(ckpt.format))
        staged = Path(tmp) / "bento"  # renamed into place when whole, like a checkpoint
        try:
            with contextlib.chdir(ctx):  # BentoML reads requirements_txt relative to the cwd
                bento = _build(ckpt, model, ctx)
            # a folder export carries the models (the store's copy of a bento only names them)
            bentoml.bentos.export_bento(bento.tag, str(staged), output_format="folder")
        except BentoMLException as e:
            raise PolmError(f"bentoml could not build the bento of {ckpt.path}: {e}") from None
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    if tar:
        archive = out.with_name(out.name + ".bento")
        archive.unlink(missing_ok=True)
        bentoml.bentos.export_bento(bento.tag, str(archive))
    print(f"bento {bento.tag} (model {model.tag}): bentoml serve {out}")
    return out


def _build(ckpt: Checkpoint, model, ctx: Path):
    import bentoml

    return bentoml.bentos.build(
        SERVICE,
        name=_name(ckpt),
        labels={"polm.format": ckpt.format, "polm.content_hash": ckpt.manifest.content_hash},
        description=f"polm checkpoint {ckpt.path.name} ({ckpt.format}, {ckpt.stage})",
        include=["serve/**", "polm/**"],
        exclude=["**/__pycache__"],
        python={"requirements_txt": "requirements.txt", "lock_packages": False},
        models=[str(model.tag)],
        args={"bento_model": str(model.tag)},
        build_ctx=str(ctx),
    )


def check_package(root: str | Path) -> str:
    """Check a bento directory written by :func:`package_bento`: its manifest names polm's
    service and the model it carries, and the model's checkpoint is whole."""
    import yaml

    root = Path(root)
    try:
        info = yaml.safe_load((root / "bento.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PolmError(f"{root} is not a bento: bento.yaml cannot be read ({e}).") from None
    tag = (info.get("args") or {}).get("bento_model")
    if info.get("service") != SERVICE or not tag:
        raise PolmError(f"{root} is not a polm bento: its service or model argument is missing.")
    name, version = tag.split(":")
    Checkpoint.open(root / "models" / name / version / CHECKPOINT_DIR).verify()
    return tag
