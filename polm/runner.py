"""``polm run``: execute a recipe stage by stage, skip what is already done, evaluate every output.

Each stage's *input hash* covers its stage name, its full settings (defaults included) and its
inputs' content hashes. A stage whose output manifest carries the same input hash is skipped;
a changed setting changes that hash and, through the new output's content hash, the hashes of
everything downstream, so exactly the changed stage and its descendants re-run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from polm.checkpoint import Checkpoint
from polm.errors import PolmError
from polm.recipe import Recipe, check_models, load_recipe
from polm.resources import PeakRSS


@dataclass
class StageResult:
    id: str
    uses: str
    status: str  # "ran" or "cached"
    wall_s: float
    checkpoint: Checkpoint
    metrics: dict = field(default_factory=dict)


def input_hash(stage: str, settings: dict, inputs: list[Checkpoint]) -> str:
    blob = json.dumps(
        {"stage": stage, "settings": settings, "inputs": [c.manifest.content_hash for c in inputs]},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def finished(out: Path, ihash: str) -> Checkpoint | None:
    """The checkpoint at ``out`` if it is whole and was made from exactly these inputs."""
    try:
        ckpt = Checkpoint.open(out)
    except PolmError:
        return None
    return ckpt if ckpt.manifest.input_hash == ihash else None


def clean_stale(out: Path) -> None:
    """Remove temporary siblings left by an interrupted write of ``out`` (saved training steps,
    ``.<out>.resume-*``, stay: the stage resumes from them when its inputs are unchanged)."""
    from polm.training import RESUME_PREFIX

    for tmp in out.parent.glob(f".{out.name}.*"):
        if tmp.name.startswith(f".{out.name}.{RESUME_PREFIX}"):
            continue
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def run_stage(uses: str, inputs: list[Checkpoint], settings, out: Path, nproc: int = 1):
    from polm.registry import stage_function

    if nproc > 1:
        from polm.launch import launch

        return launch(uses, inputs, settings, out, nproc)
    return stage_function(uses)(inputs, settings, out)


class _Lock:
    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.fh = open(root / ".lock", "w")

    def __enter__(self):
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PolmError(
                f"another `polm run` is using {Path(self.fh.name).parent}; wait "
                "for it to finish or choose another --workdir."
            ) from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def run_recipe(
    path: str | Path,
    workdir: str | Path | None = None,
    console=None,
    eval_n: int | None = None,
    verbose: bool = True,
) -> list[StageResult]:
    """Run every stage of the recipe at ``path``; return one result per model and stage.

    ``verbose=False`` (the CLI without ``-v``) shows one progress bar and one result line per
    stage; each stage's other output goes to ``<workdir>/logs/<stage>.log``."""
    from rich.console import Console

    from polm.evaluate import evaluate_checkpoint
    from polm.importer import import_model, source_fingerprint
    from polm.registry import get_stage

    console = console or Console(stderr=True)
    recipe = load_recipe(path)
    check_models(recipe)  # a missing model fails before any stage trains
    root = Path(workdir) if workdir else Path("runs") / recipe.name
    results: list[StageResult] = []
    ckpts: dict[str, Checkpoint] = {}

    def finish(sid: str, uses: str, out: Path, ihash: str, make, inputs=None) -> None:
        """``inputs``: the stage's inputs by recipe name (a merge is compared with them)."""
        done = finished(out, ihash)
        if done is not None:
            console.print(
                f"[dim]= {sid} ({uses}): unchanged, skipped ({out})[/dim]", soft_wrap=True
            )
            results.append(
                StageResult(
                    sid,
                    uses,
                    "cached",
                    done.manifest.metrics.get("wall_s", 0),
                    done,
                    done.manifest.metrics,
                )
            )
            ckpts[sid] = done
            return
        clean_stale(out)
        if verbose:
            console.rule(f"[bold]{sid}[/bold] ({uses})")
        log_path = None if verbose else root / "logs" / f"{sid}.log"
        with stage_output(console, sid, uses, log_path) as bar, PeakRSS() as rss:
            t0 = time.perf_counter()
            ckpt = make()
            wall = time.perf_counter() - t0
            if bar is not None:
                bar.start(f"evaluating on {', '.join(recipe.eval) or 'perplexity'}")
            metrics = evaluate_checkpoint(ckpt, recipe.eval, n=eval_n or recipe.eval_n)
        metrics["wall_s"] = round(wall, 2)
        metrics["peak_rss_bytes"] = rss.peak_bytes  # the stage and its evaluation
        if len(inputs or {}) > 1 and get_stage(uses).compares_inputs:
            metrics.update(merge_comparison(metrics, inputs, recipe.eval))
        # The stage wrote the checkpoint whole; the runner adds what only it knows (the recipe's
        # evaluation, the input hash). update_metrics replaces polm.json in one rename, so a
        # kill here leaves the stage's own manifest, never a half-written one.
        ckpt.update_metrics(metrics, input_hash=ihash)
        results.append(StageResult(sid, uses, "ran", wall, ckpt, ckpt.manifest.metrics))
        ckpts[sid] = ckpt
        if not verbose:
            console.print(result_line(sid, uses, wall, ckpt, recipe.eval), soft_wrap=True)

    with _Lock(root):
        for name, source in recipe.models.items():
            ihash = hashlib.sha256(f"import\0{source_fingerprint(source)}".encode()).hexdigest()
            finish(
                name,
                "import",
                root / "models" / name,
                ihash,
                lambda s=source, n=name: import_model(s, root / "models" / n),
            )
        for sid in recipe.order():
            spec, settings = recipe.stages[sid], recipe.settings[sid]
            inputs = [ckpts[s] for s in spec.from_]
            ihash = input_hash(spec.uses, settings.model_dump(mode="json"), inputs)
            finish(
                sid,
                spec.uses,
                root / sid,
                ihash,
                lambda sp=spec, st=settings, i=inputs, s=sid: run_stage(
                    sp.uses, i, st, root / s, sp.nproc
                ),
                dict(zip(spec.from_, inputs)),
            )
        write_report(recipe, root, results)
    out = result_console()
    out.print(summary_table(recipe.name, results, recipe.eval))
    for line in merge_summary(results, recipe.eval):
        out.print(line)
    return results


