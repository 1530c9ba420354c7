"""Export to GGUF, llama.cpp's file (what llama.cpp, Ollama and LM Studio run), with the
tokenizer, the chat template, polm's lineage and a parity check against the torch parent.

Reused, not rewritten:

- **llama.cpp's converter** (``convert_hf_to_gguf.py``, see :mod:`polm.llamacpp` for where it
  comes from) maps the tensors, writes the tokenizer with its pre-tokenizer type, bos/eos and
  the chat template, and writes ``f32``, ``f16``, ``bf16``, ``q8_0`` and the ternary ``tq1_0``
  / ``tq2_0`` itself;
- **llama.cpp's quantizer** (``llama_model_quantize``, the library behind ``llama-quantize``,
  through llama-cpp-python) writes every other type, the K-quants among them, from an ``f32``
  conversion of the model, so that nothing is rounded twice.

Written here, because neither does it: the converter runs in a child process with three
additions. It loads a plain ``tokenizer.json`` (polm's own tokenizer) exactly as saved, as
``polm.loading`` does: ``AutoTokenizer`` would pick the model type's class, and Qwen2's adds an
``<|endoftext|>`` the model has no row for. Its pre-tokenizer detection hashes the tokenizer's
output on a probe string and knows published tokenizers only; for polm's built-in tokenizer
(single digits, then GPT-2's byte-level split) the addition names llama.cpp's ``starcoder``
pre-tokenizer, which applies exactly those two splits (the tests check token ids on 200
prompts). And it strips the ``{% generation %}`` markers from the chat template (transformers'
training-only extension, unknown to llama.cpp's and Ollama's template engines) and adds
``polm.*`` keys: the stage, the parent's content hash and the lineage, which llama.cpp's
quantizer copies into its output.

The parity check decodes the parity prompts greedily with the torch parent and with llama.cpp
and records the share of identical answers (``gguf.parity.greedy_match``) and the share of
chat-rendered prompts whose token ids are identical (``gguf.parity.token_match``).

From a GPTQ checkpoint (symmetric 4-bit, groups of whole 32-column blocks), ``q4_0`` is written
with GPTQ's own codes and scales rather than rounded again (:mod:`optimize.gguf_gptq`).

Ollama: the stage writes a ``Modelfile`` beside the file (``ollama create NAME -f Modelfile``
in the checkpoint directory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from polm.checkpoint import Checkpoint, lineage, staging, stored_params
from polm.errors import PolmError
from polm.llamacpp import ADAPTER_FILE, GGUF_FILE, require_converter, require_llama_cpp
from polm.settings import StageSettings
from polm.stage import single_input
from polm.tasks import validate_task_names

STAGE = "optimize.gguf"
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0", "tq1_0", "tq2_0")
# llama.cpp's llama_ftype for what its quantizer writes (llama.h)
QUANTIZER_TYPES = {
    "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_m": 12, "q4_k_s": 14,
    "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
}  # fmt: skip
GgufType = Literal[
    "f32", "f16", "bf16", "q8_0", "tq1_0", "tq2_0", "q4_0", "q4_1", "q5_0", "q5_1",
    "q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
]  # fmt: skip


class GgufSettings(StageSettings):
    """Settings of ``optimize.gguf``; the types are llama.cpp's names."""

    outtype: GgufType = Field(
        default="q4_k_m",
        description="GGUF tensor type: f32/f16/bf16/q8_0/tq1_0/tq2_0 by llama.cpp's converter, "
        "the others (q4_0, q4_k_m, q6_k, ...) by llama.cpp's quantizer.",
    )
    task: str | list[str] = Field(
        default=["add", "reverse"], description="Built-in task(s) whose test prompts check parity."
    )
    parity_n: int = Field(default=50, ge=0, description="Parity prompts per task (0: skip).")
    max_new_tokens: int = Field(default=32, gt=0, description="Tokens decoded per prompt.")
    modelfile: bool = Field(default=True, description="Write an Ollama Modelfile beside the file.")

    _known_tasks = field_validator("task")(validate_task_names)


