"""Bringing models in: built-ins, local Hugging Face directories and GGUF files.

Everything a recipe's ``models:`` names becomes a checkpoint (stage ``import``) before any
stage sees it. Only safetensors weights are accepted by default; a directory whose weights are
pickles is refused unless ``allow_pickle`` is set, and then it is loaded with
``weights_only=True`` and re-saved as safetensors.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from polm.checkpoint import Checkpoint, check_safetensors, staging
from polm.errors import PolmError
from polm.stage import CARRIED_FILES

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTINS = {
    "tiny-base": "a ~1M-parameter Llama pretrained by polm on its synthetic corpus",
    "tiny-llama": "a randomly initialised tiny Llama with the built-in tokenizer",
    "tiny-qwen2": "a randomly initialised tiny Qwen2 with the built-in tokenizer",
    "tiny-mistral": "a randomly initialised tiny Mistral with the built-in tokenizer",
}
HF_FILES = ("config.json", *CARRIED_FILES, "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def source_fingerprint(source: str) -> str:
    """A hash identifying what ``source`` currently holds, so re-imports can be skipped."""
    h = hashlib.sha256(source.encode())
    if source.startswith("builtin:"):
        root = BUILTIN_DIR / source.split(":", 1)[1]
        files = sorted(root.rglob("*")) if root.is_dir() else []
    else:
        p = Path(source)
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
    for f in files:
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def check_source(source: str, allow_pickle: bool = False) -> None:
    """Check that ``source`` names a model polm can import, without loading any weights.

    ``builtin:NAME`` must be a known built-in; a directory must hold ``config.json``,
    safetensors weights whose headers read (or, with ``allow_pickle``, pickle weights) and a
    tokenizer; a ``.gguf`` file's header and tensor index must read. ``polm validate``, ``polm
    run`` (before any stage) and :func:`import_model` all call this, so the rules live here once.
    """
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTINS:
            raise PolmError(
                f"unknown built-in model {name!r}; the built-ins are: {', '.join(BUILTINS)}."
            )
        return
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _check_gguf(path)
    if path.is_dir():
        return _check_hf_dir(path, allow_pickle)
    if not path.exists():
        raise PolmError(
            f"cannot import {source!r}: no such file or directory. Give builtin:NAME "
            f"({', '.join(BUILTINS)}), a local Hugging Face model directory or a "
            ".gguf file. Nothing is downloaded from a hub."
        )
    raise PolmError(
        f"cannot import {source!r}: expected a Hugging Face model directory or a .gguf file."
    )


def _check_hf_dir(path: Path, allow_pickle: bool) -> None:
    if not (path / "config.json").is_file():
        raise PolmError(f"{path} is not a Hugging Face model directory: config.json is missing.")
    has_st = any(path.glob("*.safetensors"))
    pickles = [f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if not has_st and pickles:
        if not allow_pickle:
            raise PolmError(
                f"{path} has only pickle weights ({', '.join(sorted(pickles))}); polm loads "
                "safetensors only, because unpickling can run arbitrary code. If you trust this "
                "model, import it with `polm import DIR --out NEW --allow-pickle` (torch's "
                "weights_only loader, re-saved as safetensors) and give a recipe NEW instead."
            )
    elif not has_st:
        raise PolmError(f"{path} has no weights: expected *.safetensors files.")
    tok_files = [
        n for n in ("tokenizer.json", "tokenizer.model", "vocab.json") if (path / n).is_file()
    ]
    if not tok_files:
        raise PolmError(
            f"{path} has no tokenizer (tokenizer.json, tokenizer.model or "
            "vocab.json): polm evaluates and serves every checkpoint, so it needs one."
        )
    check_safetensors(path)


def _check_gguf(path: Path) -> None:
    """Read the GGUF header, metadata and tensor index (the weights stay on disk, memory-mapped
    and unread): a truncated or foreign file fails here, before any dequantization."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct and numpy errors on bad files
        raise PolmError(f"cannot read {path} as a GGUF model: {str(e).splitlines()[0]}") from None
    if "general.architecture" not in reader.fields:
        raise PolmError(
            f"cannot read {path} as a GGUF model: its header names no general.architecture."
        )


def import_model(source: str, out: str | Path, allow_pickle: bool = False) -> Checkpoint:
    """Import ``source`` (``builtin:NAME``, a local HF directory or a ``.gguf`` file) to ``out``."""
    check_source(source, allow_pickle)
    settings = {"source": source, "allow_pickle": allow_pickle}
    if source.startswith("builtin:"):
        return _import_builtin(source.split(":", 1)[1], Path(out), settings)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return _import_gguf(path, Path(out), settings)
    return _import_hf_dir(path, Path(out), settings)


def _import_builtin(name: str, out: Path, settings: dict) -> Checkpoint:
    with staging(out) as st:
        if name == "tiny-base":
            for f in (BUILTIN_DIR / name).iterdir():
                if f.is_file():
                    shutil.copy2(f, st.dir / f.name)
        else:
            from polm.models import tiny_model
            from polm.tokenizer import build_tokenizer

            tok = build_tokenizer()
            model = tiny_model(name.split("-", 1)[1], vocab_size=len(tok), seed=0, tokenizer=tok)
            model.save_pretrained(st.dir)
            tok.save_pretrained(st.dir)
        return st.commit(stage="import", format="hf", settings=settings)


def _import_hf_dir(path: Path, out: Path, settings: dict) -> Checkpoint:
    from polm.loading import load_tokenizer

    has_st = any(path.glob("*.safetensors"))
    with staging(out) as st:
        if has_st:
            for f in path.iterdir():
                if f.is_file() and (f.suffix == ".safetensors" or f.name in HF_FILES):
                    shutil.copy2(f, st.dir / f.name)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                path, use_safetensors=False, trust_remote_code=False
            )
            model.save_pretrained(st.dir)
            load_tokenizer(path).save_pretrained(st.dir)
        tok = load_tokenizer(st.dir)
        settings["added_chat_template"] = ensure_chat_template(tok)
        if settings["added_chat_template"]:
            tok.save_pretrained(st.dir)
        return st.commit(stage="import", format="hf", settings=settings)


def _import_gguf(path: Path, out: Path, settings: dict) -> Checkpoint:
    """Dequantize a GGUF file to a safetensors checkpoint.

    transformers dequantizes GGUF on load but leaves a quantizer marker on the model that
    blocks ``save_pretrained`` and training; it is cleared here, so the result is a plain
    float model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except Exception as e:  # gguf/transformers raise many types for unsupported files
        raise PolmError(f"cannot read {path} as a GGUF model: {str(e).splitlines()[0]}") from None
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    settings["added_chat_template"] = ensure_chat_template(tok)
    with staging(out) as st:
        model.save_pretrained(st.dir)
        tok.save_pretrained(st.dir)
        return st.commit(stage="import", format="hf", settings=settings)


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template polm's (turns end with its eos token).

    Base models often ship without one, but every stage and the evaluator speak chat.
    Returns whether a template was added (recorded in the manifest).
    """
    if tokenizer.chat_template:
        return False
    from polm.tokenizer import CHAT_TEMPLATE

    tokenizer.chat_template = CHAT_TEMPLATE
    return True