@contextlib.contextmanager
def stage_output(console, sid: str, uses: str, log_path: Path | None):
    """One stage under its progress bar (quiet: ``log_path`` given); a failure other than a
    PolmError becomes one paragraph that points at the log, where the traceback is."""
    from polm.progress import stage_output as bar_output

    with bar_output(console, sid, log_path) as bar:
        if bar is not None:
            bar.start(uses)
        try:
            yield bar
        except (PolmError, KeyboardInterrupt):
            raise
        except Exception as e:
            if log_path is None:
                raise
            traceback.print_exc()  # into the log
            first = (str(e).strip().splitlines() or [""])[0]
            raise PolmError(
                f"stage {sid!r} ({uses}) failed: {type(e).__name__}: {first}\n"
                f"Its whole output, with the traceback, is in {log_path}; run with -v to see "
                "it as it happens."
            ) from e


def result_line(sid: str, uses: str, wall: float, ckpt: Checkpoint, tasks: list[str]) -> str:
    """The one line a finished stage leaves on the screen."""
    m = ckpt.manifest.metrics
    parts = [f"{t} {m[f'eval.{t}.accuracy']:.1%}" for t in tasks if f"eval.{t}.accuracy" in m]
    if "perplexity" in m:
        parts.append(f"ppl {m['perplexity']:.3f}")
    if "size_bytes" in m:
        parts.append(f"{m['size_bytes'] / 2**20:.1f} MB")
    if "bits_per_weight" in m:
        parts.append(f"{m['bits_per_weight']:.2f} bits/w")
    return (
        f"[green]✓[/green] [bold]{sid}[/bold] ({uses}) {wall:.1f} s  "
        + "  ".join(parts)
        + f"  [dim]-> {ckpt.path}[/dim]"
    )


