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

from polm.checkpoint import Checkpoint, write_json_atomic
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
    inputs: list[str] = field(default_factory=list)  # recipe names of its inputs
    gates: list = field(default_factory=list)  # polm.gates.GateResult


def refine_evaluation(recipe, ckpt, n) -> dict:
    """The recipe's self-refine evaluation (``self_refine: N``) of a language model's output,
    on the eval tasks that have a critic; nothing for other outputs."""
    from polm.loading import TORCH_FORMATS, is_reward_model
    from polm.refine import CRITICS, refine_metrics

    tasks = [t for t in recipe.eval if t in CRITICS]
    if not recipe.self_refine or not tasks or ckpt.format not in TORCH_FORMATS:
        return {}
    if is_reward_model(ckpt):
        return {}
    return refine_metrics(ckpt, tasks, n, recipe.self_refine, critic=recipe.self_refine_critic)


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
    gates: bool = True,
) -> list[StageResult]:
    """Run every stage of the recipe at ``path``; return one result per model and stage.

    ``verbose=False`` (the CLI without ``-v``) shows one progress bar and one result line per
    stage; each stage's other output goes to ``<workdir>/logs/<stage>.log``. A failed quality
    gate (:mod:`polm.gates`) keeps the stages downstream of it from running and raises
    :class:`~polm.gates.GateFailed` once the rest has run; ``gates=False`` only reports them."""
    from rich.console import Console

    from polm.evaluate import evaluate_checkpoint
    from polm.gates import GateFailed, check_gate, failure_message
    from polm.importer import import_model, source_fingerprint
    from polm.registry import get_stage

    console = console or Console(stderr=True)
    recipe = load_recipe(path)
    check_models(recipe)  # a missing model fails before any stage trains
    eval_n = eval_n or recipe.eval_n
    root = Path(workdir) if workdir else Path("runs") / recipe.name
    results: list[StageResult] = []
    ckpts: dict[str, Checkpoint] = {}

    def finish(sid: str, uses: str, out: Path, ihash: str, make, inputs=None) -> None:
        """``inputs``: the stage's inputs by recipe name (a merge is compared with them)."""
        done = finished(out, ihash)
        clean_stale(out)  # a kill may leave scratch even beside a finished stage (its old copy)
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
                    list(inputs or {}),
                )
            )
            ckpts[sid] = done
            return
        if verbose:
            console.rule(f"[bold]{sid}[/bold] ({uses})")
        log_path = None if verbose else root / "logs" / f"{sid}.log"
        with stage_output(console, sid, uses, log_path) as bar, PeakRSS() as rss:
            t0 = time.perf_counter()
            ckpt = make()
            wall = time.perf_counter() - t0
            if bar is not None:
                bar.start(f"evaluating on {', '.join(recipe.eval) or 'perplexity'}")
            metrics = evaluate_checkpoint(ckpt, recipe.eval, n=eval_n)
            metrics |= refine_evaluation(recipe, ckpt, eval_n)
        metrics["wall_s"] = round(wall, 2)
        metrics["peak_rss_bytes"] = rss.peak_bytes  # the stage and its evaluation
        if len(inputs or {}) > 1 and get_stage(uses).compares_inputs:
            metrics.update(merge_comparison(metrics, inputs, recipe.eval))
        # The stage wrote the checkpoint whole; the runner adds what only it knows (the recipe's
        # evaluation, the input hash). update_metrics replaces polm.json in one rename, so a
        # kill here leaves the stage's own manifest, never a half-written one.
        ckpt.update_metrics(metrics, input_hash=ihash)
        results.append(
            StageResult(sid, uses, "ran", wall, ckpt, ckpt.manifest.metrics, list(inputs or {}))
        )
        ckpts[sid] = ckpt
        if not verbose:
            console.print(result_line(sid, uses, wall, ckpt, recipe.eval), soft_wrap=True)

    failed: list = []
    blocked: list[str] = []

    def gate(sid: str, parent: str | None) -> None:
        """Check the stage's gates; a failure blocks its descendants (unless gates are off)."""
        if sid not in recipe.gates:
            return
        result = results[-1]
        parent_metrics = ckpts[parent].manifest.metrics if parent in ckpts else None
        result.gates = check_gate(sid, recipe.gates[sid], result.metrics, parent, parent_metrics)
        for g in result.gates:
            mark = "[green]✓[/green]" if g.passed else "[red]✗[/red]"
            console.print(f"  {mark} gate {sid}: {g.gate} ({g.figures})", soft_wrap=True)
        if gates:
            failed.extend(g for g in result.gates if not g.passed)

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
            if any(s not in ckpts for s in spec.from_):  # downstream of a failed gate
                blocked.append(sid)
                console.print(
                    f"[yellow]- {sid} ({spec.uses}): not run, downstream of a failed gate[/yellow]"
                )
                continue
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
            gate(sid, spec.from_[0])
            if failed and failed[-1].stage == sid:
                del ckpts[sid]  # nothing downstream of a failed gate runs
        packages = make_packages(recipe, root, ckpts, console)
        report = write_report(recipe, root, results, packages=packages, blocked=blocked)
    out = result_console()
    out.print(summary_table(recipe.name, results, recipe.eval))
    for line in merge_summary(results, recipe.eval):
        out.print(line)
    out.print(f"report: {report}", soft_wrap=True)
    if not failed:
        final = serve_hint(recipe, results, packages)
        if final:
            out.print(final, soft_wrap=True)
    if failed:
        raise GateFailed(failure_message(failed, blocked))
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
    for t in tasks:  # the recipe's self-refine evaluation, per critic
        refined = [
            f"{c} {m[f'eval.{t}.refine_{c}.accuracy']:.1%}"
            for c in ("self", "verifier")
            if f"eval.{t}.refine_{c}.accuracy" in m
        ]
        if refined:
            parts.append(f"refined ({', '.join(refined)})")
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


