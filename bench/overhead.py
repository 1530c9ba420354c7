"""Each stage's overhead over the library it wraps, on the same job, side by side in one run:
``align.sft`` vs TRL's ``SFTTrainer``, ``merge.mergekit`` vs mergekit's ``run_merge``,
``optimize.gptq`` vs GPTQModel, ``optimize.onnx`` vs onnxruntime-genai's model builder.

    .venv/bin/python bench/overhead.py [--only sft merge gptq onnx] [--repeats 3]

polm's side is the stage function as the registry hands it out
(``stage_function(name)(inputs, settings, out)``): settings checks, data, the library call,
polm's checks, the manifest and its content hash; never the evaluation ``polm run`` adds after
a stage. The bare side is the same job written against the library alone, with the settings
the stage passes to it. Each side runs once untimed (imports, first-call costs, disk cache),
then ``--repeats`` times, the two alternating; the ratio is of the medians (target <= 1.05).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")
TARGET = "<= 1.05"


def side_by_side(
    polm: Callable[[Path], None], bare: Callable[[Path], None], work: Path, repeats: int
) -> tuple[float, float, list[float], list[float]]:
    """Median wall seconds of ``polm(out)`` and ``bare(out)``: one untimed warm-up each, then
    ``repeats`` rounds alternating which goes first."""
    times: dict[str, list[float]] = {"polm": [], "bare": []}
    fns = {"polm": polm, "bare": bare}
    for i in range(repeats + 1):
        order = ("polm", "bare") if i % 2 == 0 else ("bare", "polm")
        for name in order:
            out = work / f"{name}-{i}"
            t = time.perf_counter()
            fns[name](out)
            wall = time.perf_counter() - t
            shutil.rmtree(out, ignore_errors=True)
            if i:  # round 0 is the warm-up
                times[name].append(wall)
    med = statistics.median
    return med(times["polm"]), med(times["bare"]), times["polm"], times["bare"]


def row(stage: str, library: str, job: str, result) -> dict:
    ours, theirs, all_ours, all_theirs = result
    return {
        "bench": f"overhead.{stage.split('.')[-1]}",
        "measure": f"{stage} vs {library} ({job}), wall s",
        "polm": round(ours, 3),
        "reference": round(theirs, 3),
        "ratio": round(ours / theirs, 3),
        "target": TARGET,
        "note": "runs polm "
        + " ".join(f"{t:.2f}" for t in all_ours)
        + " / bare "
        + " ".join(f"{t:.2f}" for t in all_theirs),
    }


def tiny_base(work: Path):
    from polm.importer import import_model

    return import_model("builtin:tiny-base", work / "base")


# --- align.sft vs TRL ----------------------------------------------------------------------


def sft(work: Path, repeats: int, steps: int = 20) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from polm.data import task_dataset
    from polm.registry import settings_class, stage_function

    base = tiny_base(work)
    s = settings_class("align.sft")(task="add", max_steps=steps, logging_steps=10)
    stage = stage_function("align.sft")

    def polm(out: Path) -> None:
        stage([base], s, out)

    def bare(out: Path) -> None:
        # what a user writes with TRL alone: the same model, rows, and every config field polm
        # passes (polm.training.trainer_args with this stage's defaults, spelled out)
        torch.manual_seed(s.seed)
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(base.path)
        data = task_dataset(["add"], "messages", steps * s.per_device_train_batch_size, s.seed)
        args = SFTConfig(
            output_dir=str(out / "scratch"),
            use_cpu=True,
            bf16=s.bf16,
            num_train_epochs=s.num_train_epochs,
            max_steps=steps,
            learning_rate=s.learning_rate,
            per_device_train_batch_size=s.per_device_train_batch_size,
            gradient_accumulation_steps=1,
            lr_scheduler_type=s.lr_scheduler_type,
            warmup_steps=s.warmup_steps,
            weight_decay=s.weight_decay,
            max_length=s.max_length,
            seed=s.seed,
            data_seed=s.seed,
            logging_steps=s.logging_steps,
            logging_first_step=True,
            save_strategy="no",
            report_to="none",
            full_determinism=True,
            dataloader_num_workers=0,
            gradient_checkpointing=False,
            packing=False,
            assistant_only_loss=True,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
        trainer.save_model(str(out))
        tokenizer.save_pretrained(str(out))

    job = f"tiny-base, add, {steps} steps x {s.per_device_train_batch_size}, bf16={s.bf16}"
    return [row("align.sft", "TRL SFTTrainer", job, side_by_side(polm, bare, work, repeats))]


# --- merge.mergekit vs run_merge -------------------------------------------------------------


def perturbed(base, out: Path, seed: int, scale: float = 0.02):
    """A copy of ``base`` with seeded noise on every weight, as a checkpoint whose parent is
    ``base`` (a stand-in for a fine-tuned model)."""
    import torch
    from safetensors.torch import load_file, save_file

    from polm.checkpoint import staging
    from polm.stage import carry_files

    g = torch.Generator().manual_seed(seed)
    with staging(out) as st:
        for f in base.path.glob("*.safetensors"):
            tensors = load_file(f)
            for k, t in tensors.items():
                tensors[k] = t + scale * torch.randn(t.shape, generator=g, dtype=t.dtype)
            save_file(tensors, st.dir / f.name, metadata={"format": "pt"})
        shutil.copy2(base.path / "config.json", st.dir / "config.json")
        carry_files(base.path, st.dir)
        return st.commit(stage="bench.perturb", format="hf", settings=None, parents=[base])


def merge_job(base, models, method: str = "ties"):
    """polm's settings and the (config dict, MergeOptions) the stage builds from them."""
    from merge.mergekit import merge_options, plan, weights_bytes
    from polm.registry import settings_class

    s = settings_class("merge.mergekit")(
        merge_method=method, base_model=0, parameters={"density": 0.5}
    )
    cfg, used = plan(s, [base, *models])
    return s, cfg, merge_options(s, max(weights_bytes(c.path) for c in used))