# The converter, run as ``python -c CONVERT ROOT SCRIPT ARGS...`` (see the module docstring).
CONVERT = """
import json, os, runpy, sys

root, script = sys.argv[1], sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
sys.path[:0] = [root, os.path.join(root, "gguf-py")]
import gguf
from conversion import base

from polm.tokenizer import strip_generation_tags

pre = os.environ.get("POLM_GGUF_PRE")
detect = base.TextModel.get_vocab_base_pre

def get_vocab_base_pre(self, tokenizer):
    try:
        return detect(self, tokenizer)
    except NotImplementedError:
        if pre:
            return pre
        raise

base.TextModel.get_vocab_base_pre = get_vocab_base_pre

from transformers import AutoTokenizer, PreTrainedTokenizerFast

auto_tokenizer = AutoTokenizer.from_pretrained

from polm.loading import saved_as_plain_tokenizer

def from_pretrained(path, *args, **kwargs):
    if saved_as_plain_tokenizer(path):
        return PreTrainedTokenizerFast.from_pretrained(path)  # as polm.loading loads it
    return auto_tokenizer(path, *args, **kwargs)

AutoTokenizer.from_pretrained = from_pretrained
add_chat_template = gguf.GGUFWriter.add_chat_template

def add_chat_template_plain(self, value):
    add_chat_template(self, strip_generation_tags(value) if isinstance(value, str) else value)

gguf.GGUFWriter.add_chat_template = add_chat_template_plain
extra = json.loads(os.environ.get("POLM_GGUF_METADATA", "{}"))
write_header = gguf.GGUFWriter.write_header_to_file

def write_header_to_file(self, *args, **kwargs):
    for key, value in extra.items():
        self.add_string(key, value)
    return write_header(self, *args, **kwargs)

gguf.GGUFWriter.write_header_to_file = write_header_to_file
runpy.run_path(os.path.join(root, script), run_name="__main__")
"""


def pre_tokenizer_name(model_dir: Path) -> str | None:
    """llama.cpp's name for the pre-tokenizer of polm's built-in tokenizer, if ``model_dir``
    has it: split single digits, then GPT-2's byte-level regex (llama.cpp: ``starcoder``)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    pre = json.loads(path.read_text()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if (
        steps
        and len(steps) == 2
        and steps[0] == {"type": "Digits", "individual_digits": True}
        and steps[1].get("type") == "ByteLevel"
        and steps[1].get("use_regex", True)
        and not steps[1].get("add_prefix_space", False)
    ):
        return "starcoder"
    return None


def polm_metadata(parent: Checkpoint) -> dict[str, str]:
    """The ``polm.*`` keys of the GGUF file: what made it and from what."""
    chain = [
        {
            "stage": node.stage,
            "content_hash": (
                node.manifest.content_hash if isinstance(node, Checkpoint) else node.content_hash
            ),
            "path": str(node.path),
            "depth": depth,
        }
        for depth, node in lineage(parent)
    ]
    return {
        "polm.stage": STAGE,
        "polm.parent.content_hash": parent.manifest.content_hash,
        "polm.parent.stage": parent.stage,
        "polm.lineage": json.dumps(chain),
    }


def convert(
    src: Path, out_file: Path, outtype: str, metadata: dict[str, str], base: Path | None = None
) -> None:
    """llama.cpp's converter on the HF directory ``src`` (a child process); with ``base``,
    ``src`` is a PEFT LoRA adapter on that model (``convert_lora_to_gguf.py``)."""
    root = require_converter()
    script = "convert_lora_to_gguf.py" if base else "convert_hf_to_gguf.py"
    cmd = [
        sys.executable, "-c", CONVERT, str(root), script, str(src),
        "--outfile", str(out_file), "--outtype", outtype,
        *(["--base", str(base)] if base else []),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "POLM_GGUF_METADATA": json.dumps(metadata)}
    env.pop("NO_LOCAL_GGUF", None)  # the converter's own gguf-py, not the PyPI one
    if pre := pre_tokenizer_name(base or src):
        env["POLM_GGUF_PRE"] = pre
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out_file.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise PolmError(f"{STAGE}: llama.cpp's converter failed on {src}:\n{tail}")


def quantize(src_file: Path, out_file: Path, outtype: str) -> None:
    """llama.cpp's quantizer (``llama_model_quantize``) from ``src_file`` to ``outtype``."""
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZER_TYPES[outtype]
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src_file).encode(), str(out_file).encode(), params)
    if rc != 0 or not out_file.is_file():
        raise PolmError(f"{STAGE}: llama.cpp's quantizer failed ({outtype}, return code {rc})")


def parity(parent: Checkpoint, lm, s: GgufSettings) -> dict:
    """Greedy-answer and token-id agreement, torch and HF tokenizer vs llama.cpp (``lm``: the
    export, a :class:`polm.llamacpp.GgufLM`)."""
    from polm.evaluate import chat_prompt, export_parity

    same, prompts, _, tokenizer = export_parity(parent, lm, s.task, s.parity_n, s.max_new_tokens)
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    same_ids = sum(
        lm.tokenize(t) == tokenizer(t, add_special_tokens=False).input_ids for t in texts
    )
    return {
        "gguf.parity.greedy_match": same,
        "gguf.parity.token_match": same_ids / len(prompts),
        "gguf.parity.n": len(prompts),
    }


def metrics_params(parent: Checkpoint) -> int:
    """Parameters of a packed parent (its stage counted them unpacked)."""
    if params := parent.manifest.metrics.get("params"):
        return int(params)
    from polm.loading import load_model

    model, _ = load_model(parent)
    return sum(p.numel() for p in model.parameters())


