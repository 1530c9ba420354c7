"""Export to ONNX with onnxruntime-genai's model builder (fp32, fp16, int8, int4; cpu or cuda),
with a parity check against the torch model recorded in the manifest.

The builder writes what onnxruntime-genai runs (``model.onnx`` + ``model.onnx.data``,
``genai_config.json``, the tokenizer and chat template); polm adds its manifest, so the export
is an ``onnx`` checkpoint that evaluation and serving open through ``polm.onnxrt`` without
torch. int4 is the builder's block-wise weight-only quantization (``MatMulNBits``).

LoRA slots (``lora_slots``): the builder writes a LoRA adapter into the graph as two extra
MatMuls per module (``lora_A``, ``lora_B``) with the adapter's weights as constants. polm
builds with a placeholder adapter of rank 1, keeps those MatMuls out of int4/int8 quantization,
then turns their weights into graph inputs of any rank whose defaults are zero (the base
model, exactly), and records which module each input belongs to in ``lora_slots.json``. A
``peft-adapter`` trained on the parent becomes onnxruntime's adapter format at serving time
(:func:`polm.onnxrt.write_onnx_adapter`), so that one export serves any number of adapters by
name, as Olive's ``ExtractAdapters`` pass prepares models for onnxruntime-genai's multi-LoRA.

The parity check decodes the parity prompts greedily with the torch parent and with the export
and records the share of identical answers, and the largest difference of next-token logits
after the prompt (for fp32, a check of the graph itself). It runs where the export's execution
provider is available.

Why not optimum: optimum-onnx pins transformers < 4.58, which the rest of polm (transformers
5) cannot use; the builder also writes the KV-cache decoder that onnxruntime-genai's fast
generation loop needs. The builder runs in a child process: importing it puts its own
``builders`` / ``quantization`` modules on ``sys.path``. fp16 is refused on cpu: the builder
writes an fp16 graph that onnxruntime-genai 0.18 cannot decode there (a buffer shape mismatch
at the first step); the builder's own list of supported pairs has no fp16 on cpu either.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from polm.checkpoint import Checkpoint, staging, stored_params
from polm.errors import PolmError
from polm.settings import StageSettings
from polm.stage import single_input
from polm.tasks import validate_task_names

STAGE = "optimize.onnx"
BUILDER_READS = ("tokenizer.json", "tokenizer_config.json")  # of the tokenizer files


class OnnxSettings(StageSettings):
    """Settings of ``optimize.onnx``; quantization fields use the builder's option names."""

    precision: Literal["fp32", "fp16", "int8", "int4"] = Field(
        default="int4", description="Weights of the exported graph."
    )
    execution_provider: Literal["cpu", "cuda"] = Field(
        default="cpu", description="onnxruntime execution provider the graph is built for."
    )
    block_size: Literal[16, 32, 64, 128, 256] = Field(
        default=32, description="int4/int8: weights per quantization block."
    )
    accuracy_level: Literal[1, 2, 3, 4] | None = Field(
        default=None,
        description="int4/int8: activation precision of MatMulNBits (1 fp32, 2 fp16, 3 bf16, 4 "
        "int8; the builder's default on cpu is 4).",
    )
    is_symmetric: bool = Field(default=True, description="int4/int8: symmetric quantization.")
    shared_embeddings: bool | None = Field(
        default=None,
        description="Share the embedding and output-head weights (default: as the model ties "
        "them).",
    )
    extra_options: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="Further builder --extra_options, e.g. {exclude_lm_head: true}.",
    )
    lora_slots: list[str] | Literal["all-linear"] | None = Field(
        default=None,
        description="Modules (e.g. [q_proj, v_proj], or all-linear) on which the graph takes "
        "LoRA adapters of any rank at run time: serving then picks a peft-adapter trained on "
        "the parent by name (onnxruntime-genai Adapters). None: a graph without adapters.",
    )
    task: str | list[str] = Field(
        default=["add", "reverse"], description="Built-in task(s) whose test prompts check parity."
    )
    parity_n: int = Field(default=50, ge=0, description="Parity prompts per task (0: skip).")
    max_new_tokens: int = Field(default=32, gt=0, description="Tokens decoded per prompt.")

    _known_tasks = field_validator("task")(validate_task_names)

    @model_validator(mode="after")
    def _check(self):
        if self.precision == "fp16" and self.execution_provider == "cpu":
            raise ValueError(
                "fp16 is not supported on cpu: onnxruntime-genai 0.18 cannot decode the fp16 "
                "graph the builder writes for cpu; use fp32, int8 or int4 on cpu, or fp16 on cuda"
            )
        reserved = {"block_size", "accuracy_level", "is_symmetric", "shared_embeddings"}
        if clash := sorted(reserved & set(self.extra_options)):
            raise ValueError(f"set {', '.join(clash)} as a setting, not in extra_options")
        return self

    def builder_options(self) -> list[str]:
        opts: dict = {"block_size": self.block_size, "is_symmetric": self.is_symmetric}
        if self.accuracy_level is not None:
            opts["accuracy_level"] = self.accuracy_level
        if self.shared_embeddings is not None:
            opts["shared_embeddings"] = self.shared_embeddings
        opts |= self.extra_options
        return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in opts.items()]


