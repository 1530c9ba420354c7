"""Peak resident memory of ``merge.mergekit`` against the size of its largest input, and against
mergekit's ``run_merge`` on the same job, in one run.

    .venv/bin/python bench/merge_memory.py [--hidden 1536] [--layers 10]

The inputs are a Llama of polm's tiny architecture made larger (random weights: 1536 wide, 10
layers, ~250M parameters, ~1 GB of fp32 safetensors, the size of Gemma 3 270M in fp32) and two
seeded perturbations of it;
the job is a TIES merge of the two onto it (density 0.5). Each merge runs in a fresh child
process that imports everything first, records its RSS (the baseline: Python, torch,
transformers, mergekit), merges, and reports its peak RSS (``getrusage``). Printed: peak /
largest input (target <= 1.5), what the merge itself added over the baseline / largest input,
and polm's peak / run_merge's peak. The baseline (~420 MB) does not shrink with the model: a
200 MB job cannot be under 1.5x, whatever the merge does, so the job is a real model's size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("TQDM_DISABLE", "1")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    """This process's resident high-water mark (``VmHWM``). Not ``getrusage``'s ``ru_maxrss``:
    Linux carries that across fork and exec, so a child spawned by a process that had just
    written 3 GB of inputs reported the parent's peak as its own (2667 MB for a merge whose
    own peak was under 1 GB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def build_inputs(work: Path, hidden: int, layers: int):
    """A base checkpoint of the given size and two perturbed copies (its children)."""
    from overhead import perturbed

    from polm.importer import import_model
    from polm.models import tiny_model
    from polm.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = tiny_model(
        "llama",
        seed=0,
        vocab_size=len(tok),
        tokenizer=tok,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=hidden // 64,
        num_kv_heads=max(1, hidden // 256),
        intermediate_size=hidden * 8 // 3 // 64 * 64,
    )
    src = work / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    del model
    base = import_model(str(src), work / "base")
    models = [perturbed(base, work / f"ft{i}", seed=i) for i in (1, 2)]
    return base, models


class PeakSplit:
    """Peaks of the anonymous (heap: tensors, buffers) and file-backed (mmap'd weights, page
    cache mapped into the process) parts of RSS, sampled from /proc every 10 ms."""

    def __init__(self):
        import threading

        self.anon = self.file = 0.0
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            fields = {}
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(("RssAnon", "RssFile", "RssShmem")):
                        key, value = line.split(":")
                        fields[key] = int(value.split()[0]) / 1024
            self.anon = max(self.anon, fields.get("RssAnon", 0))
            self.file = max(self.file, fields.get("RssFile", 0) + fields.get("RssShmem", 0))
            time.sleep(0.01)

    def stop(self):
        self.running = False
        self.thread.join()


def child(which: str, paths: list[str], out: str) -> None:
    """Run in a fresh process: import, note the baseline, merge, report the peak."""
    import torch  # noqa: F401
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from overhead import merge_job

    import merge.mergekit  # noqa: F401
    from polm.checkpoint import Checkpoint
    from polm.registry import stage_function

    base, *models = [Checkpoint.open(p) for p in paths]
    s, cfg, options = merge_job(base, models)
    baseline = rss_mb()
    split = PeakSplit()
    if which == "polm":
        stage_function("merge.mergekit")([base, *models], s, Path(out))
    else:
        run_merge(MergeConfiguration.model_validate(cfg), out, options=options)
    split.stop()
    print(
        json.dumps(
            {
                "baseline_mb": baseline,
                "peak_mb": peak_mb(),
                "peak_anon_mb": split.anon,
                "peak_file_mb": split.file,
            }
        )
    )


def run_child(which: str, paths: list[str], out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--out", str(out), *paths]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(REPO)}
    )
    if proc.returncode:
        raise RuntimeError(f"{which} merge failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(work: Path, hidden: int = 1536, layers: int = 10) -> list[dict]:
    base, models = build_inputs(work, hidden, layers)
    paths = [str(c.path) for c in (base, *models)]
    largest = (
        max(sum(f.stat().st_size for f in Path(p).glob("*.safetensors")) for p in paths) / 2**20
    )
    res = {w: run_child(w, paths, work / f"out-{w}") for w in ("bare", "polm")}
    p, b = res["polm"], res["bare"]
    job = f"TIES of 2 on a base, largest input {largest:.0f} MB"
    split = "peak anon {peak_anon_mb:.0f} MB, file-backed {peak_file_mb:.0f} MB".format
    common = {"bench": "merge-memory", "target": "<= 1.5"}
    return [
        common
        | {
            "measure": f"merge.mergekit peak RSS MB vs largest input MB ({job})",
            "polm": round(p["peak_mb"]),
            "reference": round(largest),
            "ratio": round(p["peak_mb"] / largest, 3),
            "note": f"baseline after imports {p['baseline_mb']:.0f} MB; {split(**p)}",
        },
        common
        | {
            "measure": "merge.mergekit RSS added by the merge (peak - baseline) vs largest input",
            "polm": round(p["peak_mb"] - p["baseline_mb"]),
            "reference": round(largest),
            "ratio": round((p["peak_mb"] - p["baseline_mb"]) / largest, 3),
            "note": "mergekit's output shard (held until out_shard_size: polm's default an "
            "eighth of the largest input, mergekit's 5B), the tensors being merged, allocator "
            "slack",
        },
        common
        | {
            "measure": "merge.mergekit peak RSS MB vs mergekit run_merge peak RSS MB",
            "polm": round(p["peak_mb"]),
            "reference": round(b["peak_mb"]),
            "ratio": round(p["peak_mb"] / b["peak_mb"], 3),
            "target": None,
            "note": "run_merge, same options (out_shard_size included): baseline "
            f"{b['baseline_mb']:.0f} MB, {split(**b)} (its loaders keep every input's shard "
            "mapped)",
        },
    ]


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--child", choices=["polm", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.paths, a.out)
        return
    with tempfile.TemporaryDirectory(prefix="polm-bench-merge-memory-") as tmp:
        for r in measure(Path(tmp), a.hidden, a.layers):
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
