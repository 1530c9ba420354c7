"""The flat stage registry: dotted name -> where its function and settings live.

Entries are ``"module:attribute"`` strings imported on use, so that listing stages, validating
a recipe or serving a model never imports a training library.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass

from polm.errors import PolmError


@dataclass(frozen=True)
class StageEntry:
    run: str  # "module:function" with signature run(inputs, settings, out) -> Checkpoint
    settings: str  # "module:Class", a pydantic model with extra="forbid"
    summary: str  # one line for `polm stages`
    trains: bool = False  # accepts --nproc (runs under accelerate / torch.distributed)
    inputs_in_settings: bool = False  # the settings can name the inputs (a mergekit YAML)
    # after evaluation, `polm run` records the output beside its inputs (by their recipe names)
    # and their shared base: what a merge keeps of each input's accuracy and gain
    compares_inputs: bool = False


STAGES: dict[str, StageEntry] = {
    "align.sft": StageEntry(
        "align.sft:run",
        "align.sft:SFTSettings",
        "supervised fine-tuning: full, LoRA, prefix or prompt tuning; instruction data with "
        "assistant-only loss, or continued pretraining on plain text",
        trains=True,
    ),
    "align.reward": StageEntry(
        "align.reward:run",
        "align.reward:RewardSettings",
        "reward model (sequence-classification head, Bradley-Terry loss) trained on "
        "preference pairs",
        trains=True,
    ),
    "align.dpo": StageEntry(
        "align.dpo:run",
        "align.dpo:DPOSettings",
        "preference optimization: DPO, IPO, hinge, cDPO, robust DPO, SimPO, ORPO, KTO",
        trains=True,
    ),
    "align.ppo": StageEntry(
        "align.ppo:run",
        "align.ppo:PPOSettings",
        "RLHF with PPO: value head, GAE, clipped objective, fixed or adaptive KL penalty; "
        "reward model or task verifier",
    ),
    "align.rlaif": StageEntry(
        "align.rlaif:run",
        "align.rlaif:RLAIFSettings",
        "RL from AI feedback: a judge (reward model or LM) labels pairs sampled from the "
        "policy, optionally self-refined; DPO trains on them",
    ),
    "align.grpo": StageEntry(
        "align.grpo:run",
        "align.grpo:GRPOSettings",
        "RL with verifiable rewards: GRPO or RLOO, task verifier + optional format and "
        "reward-model rewards",
        trains=True,
    ),
    "merge.mergekit": StageEntry(
        "merge.mergekit:run",
        "merge.mergekit:MergekitSettings",
        "merge checkpoints with mergekit: linear (soup), slerp family, task arithmetic, TIES, "
        "DARE, DELLA, breadcrumbs, model stock, SCE, karcher; mergekit YAML accepted",
        inputs_in_settings=True,
        compares_inputs=True,
    ),
    "merge.moe": StageEntry(
        "merge.moe:run",
        "merge.moe:MoESettings",
        "sparse MoE (Mixtral, Qwen2-MoE) from dense experts with mergekit-moe, or upcycled "
        "from one model; hidden/cheap_embed/random gates, expert checks, routing report",
        inputs_in_settings=True,
        compares_inputs=True,
    ),
    "merge.lora": StageEntry(
        "merge.lora:run",
        "merge.lora:LoraMergeSettings",
        "fold LoRA adapters (weighted) into their base, or combine them into one adapter "
        "with PEFT: cat, linear, svd, TIES, DARE, magnitude prune",
        compares_inputs=True,
    ),
    "optimize.distill": StageEntry(
        "optimize.distill:run",
        "optimize.distill:DistillSettings",
        "knowledge distillation into a smaller student (layer-dropped or narrower): forward "
        "/ reverse KL or generalized JSD, off-policy, sequence-level or on-policy (GKD)",
        trains=True,
    ),
    "optimize.gptq": StageEntry(
        "optimize.gptq:run",
        "optimize.gptq:GPTQSettings",
        "GPTQ with GPTQModel (2/3/4/8 bits, group size, act-order, sym) on CPU or GPU; "
        "calibration from task data or a dataset; tokens per expert for MoE",
    ),
    "optimize.onebit": StageEntry(
        "optimize.onebit:run",
        "optimize.onebit:OneBitSettings",
        "1-bit (OneBit sign-value) or ternary (BitNet b1.58) weights, packed, with recovery "
        "by straight-through distillation from the full-precision parent",
        trains=True,
    ),
    "optimize.prune": StageEntry(
        "optimize.prune:run",
        "optimize.prune:PruneSettings",
        "one-shot pruning of the decoder's linear layers by Wanda (|weight| x input norm) or "
        "magnitude, unstructured or N:M (2:4), with recovery by distillation from the dense "
        "parent, the pruned weights held at zero",
        trains=True,
    ),
    "optimize.onnx": StageEntry(
        "optimize.onnx:run",
        "optimize.onnx:OnnxSettings",
        "export to ONNX with onnxruntime-genai's model builder (fp32, fp16, int8, int4; cpu "
        "or cuda), with a greedy and logit parity check against the torch model",
    ),
    "optimize.gguf": StageEntry(
        "optimize.gguf:run",
        "optimize.gguf:GgufSettings",
        "export to GGUF for llama.cpp and Ollama (f16, q8_0, q4_0, q4_k_m, ... by llama.cpp's "
        "converter and quantizer), with the chat template, lineage, a Modelfile and parity",
    ),
}


# Deployment packagers (`polm package TARGET CKPT --out DIR`): "module:function" with signature
# package(ckpt, out, **options) -> Path, imported on use like the stages.
PACKAGERS: dict[str, str] = {
    "edge": "serve.edge:package_edge",
    "bento": "serve.bento:package_bento",
}
# how to run a package a packager wrote ({path}: where it is), for the end of `polm run`
PACKAGE_USE: dict[str, str] = {
    "edge": "see {path}/README.txt",
    "bento": "bentoml serve {path}",
}
# each packager's check of a package it wrote: check(path) raises PolmError unless whole
PACKAGE_CHECKS: dict[str, str] = {
    "edge": "serve.edge:check_package",
    "bento": "serve.bento:check_package",
}


def packager(target: str):
    if target not in PACKAGERS:
        raise PolmError(f"unknown package target {target!r}; known: {', '.join(PACKAGERS)}.")
    return _resolve(PACKAGERS[target])


def packager_check(target: str, path) -> None:
    """Check a ``target`` package at ``path`` (raises PolmError unless it is whole)."""
    _resolve(PACKAGE_CHECKS[target])(path)


def packager_options(target: str) -> list[str]:
    """The keyword options a packager takes (beside the checkpoint and the output path)."""
    import inspect

    params = list(inspect.signature(packager(target)).parameters.values())[2:]
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def get_stage(name: str) -> StageEntry:
    try:
        return STAGES[name]
    except KeyError:
        hint = difflib.get_close_matches(name, STAGES, n=1)
        raise PolmError(
            f"unknown stage {name!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
            f"the known stages are: {', '.join(sorted(STAGES))}."
        ) from None


def _resolve(ref: str):
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def stage_function(name: str):
    return _resolve(get_stage(name).run)


def settings_class(name: str):
    return _resolve(get_stage(name).settings)