# The builder, run as ``python -c``, with two patches:
# - onnxruntime-genai 0.18's Gemma 3 exporter reads a flat ``rope_parameters`` and the older
#   ``rope_local_base_freq``, but transformers 5 gives Gemma 3 its RoPE settings per layer type
#   ({full_attention: ..., sliding_attention: ...}). The shim hands the exporter the form it
#   reads; every other model goes through untouched.
# - int4/int8: the builder hands onnxruntime's MatMulNBitsQuantizer the whole model as one
#   in-memory protobuf (``ir.to_proto``), every weight materialized in fp32 beside the torch
#   model it came from and the quantized copy: 3.96 GB peak for Gemma 3 270M (1.07 GB in fp32).
#   The patch first streams the unquantized graph to the builder's cache directory, one tensor
#   at a time, and lets go of the torch weights; the quantizer then sees a protobuf whose weights
#   are references into that file, and reads each one as it quantizes it. Same quantizer, same
#   bytes out (checked on Gemma 3 270M and in the tests); the peak falls to 2.42 GB. While it
#   streams, the pages already read of the input's memory-mapped safetensors are handed back
#   (``madvise(MADV_PAGEOUT)``: a reclaim hint that never loses data; they counted 1.07 GB of
#   resident set): 2.03 GB, most of it the libraries and the largest tensor (Gemma's 671 MB
#   embedding) in its file pages and its fp32 copy.
BUILDER = """
import ctypes
import gc
import os
import runpy

import onnx_ir as ir
import onnxruntime_genai.models.builder
import builders
from builders import base

G = builders.Gemma3Model
init = G.__init__

def gemma3_init(self, config, *args, **kwargs):
    rope = getattr(config, "rope_parameters", None)
    if type(self) is G and isinstance(rope, dict) and "sliding_attention" in rope:
        config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        config.rope_theta = rope["full_attention"]["rope_theta"]
        config.rope_parameters = dict(rope["full_attention"])
    init(self, config, *args, **kwargs)

G.__init__ = gemma3_init
to_nbits = base.Model.to_nbits

libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_PAGEOUT = 21
read = [0]

def page_out_inputs(tensor, info):
    # every 64 MB written, ask the kernel to reclaim the pages read so far of the input's
    # memory-mapped safetensors (clean file pages: dropped, re-read if touched again)
    read[0] += tensor.nbytes
    if read[0] < 1 << 26:
        return
    read[0] = 0
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(".safetensors"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            libc.madvise(lo, hi - lo, MADV_PAGEOUT)

def streamed_to_nbits(self):
    cache = os.path.abspath(self.cache_dir)
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, "unquantized.onnx")
    ir.save(self.model, path, external_data="unquantized.onnx.data", size_threshold_bytes=0,
            max_workers=1, max_in_flight_bytes=1 << 26, callback=page_out_inputs)
    self.model = ir.load(path)
    self.graph, self.values = self.model.graph, {}  # the last references to the torch weights
    gc.collect()  # the old graph is a web of cycles
    # LoRA slots stay fp32 MatMuls: their weights are graph inputs an adapter replaces
    lora = [n.name for n in self.model.graph if "/lora_A/" in n.name or "/lora_B/" in n.name]
    self.quant_attrs["nodes_to_exclude"] = [*self.quant_attrs["nodes_to_exclude"], *lora]
    here = os.getcwd()
    os.chdir(cache)  # the quantizer resolves external weights against the working directory
    try:
        model = to_nbits(self)
    finally:
        os.chdir(here)
    ir.external_data.set_base_dir(model.graph, cache)
    return model

base.Model.to_nbits = streamed_to_nbits
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""


def export(src: Path, dst: Path, s: OnnxSettings, adapter: Path | None = None) -> None:
    """Run the model builder on the HF checkpoint ``src`` into ``dst`` (a child process);
    ``adapter``: a PEFT LoRA directory the builder writes into the graph."""
    src, dst = src.resolve(), dst.resolve()
    cache = dst.parent / f".{dst.name}.builder-cache"
    options = s.builder_options() + ([f"adapter_path={adapter.resolve()}"] if adapter else [])
    cmd = [
        sys.executable,
        "-c",
        BUILDER,
        "-i", str(src),
        "-o", str(dst),
        "-p", s.precision,
        "-e", s.execution_provider,
        "-c", str(cache),
        "--extra_options", *options,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0 or not (dst / "model.onnx").is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise PolmError(f"{STAGE}: the onnxruntime-genai model builder failed:\n{tail}")


def parity(parent: Checkpoint, path: Path, s: OnnxSettings) -> dict:
    """Greedy-answer agreement and the largest next-token logit difference, torch vs ONNX."""
    import numpy as np
    import torch

    from polm.evaluate import chat_prompt, export_parity
    from polm.onnxrt import OnnxLM

    lm = OnnxLM(path)
    same, prompts, model, tokenizer = export_parity(
        parent, lm, s.task, s.parity_n, s.max_new_tokens
    )
    diff = 0.0
    for p in prompts[:: max(1, len(prompts) // 16)]:  # 16 prompts spread over the tasks
        text = chat_prompt(tokenizer, p)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            ref = model(ids).logits[0, -1].float().numpy()
        diff = max(diff, float(np.abs(lm.next_token_logits(text) - ref).max()))
    return {
        "onnx.parity.greedy_match": same,
        "onnx.parity.n": len(prompts),
        "onnx.parity.max_abs_logit_diff": diff,
    }


def placeholder_adapter(parent: Checkpoint, targets, out: Path) -> list[str]:
    """A rank-1 PEFT LoRA on ``targets`` of ``parent`` for the builder to write into the graph:
    module k's ``lora_A`` holds the value k + 1, so that :func:`open_lora_slots` can tell which
    graph weight belongs to which module whatever the builder names it. Returns the modules."""
    import torch
    from peft import LoraConfig, get_peft_model

    from polm.loading import load_model

    model, _ = load_model(parent)
    try:
        peft = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, target_modules=targets))
    except ValueError as e:
        raise PolmError(f"{STAGE}: lora_slots {targets}: {str(e).splitlines()[0]}") from None
    modules = []
    with torch.no_grad():
        for name, module in peft.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                module.lora_A["default"].weight.fill_(len(modules) + 1)
                modules.append(name)
    peft.save_pretrained(out)
    return modules


def open_lora_slots(path: Path, modules: list[str]) -> None:
    """Turn the placeholder's LoRA weights in ``path/model.onnx`` into graph inputs of any rank
    whose defaults are zero (rank 1), and write ``lora_slots.json``: each module's input names,
    dtype and shapes (what :func:`polm.onnxrt.write_onnx_adapter` fills)."""
    import json

    import numpy as np
    import onnx
    from onnx import external_data_helper, helper, numpy_helper

    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    slots: dict[str, dict] = {}
    for name, a in inits.items():
        if ".lora_A." not in name:
            continue
        b = inits.get(name.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise PolmError(f"{STAGE}: the graph has {name} but no lora_B beside it")
        if external_data_helper.uses_external_data(a):
            external_data_helper.load_external_data_for_tensor(a, str(path))
        values = np.unique(numpy_helper.to_array(a))
        k = int(values[0]) - 1 if len(values) == 1 else -1
        if not 0 <= k < len(modules) or modules[k] in slots:
            raise PolmError(
                f"{STAGE}: the builder split or packed a LoRA projection ({name}): this model "
                "type cannot take adapters at run time; export without lora_slots"
            )
        slots[modules[k]] = {
            "A": name,
            "B": b.name,
            "in": int(a.dims[0]),
            "out": int(b.dims[1]),
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(a.data_type).name,
        }
    if len(slots) != len(modules):
        missing = sorted(set(modules) - set(slots))
        raise PolmError(f"{STAGE}: the builder wrote no LoRA weights for {missing[:3]}")
    for i, slot in enumerate(slots.values()):
        dtype = np.dtype(slot["dtype"])
        for key, shape, dims in (
            ("A", (slot["in"], 1), [slot["in"], f"lora_r{i}"]),
            ("B", (1, slot["out"]), [f"lora_r{i}", slot["out"]]),
        ):
            graph.initializer.remove(inits[slot[key]])
            graph.initializer.append(numpy_helper.from_array(np.zeros(shape, dtype), slot[key]))
            elem = helper.np_dtype_to_tensor_dtype(dtype)
            graph.input.append(helper.make_tensor_value_info(slot[key], elem, dims))
    onnx.save(model, str(path / "model.onnx"))
    (path / "lora_slots.json").write_text(json.dumps({"modules": slots}, indent=1) + "\n")


def _provider_available(ep: str) -> bool:
    if ep == "cpu":
        return True
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def run(inputs: list[Checkpoint], settings: OnnxSettings, out: Path) -> Checkpoint:
    import json

    s = settings
    parent = single_input(inputs, STAGE, "hf")
    missing = [f for f in BUILDER_READS if not (parent.path / f).is_file()]
    if missing:
        raise PolmError(
            f"{STAGE}: {parent.path} has no {', '.join(missing)}; the builder exports the "
            "tokenizer with the model."
        )
    with staging(out) as st:
        if s.lora_slots:
            placeholder = st.dir.parent / f".{st.dir.name}.lora-placeholder"
            try:
                modules = placeholder_adapter(parent, s.lora_slots, placeholder)
                export(parent.path, st.dir, s, adapter=placeholder)
            finally:
                import shutil

                shutil.rmtree(placeholder, ignore_errors=True)
            open_lora_slots(st.dir, modules)
        else:
            export(parent.path, st.dir, s)
        metrics: dict = {}
        if s.parity_n and _provider_available(s.execution_provider):
            metrics |= parity(parent, st.dir, s)
        cfg = json.loads((parent.path / "config.json").read_text())
        params = stored_params(parent.path)
        weights = sum(f.stat().st_size for f in st.dir.glob("model.onnx*"))
        metrics |= {
            "params": params,
            "bits_per_weight": 8 * weights / params,
            "onnx.precision": s.precision,
            "onnx.execution_provider": s.execution_provider,
            "onnx.model_type": cfg.get("model_type"),
        }
        if s.lora_slots:
            metrics["onnx.lora_slots"] = len(modules)
        return st.commit(
            stage=STAGE, format="onnx", settings=s, parents=[parent], seed=None, metrics=metrics
        )
