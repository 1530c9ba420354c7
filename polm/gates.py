"""Quality gates: what a recipe declares a stage's output must reach before anything downstream
of it runs.

    gates:
      student:
        keeps: {add: 0.9}        # accuracy >= 90% of its first input's, on add
      gptq4:
        keeps: {add: 0.97, compare: 0.97}
        max_mb: 2.0              # weights on disk, MiB
      merged:
        min_accuracy: {add: 0.8}
        max_perplexity: 12

Gates are checked after the stage's evaluation, on a fresh output and on a skipped (cached)
one alike; they are not part of a stage's input hash, so changing a gate never re-runs a stage.
A failed gate stops the stages downstream of it (the others still run), names the stage, the
gate and the figures, and makes ``polm run`` exit with code 1; ``polm run --no-gates`` reports
the gates and runs through.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pydantic import BaseModel, ConfigDict, Field

from polm.errors import PolmError


class GateFailed(PolmError):
    """A quality gate failed: ``polm run`` exits with code 1 (a recipe error is code 2)."""

    exit_code = 1


class Gate(BaseModel):
    """The gates of one stage (any combination; each one is checked)."""

    model_config = ConfigDict(extra="forbid")

    keeps: dict[str, float] | None = Field(
        default=None,
        description="task -> the share of the stage's first input's accuracy it must keep "
        "(0.97: at least 97% of it).",
    )
    min_accuracy: dict[str, float] | None = Field(
        default=None, description="task -> the least accuracy (0-1) the output must reach."
    )
    max_mb: float | None = Field(
        default=None, gt=0, description="The most the output's weights may take on disk, MiB."
    )
    max_perplexity: float | None = Field(
        default=None, gt=0, description="The highest perplexity allowed on the held-out prose."
    )

    def tasks(self) -> set[str]:
        return set(self.keeps or {}) | set(self.min_accuracy or {})

    def check_values(self, where: str) -> None:
        for kind, values in (("keeps", self.keeps), ("min_accuracy", self.min_accuracy)):
            for task, v in (values or {}).items():
                if not 0 < v <= (2 if kind == "keeps" else 1):
                    bound = "in (0, 2]" if kind == "keeps" else "in (0, 1]"
                    raise PolmError(
                        f"{where}: gate {kind}.{task} = {v} must be a share {bound} "
                        "(0.97 means 97%)."
                    )


@dataclass
class GateResult:
    stage: str
    gate: str  # e.g. "keeps add >= 97%"
    passed: bool
    figures: str  # e.g. "94.0% of student's 96.0% = 97.9%"

    def asdict(self) -> dict:
        return asdict(self)


def _acc(metrics: dict, task: str) -> float | None:
    return metrics.get(f"eval.{task}.accuracy")


def check_gate(
    sid: str, gate: Gate, metrics: dict, parent: str | None, parent_metrics: dict | None
) -> list[GateResult]:
    """Each of ``gate``'s conditions against a stage's ``metrics`` (its first input, by recipe
    name, for ``keeps``)."""
    out = []
    for task, share in (gate.keeps or {}).items():
        name = f"keeps {share:.0%} of {parent}'s {task} accuracy"
        acc, base = _acc(metrics, task), _acc(parent_metrics or {}, task)
        if acc is None or base is None:
            missing = sid if acc is None else parent
            out.append(GateResult(sid, name, False, f"{missing} has no {task} accuracy"))
            continue
        kept = acc / base if base > 0 else float("inf")
        out.append(
            GateResult(
                sid,
                name,
                acc >= share * base,
                f"{acc:.1%} against {base:.1%}: keeps {kept:.1%}",
            )
        )
    for task, least in (gate.min_accuracy or {}).items():
        acc = _acc(metrics, task)
        name = f"{task} accuracy >= {least:.1%}"
        figures = f"{task} accuracy {acc:.1%}" if acc is not None else f"no {task} accuracy"
        out.append(GateResult(sid, name, acc is not None and acc >= least, figures))
    if gate.max_mb is not None:
        mb = metrics.get("size_bytes", 0) / 2**20
        name = f"size <= {gate.max_mb:g} MB"
        out.append(GateResult(sid, name, mb <= gate.max_mb, f"{mb:.2f} MB"))
    if gate.max_perplexity is not None:
        ppl = metrics.get("perplexity")
        out.append(
            GateResult(
                sid,
                f"perplexity <= {gate.max_perplexity:g}",
                ppl is not None and ppl <= gate.max_perplexity,
                f"perplexity {ppl:.3f}" if ppl is not None else "no perplexity measured",
            )
        )
    return out


def failure_message(failed: list[GateResult], blocked: list[str]) -> str:
    """One paragraph: every failed gate with its figures, and what did not run because of it."""
    parts = [f"stage {r.stage!r} failed its gate '{r.gate}': {r.figures}" for r in failed]
    msg = "quality gate failed: " + "; ".join(parts) + "."
    if blocked:
        msg += f" Not run, downstream of it: {', '.join(blocked)}."
    return msg + (
        " The stages before it are kept: fix the recipe and run again (finished stages are "
        "skipped), or pass --no-gates to run through."
    )
