"""Edge packages: an ONNX checkpoint, its lineage, checksums and a runner that needs only
onnxruntime-genai.

    polm package edge CKPT --out DIR [--tar]

The package holds ``model/`` (onnxruntime-genai's files: ``model.onnx``, its weights,
``genai_config.json``, the tokenizer and chat template), ``polm.json`` (the checkpoint's
manifest with its whole lineage inlined, since the parents stay behind), ``polm_edge.py``
(chat in the terminal, one greedy answer, or a minimal OpenAI-compatible endpoint),
``requirements.txt``, ``README.txt`` and ``SHA256SUMS`` over all of them. The runner checks
every file before it loads the model. The package is written into a temporary sibling and
renamed into place when complete, like a checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import uuid
from importlib.metadata import version
from pathlib import Path

from polm.checkpoint import MANIFEST, Checkpoint
from polm.errors import PolmError
from serve.edge_runner import sha256
from serve.state import lineage_records

RUNNER = Path(__file__).with_name("edge_runner.py")

README = """\
{name}: a polm edge package ({precision} ONNX, onnxruntime-genai)

    python -m venv .venv && .venv/bin/pip install -r requirements.txt
    .venv/bin/python polm_edge.py chat
    .venv/bin/python polm_edge.py serve --port 8000    # OpenAI-compatible, /v1/...
    .venv/bin/python polm_edge.py verify

No torch or transformers is needed. Every file is checked against SHA256SUMS before the
model loads. polm.json holds the model's lineage: the stages that made it, their settings
and evaluations.
"""


def package_edge(
    ckpt: Checkpoint | str, out: str | Path, tar: bool = False, precision: str = "int4"
) -> Path:
    """Write the edge package of a checkpoint to ``out`` (and ``out.tar.gz``). A checkpoint that
    is not ``onnx`` yet is exported first (``optimize.onnx`` at ``precision``, through the
    registry) into a temporary directory beside ``out``."""
    import tempfile

    if not isinstance(ckpt, Checkpoint):
        ckpt = Checkpoint.open(ckpt)
    if ckpt.format == "onnx":
        return _package_onnx(ckpt, out, tar)
    from polm.registry import stage_function
    from polm.settings import parse_settings

    settings = parse_settings("optimize.onnx", {"precision": precision})
    Path(out).absolute().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".polm-edge-", dir=Path(out).absolute().parent) as tmp:
        print(f"exporting {ckpt.path} to ONNX ({precision}) ...")
        onnx = stage_function("optimize.onnx")([ckpt], settings, Path(tmp) / ckpt.path.name)
        return _package_onnx(onnx, out, tar)


def _package_onnx(ckpt: Checkpoint, out: str | Path, tar: bool) -> Path:
    ckpt.require_format("onnx", stage="polm package edge")
    ckpt.verify()  # never package a checkpoint that changed after it was written
    out = Path(out).absolute()
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    (tmp / "model").mkdir(parents=True)
    try:
        for f in sorted(ckpt.path.iterdir()):
            if f.is_file() and f.name != MANIFEST:
                shutil.copy2(f, tmp / "model" / f.name)
        manifest = ckpt.manifest.model_dump(mode="json")
        manifest["served_model_name"] = ckpt.path.name
        manifest["lineage"] = lineage_records(ckpt, full=True)
        (tmp / "polm.json").write_text(json.dumps(manifest, indent=2))
        shutil.copy2(RUNNER, tmp / "polm_edge.py")
        (tmp / "requirements.txt").write_text(
            f"onnxruntime-genai=={version('onnxruntime-genai')}\n"
        )
        precision = ckpt.manifest.settings.get("precision", "?")
        (tmp / "README.txt").write_text(README.format(name=ckpt.path.name, precision=precision))
        (tmp / "SHA256SUMS").write_text(
            "".join(f"{sha256(f)}  {f.relative_to(tmp)}\n" for f in _files(tmp))
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if tar:
        archive = out.with_name(out.name + ".tar.gz")
        part = archive.with_name(archive.name + ".part")
        with tarfile.open(part, "w:gz") as t:
            t.add(out, arcname=out.name)
        part.rename(archive)
    return out


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "SHA256SUMS")


def check_package(root: str | Path) -> int:
    """Check a package's files against its SHA256SUMS (with polm's own copy of the runner's
    check, not the package's); return how many files were checked."""
    from serve import edge_runner

    try:
        return edge_runner.verify(Path(root))
    except edge_runner.ChecksumError as e:
        raise PolmError(str(e)) from None