def make_packages(recipe: Recipe, root: Path, ckpts: dict[str, Checkpoint], console) -> list:
    """The recipe's ``packages:``, each in ``<root>/packages/<name>/``; one whose manifest
    carries its source's content hash and whose files check out is kept as it is."""
    from polm.registry import packager

    made = []
    for name, pkg in recipe.packages.items():
        if pkg.from_ not in ckpts:  # downstream of a failed gate
            console.print(
                f"[yellow]- package {name}: not made, downstream of a failed gate", soft_wrap=True
            )
            continue
        src, out = ckpts[pkg.from_], root / "packages" / name
        record = {"name": name, "target": pkg.target, "from": pkg.from_, "path": str(out)}
        if _package_current(pkg.target, out, src):
            console.print(
                f"[dim]= package {name} ({pkg.target}): unchanged, skipped ({out})[/dim]",
                soft_wrap=True,
            )
            made.append(record | {"status": "cached"})
            continue
        t0 = time.perf_counter()
        log_path = root / "logs" / f"package-{name}.log"
        with stage_output(console, f"package {name}", f"package {pkg.target}", log_path):
            packager(pkg.target)(src, out, **pkg.with_)
        wall = time.perf_counter() - t0
        console.print(
            f"[green]✓[/green] [bold]package {name}[/bold] ({pkg.target} from {pkg.from_}) "
            f"{wall:.1f} s  [dim]-> {out}[/dim]",
            soft_wrap=True,
        )
        made.append(record | {"status": "ran", "wall_s": round(wall, 2)})
    return made


def _package_current(target: str, out: Path, src: Checkpoint) -> bool:
    try:
        manifest = json.loads((out / "polm.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("content_hash") != src.manifest.content_hash:
        return False
    from polm.registry import packager_check

    try:
        packager_check(target, out)
    except PolmError:
        return False
    return True


def serve_hint(recipe: Recipe, results: list[StageResult], packages: list) -> str:
    """How to serve the run's final model (what its first package is made from, else the last
    stage's output) and run its packages."""
    if not results:
        return ""
    by_id = {r.id: r for r in results}
    final = by_id.get(packages[0]["from"]) if packages else None
    final = final or results[-1]
    lines = [
        f"serve the final model ({final.id}): polm serve {final.checkpoint.path}",
        f"  (or, from the repository: bentoml serve --arg model={final.checkpoint.path})",
    ]
    from polm.registry import PACKAGE_USE

    for p in packages:
        use = PACKAGE_USE.get(p["target"], "see {path}").format(path=p["path"])
        lines.append(f"run the {p['target']} package {p['name']}: {use}")
    return "\n".join(lines)


def write_report(
    recipe: Recipe,
    root: Path,
    results: list[StageResult],
    packages: list | None = None,
    blocked: list[str] | None = None,
) -> Path:
    """``report.json`` (what ``polm report`` reads), then the HTML report and its markdown twin;
    returns the HTML report's path."""
    from polm.report import render_report

    rows = [
        {
            "id": r.id,
            "uses": r.uses,
            "status": r.status,
            "wall_s": round(r.wall_s, 2),
            "path": str(r.checkpoint.path),
            "content_hash": r.checkpoint.manifest.content_hash,
            "format": r.checkpoint.format,
            "inputs": r.inputs,
            "settings": r.checkpoint.manifest.settings,
            "metrics": r.metrics,
            "gates": [g.asdict() for g in r.gates],
        }
        for r in results
    ]
    rows += [{"id": sid, "status": "blocked"} for sid in blocked or []]
    report = {
        "name": recipe.name,
        "recipe": str(recipe.source) if recipe.source else None,
        "eval": recipe.eval,
        "stages": rows,
        "packages": packages or [],
    }
    # in one rename: a kill while it is written leaves the previous report, never half of one
    write_json_atomic(root / "report.json", report)
    return render_report(root)


def summary_table(name: str, results, tasks: list[str]):
    """A rich table: stage, status, wall time, eval metrics (``results`` may be report rows)."""
    from rich.table import Table

    from polm.report import refine_columns

    rows = [
        r
        if isinstance(r, dict)
        else {
            "id": r.id,
            "uses": r.uses,
            "status": r.status,
            "wall_s": r.wall_s,
            "metrics": r.metrics,
        }
        for r in results
    ]
    refined = refine_columns({"eval": tasks, "stages": rows})
    table = Table(title=f"polm run {name}")
    for col in (
        "stage",
        "uses",
        "status",
        "wall s",
        *[f"{t} acc" for t in tasks],
        *[f"{t} refined ({c})" for t, c in refined],
        "ppl",
        "params",
        "MB",
        "bits/w",
    ):
        table.add_column(col, justify="left" if col in ("stage", "uses", "status") else "right")
    for r in rows:
        if r.get("status") == "blocked":
            table.add_row(
                r["id"], "", "[yellow]blocked[/yellow]", *["-"] * (len(tasks) + len(refined) + 5)
            )
            continue
        m = r["metrics"]
        accs = [
            f"{m[key]:.1%}" if key in m else "-"
            for key in [f"eval.{t}.accuracy" for t in tasks]
            + [f"eval.{t}.refine_{c}.accuracy" for t, c in refined]
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
