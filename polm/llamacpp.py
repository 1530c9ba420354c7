"""llama.cpp in polm: the ``gguf`` checkpoint format run by llama-cpp-python, and where
llama.cpp's own converter lives.

A ``gguf`` checkpoint is a directory with one ``model.gguf`` (llama.cpp's file: weights,
tokenizer, chat template, polm's lineage under ``polm.*`` keys), an ``adapter.gguf`` beside it
when it came from a LoRA adapter (llama.cpp applies it on load), an Ollama ``Modelfile`` and
polm's manifest. :class:`GgufLM` renders prompts with the file's own chat template, tokenizes
with llama.cpp's tokenizer and decodes greedily: what ``llama-cli``, ``llama-server`` and
Ollama would answer.

The converter (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, their ``conversion``
package and ``gguf-py``) is not on PyPI. It is taken from the llama.cpp source tree inside the
llama-cpp-python sdist, the same llama.cpp revision as the library that runs the files, and
unpacked under ``<prefix>/share/polm/llama.cpp`` (``make llamacpp`` does it; by hand:
``python -m polm.llamacpp install``). ``POLM_LLAMA_CPP`` points elsewhere.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from polm.errors import PolmError

LLAMA_CPP_PYTHON = "0.3.36"  # the pin in constraints.txt: the converter must match the library
GGUF_FILE = "model.gguf"
ADAPTER_FILE = "adapter.gguf"  # a LoRA adapter on model.gguf (a peft-adapter's export)
# what the conversion needs from vendor/llama.cpp in the sdist (and the licence it comes under)
CONVERTER = (
    "convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE",
)  # fmt: skip
INSTALL_HINT = (
    "llama.cpp's converter is not installed: run `make llamacpp`, or `python -m polm.llamacpp "
    "install` (downloads the llama-cpp-python sdist from PyPI and unpacks its converter)"
)


def converter_dir() -> Path:
    """Where llama.cpp's converter is unpacked (``POLM_LLAMA_CPP`` overrides)."""
    env = os.environ.get("POLM_LLAMA_CPP")
    return Path(env) if env else Path(sys.prefix) / "share" / "polm" / "llama.cpp"


def require_converter() -> Path:
    """The converter's directory, or a PolmError that says how to install it."""
    root = converter_dir()
    if not (root / "convert_hf_to_gguf.py").is_file():
        raise PolmError(f"{INSTALL_HINT} (looked in {root}).")
    return root