def merge_comparison(metrics: dict, inputs: dict[str, Checkpoint], tasks: list[str]) -> dict:
    """A merge beside what it was made from, per task: each input's accuracy, the base's (the
    input the others descend from, or their shared ancestor), the share of the best input's
    accuracy the merge keeps (``merge.of_best.<task>``) and the share of its gain over the
    base (``merge.gain_kept.<task>``), the measures of model soups and multi-task merges."""
    from polm.checkpoint import shared_ancestor

    base = shared_ancestor(list(inputs.values()))
    experts = {sid: c for sid, c in inputs.items() if base is None or c.path != base.path}
    out: dict = {}
    for task in tasks:
        key = f"eval.{task}.accuracy"
        merged = metrics.get(key)
        accs = {sid: c.manifest.metrics.get(key) for sid, c in experts.items()}
        if merged is None or not accs or None in accs.values():
            continue
        for sid, acc in accs.items():
            out[f"merge.input.{sid}.{task}.accuracy"] = acc
        best = max(accs.values())
        if best > 0:
            out[f"merge.of_best.{task}"] = round(merged / best, 4)
        start = base.manifest.metrics.get(key) if base is not None else None
        if start is not None:
            out[f"merge.base.{task}.accuracy"] = start
            if best > start:
                out[f"merge.gain_kept.{task}"] = round((merged - start) / (best - start), 4)
    return out


def merge_summary(results, tasks: list[str]) -> list[str]:
    """One line per merge: how much of its inputs' gains (or, without a base, of the best
    input's accuracy) it keeps on each task."""
    lines = []
    for r in results:
        parts = []
        for task in tasks:
            if (kept := r.metrics.get(f"merge.gain_kept.{task}")) is not None:
                parts.append(f"{kept:.1%} of the {task} gain")
            elif (kept := r.metrics.get(f"merge.of_best.{task}")) is not None:
                parts.append(f"{kept:.1%} of the best {task} input")
        if parts:
            lines.append(f"{r.id} keeps " + ", ".join(parts))
    return lines


def result_console():
    """Results go to stdout; piped or logged output gets room for the whole table."""
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 140)


def write_report(recipe: Recipe, root: Path, results: list[StageResult]) -> None:
    rows = [
        {
            "id": r.id,
            "uses": r.uses,
            "status": r.status,
            "wall_s": round(r.wall_s, 2),
            "path": str(r.checkpoint.path),
            "content_hash": r.checkpoint.manifest.content_hash,
            "metrics": r.metrics,
        }
        for r in results
    ]
    report = {"name": recipe.name, "eval": recipe.eval, "stages": rows}
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def summary_table(name: str, results, tasks: list[str]):
    """A rich table: stage, status, wall time, eval metrics (``results`` may be report rows)."""
    from rich.table import Table

    table = Table(title=f"polm run {name}")
    for col in (
        "stage",
        "uses",
        "status",
        "wall s",
        *[f"{t} acc" for t in tasks],
        "ppl",
        "params",
        "MB",
        "bits/w",
    ):
        table.add_column(col, justify="left" if col in ("stage", "uses", "status") else "right")
    for r in results:
        r = (
            r
            if isinstance(r, dict)
            else {
                "id": r.id,
                "uses": r.uses,
                "status": r.status,
                "wall_s": r.wall_s,
                "metrics": r.metrics,
            }
        )
        m = r["metrics"]
        accs = [
            f"{m[f'eval.{t}.accuracy']:.1%}" if f"eval.{t}.accuracy" in m else "-" for t in tasks
        ]
        table.add_row(
            r["id"],
            r["uses"],
            r["status"],
            f"{r['wall_s']:.1f}",
            *accs,
            f"{m['perplexity']:.3f}" if "perplexity" in m else "-",
            f"{m.get('params', 0) / 1e6:.2f}M",
            f"{m.get('size_bytes', 0) / 2**20:.1f}",
            f"{m['bits_per_weight']:.2f}" if "bits_per_weight" in m else "-",
        )
    return table