def merge(work: Path, repeats: int, base=None) -> list[dict]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    from polm.registry import stage_function
    from polm.stage import carry_files

    base = base or tiny_base(work)
    models = [perturbed(base, work / f"ft{i}", seed=i) for i in (1, 2)]
    s, cfg, options = merge_job(base, models)
    stage = stage_function("merge.mergekit")

    def polm(out: Path) -> None:
        stage([base, *models], s, out)

    def bare(out: Path) -> None:
        run_merge(MergeConfiguration.model_validate(cfg), str(out), options=options)
        carry_files(base.path, out)  # the tokenizer: what polm's copy of it costs, bare

    size = sum(f.stat().st_size for f in base.path.glob("*.safetensors")) / 2**20
    job = f"ties of 2 models on a base, {size:.1f} MB each"
    result = side_by_side(polm, bare, work, repeats)
    return [row("merge.mergekit", "mergekit run_merge", job, result)]


# --- optimize.gptq vs GPTQModel --------------------------------------------------------------


def gptq(work: Path, repeats: int) -> list[dict]:
    import contextlib
    import io

    import torch

    from optimize.gptq import _gptqmodel, calibration_texts
    from polm.loading import load_tokenizer
    from polm.registry import settings_class, stage_function

    base = tiny_base(work)
    s = settings_class("optimize.gptq")(task="add", bits=4, group_size=32, n_calibration=128)
    stage = stage_function("optimize.gptq")
    gptqmodel = _gptqmodel()  # the same environment for both (CPU workers, no pack extension)

    def polm(out: Path) -> None:
        stage([base], s, out)

    def bare(out: Path) -> None:
        tokenizer = load_tokenizer(base.path)
        texts = calibration_texts(s, tokenizer)  # the same calibration chats
        config = gptqmodel.QuantizeConfig(
            bits=s.bits,
            group_size=s.group_size,
            desc_act=s.desc_act,
            sym=s.sym,
            damp_percent=s.damp_percent,
            offload_to_disk=False,
        )
        q = gptqmodel.GPTQModel.load(str(base.path), config, device="cpu", dtype=torch.float32)
        q.quantize(texts, batch_size=s.batch_size, tokenizer=tokenizer)
        with contextlib.redirect_stdout(io.StringIO()):
            q.save(str(out))

    job = f"tiny-base, {s.bits}-bit g{s.group_size}, {s.n_calibration} calibration chats"
    return [row("optimize.gptq", "GPTQModel", job, side_by_side(polm, bare, work, repeats))]


# --- optimize.onnx vs the model builder ------------------------------------------------------


def onnx(work: Path, repeats: int) -> list[dict]:
    import subprocess

    from polm.registry import settings_class, stage_function

    base = tiny_base(work)
    # parity_n=0: the export alone (the parity check, on by default, decodes 100 prompts with
    # both models; it is timed below on its own)
    s = settings_class("optimize.onnx")(precision="int4", parity_n=0)
    stage = stage_function("optimize.onnx")

    def polm(out: Path) -> None:
        stage([base], s, out)

    def bare(out: Path) -> None:
        cmd = [
            sys.executable, "-m", "onnxruntime_genai.models.builder",
            "-i", str(base.path), "-o", str(out), "-p", s.precision,
            "-e", s.execution_provider, "-c", str(out) + ".cache",
            "--extra_options", *s.builder_options(),
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # as polm's
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        shutil.rmtree(str(out) + ".cache", ignore_errors=True)

    job = f"tiny-base, {s.precision}, block {s.block_size}, builder CLI in a child process"
    rows = [row("optimize.onnx", "builder", job, side_by_side(polm, bare, work, repeats))]
    with_parity = settings_class("optimize.onnx")(precision="int4")
    t = time.perf_counter()
    stage([base], with_parity, work / "with-parity")
    wall = time.perf_counter() - t
    rows.append(
        {
            "bench": "overhead.onnx",
            "measure": f"optimize.onnx with its default parity check (parity_n="
            f"{with_parity.parity_n} per task), wall s vs the bare builder",
            "polm": round(wall, 3),
            "reference": rows[0]["reference"],
            "ratio": round(wall / rows[0]["reference"], 3),
            "target": None,
            "note": "the check is a feature (greedy agreement, logit diff in the manifest), "
            "not overhead; parity_n: 0 skips it",
        }
    )
    return rows


JOBS = {"sft": sft, "merge": merge, "gptq": gptq, "onnx": onnx}


def main() -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=list(JOBS), default=list(JOBS))
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    for name in a.only:
        with tempfile.TemporaryDirectory(prefix=f"polm-bench-{name}-") as tmp:
            for r in JOBS[name](Path(tmp), a.repeats):
                print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