def require_llama_cpp():
    """The ``llama_cpp`` module, or a PolmError that says how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise PolmError(
            "gguf checkpoints run on llama-cpp-python, which is not installed: `pip install "
            f"'polm[llamacpp]'` (it compiles llama.cpp: several minutes) or `make llamacpp` ({e})"
        ) from None
    _close_at_exit(llama_cpp)
    return llama_cpp


def _close_at_exit(llama_cpp) -> None:
    """llama-cpp-python opens two handles on /dev/null at import and never closes them: a
    ResourceWarning on stderr as the interpreter exits. Closed at exit instead (once)."""
    import atexit

    utils = getattr(llama_cpp, "_utils", None)
    handles = [getattr(utils, n, None) for n in ("outnull_file", "errnull_file")]
    if not getattr(utils, "_polm_closes", False) and all(handles):
        utils._polm_closes = True
        for handle in handles:
            atexit.register(handle.close)


def unpack(sdist: Path, dest: Path) -> Path:
    """Unpack the converter from a llama-cpp-python sdist into ``dest`` (replaced whole)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=dest.parent))
    try:
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                parts = Path(m.name).parts
                if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp"):
                    continue
                rel = Path(*parts[3:])
                if not any(
                    str(rel) == c or (c.endswith("/") and str(rel).startswith(c)) for c in CONVERTER
                ):
                    continue
                if not (m.isfile() or m.isdir()):
                    continue  # no links or devices from an archive
                m.name = str(rel)
                tar.extract(m, tmp, filter="data")
        if not (tmp / "convert_hf_to_gguf.py").is_file():
            raise PolmError(f"{sdist} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        (tmp / "VERSION").write_text(sdist.name + "\n")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def install(dest: Path | None = None) -> Path:
    """Download the pinned llama-cpp-python sdist (pip) and unpack its converter."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [
            sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
            "-d", d, f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
        ]  # fmt: skip
        subprocess.run(cmd, check=True)
        (sdist,) = Path(d).glob("llama_cpp_python-*.tar.gz")
        return unpack(sdist, dest or converter_dir())


def trained_context(file: Path) -> int | None:
    """The context length a GGUF file was trained for (``<arch>.context_length``)."""
    from gguf import GGUFReader

    reader = GGUFReader(file)
    arch = reader.get_field("general.architecture")
    field = arch and reader.get_field(f"{arch.contents()}.context_length")
    return int(field.contents()) if field else None


class GgufLM:
    """Greedy generation, token ids and log-likelihoods from a ``gguf`` checkpoint directory
    (or a ``.gguf`` file), through llama-cpp-python."""

    def __init__(
        self,
        path,
        threads: int | None = None,
        n_ctx: int = 1024,
        logits_all: bool = False,
        lora: str | None = None,
    ):
        path = Path(path)
        file = path / GGUF_FILE if path.is_dir() else path
        if not file.is_file():
            raise PolmError(
                f"{path} has no {GGUF_FILE}: a gguf checkpoint is one llama.cpp GGUF file "
                "(written by optimize.gguf) with polm's manifest beside it."
            )
        if lora is None and path.is_dir() and (path / ADAPTER_FILE).is_file():
            lora = str(file.parent / ADAPTER_FILE)
        llama_cpp = require_llama_cpp()
        threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0) or 0) or None
        n_ctx = min(n_ctx, trained_context(file) or n_ctx)
        self.llm = llama_cpp.Llama(
            model_path=str(file),
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 512),
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=logits_all,
            lora_path=lora,
            seed=0,
            verbose=False,
        )
        meta = self.llm.metadata
        self.template = meta.get("tokenizer.chat_template")
        self.eos = self.llm.token_eos()
        self._vocab = self.llm._model.vocab  # noqa: SLF001 (llama_cpp has no public is-eog)
        self._llama_cpp = llama_cpp
        self.bos_text = self._piece(meta, "tokenizer.ggml.bos_token_id")
        self.eos_text = self._piece(meta, "tokenizer.ggml.eos_token_id")

    def _piece(self, meta: dict, key: str) -> str:
        if key not in meta:
            return ""
        return self.llm.detokenize([int(meta[key])], special=True).decode("utf-8", "replace")

    def is_end(self, token: int) -> bool:
        """Whether ``token`` ends generation (eos, eot, ...: llama.cpp's end-of-generation)."""
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """``messages`` (asked with ``tools``, when given) rendered with the file's chat
        template, ready for the answer."""
        if not self.template:
            raise PolmError("this GGUF file has no chat template (tokenizer.chat_template)")
        from polm.tokenizer import render_template

        return render_template(self.template, messages, tools, self.bos_text, self.eos_text)

    def chat_prompt(self, prompt: str) -> str:
        """A user turn rendered with the file's chat template, ready for the answer."""
        return self.render([{"role": "user", "content": prompt}])

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's token ids for ``text`` (special tokens parsed, no BOS added)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def generate(self, texts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of already rendered ``texts`` (end of generation stops one)."""
        outs = []
        for text in texts:
            new: list[int] = []
            tokens = self.tokenize(text)
            for token in self.llm.generate(tokens, top_k=1, temp=0.0, repeat_penalty=1.0):
                if self.is_end(token) or len(new) >= max_new_tokens:
                    break
                new.append(token)
            outs.append(self.llm.detokenize(new).decode("utf-8", "replace"))
        return outs

    def greedy(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy answers to chat ``prompts`` (user turns)."""
        return self.generate([self.chat_prompt(p) for p in prompts], max_new_tokens)

    def perplexity(self, lines: list[str]) -> float:
        """Perplexity over ``lines``, each scored alone between bos and eos (as
        ``polm.evaluate.perplexity`` scores a torch model); needs ``logits_all=True``."""
        import numpy as np

        total, count = 0.0, 0
        for line in lines:
            ids = self.tokenize(self.bos_text + line + self.eos_text)
            self.llm.reset()
            self.llm.eval(ids)
            logits = np.asarray(self.llm.scores[: len(ids) - 1], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
            total += float((logz - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
            count += len(ids) - 1
        return math.exp(total / count)

    def decode_exactly(self, text: str, new_tokens: int) -> tuple[int, float]:
        """Decode ``new_tokens`` greedy tokens after ``text``, end of text ignored (a fixed
        amount of work, for timing); return how many came after the first (the prefill's)
        token and the seconds they took."""
        import time

        gen = self.llm.generate(self.tokenize(text), top_k=1, temp=0.0, repeat_penalty=1.0)
        next(gen)  # the prefill and first token
        t0, done = time.perf_counter(), 1
        while done < new_tokens:
            next(gen)
            done += 1
        gen.close()
        return done - 1, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m polm.llamacpp", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="download the pinned llama-cpp-python sdist and unpack")
    up = sub.add_parser("unpack", help="unpack the converter from a llama-cpp-python sdist")
    up.add_argument("sdist", type=Path)
    for q in sub.choices.values():
        q.add_argument("--dest", type=Path, default=None, help=f"default: {converter_dir()}")
    args = p.parse_args(argv)
    if args.cmd == "install":
        where = install(args.dest)
    else:
        where = unpack(args.sdist, args.dest or converter_dir())
    print(f"llama.cpp's converter: {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
