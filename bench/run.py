"""Every side-by-side benchmark in one run: one table, saved as JSON and markdown.

    make bench                                   # = .venv/bin/python bench/run.py
    .venv/bin/python bench/run.py [--only NAME...] [--include NAME...] [--out runs/bench]

Runs by default (CPU only, about 10-15 minutes on 2 cores):

  overhead-sft, overhead-merge,   each stage's wall time over its bare library on the same
  overhead-gptq, overhead-onnx    job (bench/overhead.py; target <= 1.05)
  roofline                        memory bandwidth and decode tok/s of the serving backends
                                  as a fraction of bandwidth / weight bytes (bench/roofline.py;
                                  adds Gemma 3 270M when its PyPI package is installed)
  merge-memory                    merge.mergekit's peak RSS vs its largest input and vs
                                  run_merge (bench/merge_memory.py; target <= 1.5)
  decode                          onnxruntime-genai int4 vs torch ``generate`` decode speed
                                  (bench/compress.py's comparison; its GPTQ half is
                                  overhead-gptq)
  precision                       an SFT step in bf16 vs fp32 (bench/precision.py, 20 steps)
  moe-quality                     the MoE of recipes/moe.yaml vs its experts
                                  (bench/moe_quality.py)
  calibrations                    the long quality calibrations (bench/calibrations/,
                                  pytest on two workers, ~15 minutes): RLHF, DPO's defaults,
                                  LoRA and replay SFT, distillation, 1-bit recovery; the test
                                  suite keeps a short check of each. One row per calibration
  speculative                     greedy decode of a tiny-base teacher alone and with distilled
                                  drafts, torch and ONNX (bench/speculative.py, ~2 minutes)

Separate, added with ``--include NAME`` (their output is kept in the JSON, one row each):

  sft-quality      bench/sft_quality.py: 2 seeds x 400 + 600 SFT steps (~20 min on 2 cores)
  serve            bench/serve.py: HTTP servers incl. llama.cpp (``make bench-serve`` installs
                   llama-cpp-python[server] and the Gemma GGUF first)
  serve-gpu        bench/serve_gpu.py: the transformers backend on a CUDA GPU
  vllm             bench/vllm_throughput.py: polm on vLLM vs bare ``vllm serve`` (GPU +
                   ``polm[vllm]``)
  gguf             bench/gguf_export.py: polm's q4_0 / q4_k_m GGUF exports of Gemma 3 270M vs the
                   Q4_K_M file it came from, in llama.cpp (perplexity, decode tok/s)

Each benchmark runs in its own child process (one failure leaves the others' rows; its log
is under ``<out>/logs/``). Ratios are measured side by side within one child, so they hold
while other work shares the machine; absolute times do not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))


# --- the benchmarks: each returns rows {bench, measure, polm, reference, ratio, target, note}


def _overhead(job: str):
    def run(a) -> list[dict]:
        import overhead

        with tempfile.TemporaryDirectory(prefix=f"polm-bench-{job}-") as tmp:
            return overhead.JOBS[job](Path(tmp), a.repeats)

    return run


def roofline(a) -> list[dict]:
    import roofline

    a.work.mkdir(parents=True, exist_ok=True)
    return roofline.measure(a.work, skip_gemma=a.skip_gemma)


def merge_memory(a) -> list[dict]:
    import merge_memory

    with tempfile.TemporaryDirectory(prefix="polm-bench-merge-memory-") as tmp:
        return merge_memory.measure(Path(tmp))


def gguf(a) -> list[dict]:
    import gguf_export  # bench/gguf_export.py (not gguf.py: that would shadow the gguf package)

    return gguf_export.measure(a.work / "gguf")


def decode(a) -> list[dict]:
    from compress import decode_speed

    from polm.importer import import_model
    from polm.registry import settings_class, stage_function

    tokens = 64
    with tempfile.TemporaryDirectory(prefix="polm-bench-decode-") as tmp:
        base = import_model("builtin:tiny-base", Path(tmp) / "base")
        s = settings_class("optimize.onnx")(precision="int4", parity_n=0)
        onnx = stage_function("optimize.onnx")([base], s, Path(tmp) / "onnx")
        og, pt = decode_speed(base, onnx.path, tokens, a.repeats)
    return [
        {
            "bench": "decode",
            "measure": "tiny-base decode tok/s: onnxruntime-genai int4 vs torch fp32 generate",
            "polm": round(og, 1),
            "reference": round(pt, 1),
            "ratio": round(og / pt, 2),
            "target": None,
            "note": f"batch 1, greedy, {tokens} tokens forced, median of {a.repeats}",
        }
    ]


def precision(a) -> list[dict]:
    from precision import measure

    m = measure(steps=20, threads=a.threads)
    auto = "bf16" if m["auto"] else "fp32"
    faster = "bf16" if m["bf16_s"] < m["fp32_s"] else "fp32"
    return [
        {
            "bench": "precision",
            "measure": "align.sft s/step, bf16 autocast vs fp32 (tiny-base, 20 steps)",
            "polm": round(m["bf16_s"], 4),
            "reference": round(m["fp32_s"], 4),
            "ratio": round(m["bf16_s"] / m["fp32_s"], 3),
            "target": None,
            "note": f"native bf16 flags: {', '.join(m['native'])}; bf16: auto -> {auto}"
            f" ({'the faster' if auto == faster else 'NOT the faster'} here)",
        }
    ]


def moe_quality(a) -> list[dict]:
    from moe_quality import measure

    return [
        {
            "bench": "moe-quality",
            "measure": f"recipes/moe.yaml, {r['task']}: MoE accuracy vs its expert's (500)",
            "polm": round(r["moe"], 3),
            "reference": round(r["expert"], 3),
            "ratio": round(r["moe"] / r["expert"], 3) if r["expert"] else None,
            "target": ">= 0.95",
            "note": f"{r['routed']:.1%} of {r['task']} tokens routed to its own expert "
            "(target >= 70%)",
        }
        for r in measure(500)
    ]


def calibrations(a) -> list[dict]:
    """bench/calibrations/: the long quality calibrations the test suite keeps a short check of.
    One row per calibration: pass or FAIL, what it measured, and why it failed."""
    import xml.etree.ElementTree as ET

    with tempfile.TemporaryDirectory(prefix="polm-bench-calibrations-") as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile"]
        cmd += ["-p", "no:cacheprovider", f"--junitxml={xml}", f"--basetemp={tmp}/t"]
        env = os.environ | {"OMP_NUM_THREADS": str(max(1, a.threads // 2))}
        subprocess.run([*cmd, str(BENCH / "calibrations")], cwd=REPO, env=env)
        rows = []
        for case in ET.parse(xml).getroot().iter("testcase"):
            bad = case.find("failure")
            bad = case.find("error") if bad is None else bad
            skipped = case.find("skipped") is not None
            name = case.get("name")
            measured = [f"{p.get('name')} {p.get('value')}" for p in case.iter("property")]
            why = (bad.get("message") or "").splitlines()[:1] if bad is not None else []
            rows.append(
                {
                    "bench": "calibrations",
                    "measure": f"{case.get('classname', '').rsplit('.', 1)[-1]}::{name}",
                    "polm": "skip" if skipped else ("FAIL" if bad is not None else "pass"),
                    "reference": None,
                    "ratio": None,
                    "target": None,
                    "note": "; ".join([*measured, *why, f"{float(case.get('time', 0)):.0f} s"]),
                }
            )
    return rows


def _script(name: str, argv: list[str], what: str):
    """A benchmark that stays its own script: run it, keep its output, one row."""

    def run(a) -> list[dict]:
        proc = subprocess.run(
            [sys.executable, str(BENCH / argv[0]), *argv[1:]],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-40:]
        return [
            {
                "bench": name,
                "measure": what,
                "polm": None,
                "reference": None,
                "ratio": None,
                "target": None,
                "note": f"exit {proc.returncode}; its own table is in the JSON (output)",
                "output": "\n".join(tail),
            }
        ]

    return run


DEFAULT = {
    "overhead-sft": _overhead("sft"),
    "overhead-merge": _overhead("merge"),
    "overhead-gptq": _overhead("gptq"),
    "overhead-onnx": _overhead("onnx"),
    "roofline": roofline,
    "merge-memory": merge_memory,
    "decode": decode,
    "precision": precision,
    "moe-quality": moe_quality,
    "calibrations": calibrations,
    "speculative": _script(
        "speculative", ["speculative.py"], "greedy decode with distilled drafts vs alone"
    ),
}
OPTIONAL = {
    "sft-quality": _script("sft-quality", ["sft_quality.py"], "SFT accuracy per step budget"),
    "serve": _script("serve", ["serve.py"], "HTTP serving: polm (ONNX, transformers) vs llama.cpp"),
    "serve-gpu": _script("serve-gpu", ["serve_gpu.py"], "transformers backend on a CUDA GPU"),
    "vllm": _script("vllm", ["vllm_throughput.py"], "polm on vLLM vs bare vllm serve"),
    "gguf": gguf,
}
ALL = DEFAULT | OPTIONAL


# --- running, the table, the files -----------------------------------------------------------


def run_child(name: str, a, logs: Path) -> tuple[list[dict], float]:
    """Run benchmark ``name`` in a child process; its rows, or one row saying it failed."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        rows_file = Path(f.name)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--rows",
        str(rows_file),
        "--repeats",
        str(a.repeats),
        "--work",
        str(a.work),
        "--threads",
        str(a.threads),
    ]
    if a.skip_gemma:
        cmd.append("--skip-gemma")
    env = os.environ | {"PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    if name != "roofline":
        env["OMP_NUM_THREADS"] = str(a.threads)
    t = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t
    try:
        rows = json.loads(rows_file.read_text()) if proc.returncode == 0 else None
    except json.JSONDecodeError:
        rows = None
    rows_file.unlink(missing_ok=True)
    if rows is None:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
        rows = [
            {
                "bench": name,
                "measure": "FAILED",
                "polm": None,
                "reference": None,
                "ratio": None,
                "target": None,
                "note": f"{tail[0][:200]} (see {log})",
            }
        ]
    return rows, wall


def meets(row: dict) -> str:
    target, ratio = row.get("target"), row.get("ratio")
    if not target or ratio is None:
        return ""
    op, value = target.split()
    ok = ratio <= float(value) if op == "<=" else ratio >= float(value)
    return "yes" if ok else "NO"


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
    return str(v)


COLUMNS = ("bench", "measure", "polm", "reference", "ratio", "target", "meets")


def markdown(rows: list[dict], machine: dict) -> str:
    head = (
        f"# make bench\n\n{machine['cpu']}, {machine['cores']} cores, load average at start "
        f"{machine['load_start']}, commit {machine['commit']}, {machine['date']}\n\n"
    )
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [fmt(r.get(c)) if c != "meets" else meets(r) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- **{r['bench']}** {r['measure']}: {r['note']}" for r in rows if r.get("note")]
    return head + "\n".join(lines) + "\n\nNotes:\n\n" + "\n".join(notes) + "\n"


def print_table(rows: list[dict], machine: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"make bench: {machine['cpu']}, {machine['cores']} cores")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("bench", "measure") else "right")
    for r in rows:
        table.add_row(*[fmt(r.get(c)) if c != "meets" else meets(r) for c in COLUMNS])
    Console(width=200).print(table)


def save(out: Path, rows: list[dict], machine: dict) -> None:
    """bench.json and bench.md, rewritten after every benchmark (a stopped run keeps its rows)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    (out / "bench.md").write_text(markdown(rows, machine))


def machine_info() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")),
        platform.processor() or "?",
    )
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        or "?"
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("--only", nargs="+", choices=list(ALL), help="run just these")
    p.add_argument(
        "--include",
        nargs="+",
        choices=list(OPTIONAL),
        default=[],
        help="add these separate benchmarks to the default set",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side")
    p.add_argument("--skip-gemma", action="store_true", help="roofline: tiny-base only")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch / OpenMP threads of every job, both sides alike (default: all cores; 1 "
        "holds up better while other work shares the cores); the roofline uses all cores",
    )
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    p.add_argument(
        "--work",
        type=Path,
        default=Path.home() / ".cache" / "polm" / "bench",
        help="cached exports (Gemma), shared with bench/serve.py",
    )
    p.add_argument("--child", choices=list(ALL), help=argparse.SUPPRESS)
    p.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.child:  # one benchmark, in this (child) process
        import torch

        torch.set_num_threads(a.threads)
        rows = ALL[a.child](a)
        a.rows.write_text(json.dumps(rows))
        return

    names = a.only or [*DEFAULT, *a.include]
    machine = machine_info()
    machine["threads"] = a.threads
    print(
        f"{machine['cpu']}, {machine['cores']} cores, {a.threads} threads, "
        f"load {machine['load_start']}; "
        f"running: {', '.join(names)}",
        flush=True,
    )
    rows: list[dict] = []
    walls = {}
    for name in names:
        got, walls[name] = run_child(name, a, a.out / "logs")
        for r in got:
            print(
                f"  {r['bench']:<15} {r['measure'][:90]:<90} ratio {fmt(r.get('ratio'))}",
                flush=True,
            )
        rows += got
        save(a.out, rows, machine | {"wall_s": {k: round(v, 1) for k, v in walls.items()}})
    print_table(rows, machine)
    total = sum(walls.values())
    print(f"{total / 60:.1f} min; saved {a.out / 'bench.json'} and {a.out / 'bench.md'}")


if __name__ == "__main__":
    main()