def write_modelfile(ckpt_dir: Path, lm) -> None:
    from polm.ollama import modelfile

    adapter = f"./{ADAPTER_FILE}" if (ckpt_dir / ADAPTER_FILE).is_file() else None
    text = modelfile(
        f"./{GGUF_FILE}", lm.llm.metadata, bos=lm.bos_text, eos=lm.eos_text, adapter=adapter
    )
    (ckpt_dir / "Modelfile").write_text(text)


def adapter_base(adapter: Checkpoint) -> Checkpoint:
    """The base model a ``peft-adapter`` checkpoint was trained on (its manifest's parent,
    unchanged since)."""
    if not adapter.manifest.parents:
        raise PolmError(f"{adapter.path} is a PEFT adapter whose manifest names no base model.")
    ref = adapter.manifest.parents[0]
    base = Checkpoint.open(ref.path)
    if base.manifest.content_hash != ref.content_hash or base.format != "hf":
        raise PolmError(
            f"{STAGE}: the base of adapter {adapter.path} ({base.path}) changed since the "
            "adapter was trained, or is not an hf checkpoint; re-run the stage that made it."
        )
    return base


def unpacked_onebit(parent: Checkpoint, dst: Path, outtype: str) -> Path:
    """An HF directory with the onebit checkpoint's weights dequantized (ternary: trit times
    its row's scale, which TQ1_0 / TQ2_0 blocks hold exactly: every nonzero weight of a row is
    plus or minus the row's scale, the block's scale is its largest magnitude)."""
    from polm.onebit import CONFIG_KEY, load_onebit
    from polm.stage import carry_files

    method = json.loads((parent.path / "config.json").read_text())[CONFIG_KEY]["method"]
    if outtype in ("tq1_0", "tq2_0") and method != "ternary":
        raise PolmError(
            f"{STAGE}: {outtype} holds ternary weights; {parent.path} is {method} (OneBit "
            "signs times row and column scales): export it as f16, q8_0 or a k-quant."
        )
    model = load_onebit(parent.path)
    delattr(model.config, CONFIG_KEY)  # a plain HF model now
    model.save_pretrained(dst)
    carry_files(parent.path, dst)
    return dst


def run(inputs: list[Checkpoint], settings: GgufSettings, out: Path) -> Checkpoint:
    s = settings
    parent = single_input(inputs, STAGE, "hf", "onebit", "peft-adapter", "gptq")
    if parent.format == "gptq":
        from optimize import gguf_gptq

        gguf_gptq.check_exportable(parent, s.outtype)
    if s.outtype in ("tq1_0", "tq2_0") and parent.format != "onebit":
        raise PolmError(
            f"{STAGE}: {s.outtype} is for ternary weights: export a ternary optimize.onebit "
            f"checkpoint with it ({parent.path} has format {parent.format!r})."
        )
    require_converter()
    require_llama_cpp()
    meta = polm_metadata(parent)
    with staging(out) as st:
        target = st.dir / GGUF_FILE
        src = parent.path
        if parent.format == "onebit":
            src = unpacked_onebit(parent, st.dir / "unpacked", s.outtype)
        if parent.format == "peft-adapter":  # the base's file, and the adapter beside it
            src = adapter_base(parent).path
            lora_type = "f16" if s.outtype in ("f16", "f32", "bf16") else "q8_0"
            convert(parent.path, st.dir / ADAPTER_FILE, lora_type, meta, base=src)
        exported: dict = {}
        if parent.format == "gptq":  # GPTQ's own q4_0 blocks (optimize/gguf_gptq.py)
            exported = gguf_gptq.export(parent, st.dir, target, convert, quantize, meta)
        elif s.outtype in CONVERTER_TYPES:
            convert(src, target, s.outtype, meta)
        else:
            full = st.dir / "f32.gguf"
            convert(src, full, "f32", meta)
            quantize(full, target, s.outtype)
            full.unlink()
        if src.parent == st.dir:
            import shutil

            shutil.rmtree(src)
        from polm.llamacpp import GgufLM

        lm = GgufLM(st.dir)  # opened once: metadata, Modelfile, parity
        file_meta = dict(lm.llm.metadata)
        if s.modelfile:
            write_modelfile(st.dir, lm)
        metrics: dict = dict(exported)
        if s.parity_n:
            metrics |= parity(parent, lm, s)
        lm.llm.close()
        del lm
        # a packed parent counted its own parameters; the others are counted from the file
        packed = parent.format in ("onebit", "gptq")
        params = metrics_params(parent) if packed else stored_params(src)
        metrics |= {
            "params": params,
            "bits_per_weight": 8 * target.stat().st_size / params,
            "gguf.type": s.outtype,
            "gguf.architecture": file_meta.get("general.architecture"),
        }
        return st.commit(
            stage=STAGE, format="gguf", settings=s, parents=[parent], seed=None, metrics=metrics
        )
