"""The run report: ``report.html`` (one self-contained file: plots as inline SVG, no network
resource) and its markdown twin ``report.md`` (plots as SVG files in ``report-plots/``), both
rendered from ``report.json`` and the checkpoints' own files.

    polm report runs/quickstart        # written by `polm run` too

It holds the lineage graph, the per-stage table (accuracy per task, perplexity, size, bits per
weight, decode tokens/s, wall time, peak memory), the gates, the plots (accuracy by stage; size
against accuracy with the Pareto front; the training stages' loss curves, from the
``train_log.json`` each keeps) and every stage's settings. matplotlib draws the plots.
"""

from __future__ import annotations

import html
import io
import json
import platform
from datetime import UTC, datetime
from pathlib import Path

HTML_NAME, MD_NAME, PLOTS_DIR = "report.html", "report.md", "report-plots"

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1100px;
color:#1f2328;padding:0 1rem}
h1{margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
.meta{color:#59636e;font-size:.9rem}
table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0}
th,td{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:right}
th{background:#f6f8fa}td:first-child,td:nth-child(2),td:nth-child(3){text-align:left}
.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}
.blocked{color:#9a6700}figure{margin:1rem 0}figure svg{max-width:100%;height:auto}
figcaption{color:#59636e;font-size:.85rem}
pre{background:#f6f8fa;padding:.6rem;overflow-x:auto;font-size:.8rem}
details{margin:.3rem 0}summary{cursor:pointer}
"""


def load(root: Path) -> dict:
    from polm.errors import PolmError

    f = Path(root) / "report.json"
    if not f.is_file():
        raise PolmError(f"{root} has no report.json: run a recipe with `polm run` first.")
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise PolmError(f"{f} is not valid JSON ({e}); run the recipe again.") from None


# --- figures --------------------------------------------------------------------------------


def _rows(report: dict) -> list[dict]:
    return [r for r in report["stages"] if r.get("status") != "blocked"]


def _mean_accuracy(m: dict, tasks: list[str]) -> float | None:
    accs = [m[f"eval.{t}.accuracy"] for t in tasks if f"eval.{t}.accuracy" in m]
    return sum(accs) / len(accs) if accs else None


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype: inline in HTML


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "path"  # text as paths: no font to fetch
    matplotlib.rcParams["svg.hashsalt"] = "polm"  # stable ids: the same run, the same file
    import matplotlib.pyplot as plt

    return plt


def lineage_plot(report: dict) -> str:
    """Models and stages as boxes, by depth from the imported models, inputs -> outputs."""
    plt = _pyplot()
    rows = report["stages"]
    inputs = {r["id"]: r.get("inputs", []) for r in rows}
    depth: dict[str, int] = {}
    for r in rows:  # rows come in run order: inputs first
        depth[r["id"]] = 1 + max((depth.get(i, 0) for i in inputs[r["id"]]), default=-1)
    layers: dict[int, list[str]] = {}
    for sid, d in depth.items():
        layers.setdefault(d, []).append(sid)
    pos = {
        sid: (d, -(k - (len(ids) - 1) / 2))
        for d, ids in layers.items()
        for k, sid in enumerate(ids)
    }
    width = max(layers) + 1 if layers else 1
    height = max(map(len, layers.values()), default=1)
    fig, ax = plt.subplots(figsize=(max(6, 2.3 * width), max(2, 0.9 * height + 0.6)))
    status = {r["id"]: r.get("status") for r in rows}
    uses = {r["id"]: r.get("uses", "") for r in rows}
    boxes = {}
    for sid, (x, y) in pos.items():
        color = {"blocked": "#fff8c5", "import": "#ddf4ff"}.get(
            "blocked" if status[sid] == "blocked" else uses[sid], "#f6f8fa"
        )
        boxes[sid] = ax.text(
            x,
            y,
            f"{sid}\n{uses[sid]}" if uses[sid] else sid,
            ha="center",
            va="center",
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.4", "fc": color, "ec": "#8c959f"},
        )
    for sid, (x, y) in pos.items():
        for src in inputs[sid]:
            if src in pos:  # box edge to box edge
                ax.annotate(
                    "",
                    xy=(x, y),
                    xytext=pos[src],
                    arrowprops={
                        "arrowstyle": "->",
                        "color": "#59636e",
                        "lw": 1,
                        "patchA": boxes[src].get_bbox_patch(),
                        "patchB": boxes[sid].get_bbox_patch(),
                        "shrinkA": 2,
                        "shrinkB": 2,
                    },
                )
    ax.set_xlim(-0.6, width - 0.4)
    ax.set_ylim(-height / 2 - 0.2, height / 2 + 0.2)
    ax.axis("off")
    return _svg(fig)


def accuracy_plot(report: dict) -> str | None:
    plt = _pyplot()
    rows, tasks = _rows(report), report["eval"]
    rows = [r for r in rows if any(f"eval.{t}.accuracy" in r["metrics"] for t in tasks)]
    if not rows or not tasks:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.75 * len(rows) * max(1, len(tasks)) / 1.5), 3.6))
    w = 0.8 / len(tasks)
    for k, t in enumerate(tasks):
        ys = [100 * r["metrics"].get(f"eval.{t}.accuracy", float("nan")) for r in rows]
        ax.bar([i + (k - (len(tasks) - 1) / 2) * w for i in range(len(rows))], ys, w, label=t)
    ax.set_xticks(range(len(rows)), [r["id"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False, ncol=len(tasks))
    ax.set_title("accuracy by stage")
    return _svg(fig)


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both size (smaller) and accuracy (higher), by size."""
    front, best = [], float("-inf")
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return front


def size_accuracy_plot(report: dict) -> str | None:
    plt = _pyplot()
    pts = []
    for r in _rows(report):
        acc = _mean_accuracy(r["metrics"], report["eval"])
        size = r["metrics"].get("size_bytes")
        if acc is not None and size:
            pts.append((size / 2**20, 100 * acc, r["id"]))
    if len(pts) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="#0969da", zorder=3)
    for x, y, label in pts:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(pts)
    ax.step(
        [p[0] for p in front],
        [p[1] for p in front],
        where="post",
        color="#cf222e",
        lw=1.2,
        label="Pareto front",
        zorder=2,
    )
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("size on disk (MB, log scale)")
    ax.set_ylabel(f"mean accuracy (%) on {', '.join(report['eval'])}")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    ax.set_title("size against accuracy")
    return _svg(fig)


def loss_curves(report: dict) -> dict[str, list[tuple[float, float]]]:
    """stage id -> (step, loss) from the train_log.json its checkpoint keeps."""
    from polm.training import TRAIN_LOG

    curves = {}
    for r in _rows(report):
        f = Path(r.get("path", "")) / TRAIN_LOG
        if not f.is_file():
            continue
        try:
            log = json.loads(f.read_text())
        except ValueError:
            continue
        pts = [(h.get("step", i), h["loss"]) for i, h in enumerate(log) if "loss" in h]
        if len(pts) >= 2:
            curves[r["id"]] = pts
    return curves


def loss_plot(report: dict) -> str | None:
    curves = loss_curves(report)
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for sid, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=sid, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    ax.set_title("training loss of the training stages")
    return _svg(fig)


PLOTS = {
    "lineage": ("Lineage: what each model was made from", lineage_plot),
    "accuracy": ("Accuracy by stage (the same evaluation after every stage)", accuracy_plot),
    "size-accuracy": ("Size against accuracy, with the Pareto front", size_accuracy_plot),
    "loss": ("Training loss curves", loss_plot),
}


# --- tables ---------------------------------------------------------------------------------


def refine_columns(report: dict) -> list[tuple[str, str]]:
    """``(task, critic)`` for each self-refine accuracy some stage has (the recipe's
    ``self_refine``), the model's own critic before the verifier."""
    found = {
        key
        for r in report["stages"]
        for key in r.get("metrics", {})
        if ".refine_" in key and key.endswith(".accuracy")
    }
    return [
        (t, c)
        for t in report["eval"]
        for c in ("self", "verifier")
        if f"eval.{t}.refine_{c}.accuracy" in found
    ]


def table(report: dict) -> tuple[list[str], list[list[str]]]:
    tasks = report["eval"]
    refined = refine_columns(report)
    head = [
        "stage",
        "uses",
        "status",
        *[f"{t} acc" for t in tasks],
        *[f"{t} refined ({c} critic)" for t, c in refined],
        "ppl",
        "MB",
        "bits/w",
        "decode tok/s",
        "wall s",
        "peak RSS MB",
    ]
    body = []
    for r in report["stages"]:
        m = r.get("metrics", {})
        if r.get("status") == "blocked":
            body.append([r["id"], "", "blocked"] + ["-"] * (len(head) - 3))
            continue

        def fmt(key, f, scale=1.0, m=m):
            return f.format(m[key] * scale) if key in m else "-"

        body.append(
            [
                r["id"],
                r["uses"],
                r["status"],
                *[fmt(f"eval.{t}.accuracy", "{:.1%}") for t in tasks],
                *[fmt(f"eval.{t}.refine_{c}.accuracy", "{:.1%}") for t, c in refined],
                fmt("perplexity", "{:.3f}"),
                fmt("size_bytes", "{:.2f}", 2**-20),
                fmt("bits_per_weight", "{:.2f}"),
                fmt("decode_tokens_per_s", "{:.0f}"),
                f"{r.get('wall_s', 0):.1f}",
                fmt("peak_rss_bytes", "{:.0f}", 2**-20),
            ]
        )
    return head, body


def gate_rows(report: dict) -> list[list[str]]:
    return [
        [g["stage"], g["gate"], "passed" if g["passed"] else "FAILED", g["figures"]]
        for r in report["stages"]
        for g in r.get("gates", [])
    ]


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return cpu


# --- rendering ------------------------------------------------------------------------------


def render_report(root: str | Path) -> Path:
    """Write ``report.html`` and ``report.md`` (with ``report-plots/*.svg``) under ``root``
    from its ``report.json``; return the HTML file's path."""
    import yaml

    root = Path(root)
    report = load(root)
    plots = {key: (title, fn(report)) for key, (title, fn) in PLOTS.items()}
    plots = {k: v for k, v in plots.items() if v[1]}
    head, body = table(report)
    gates = gate_rows(report)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta = (
        f"recipe {report.get('recipe') or '?'} · {when} · {_machine()} · "
        f"polm {_version('polm')}, torch {_version('torch')}"
    )
    settings = [
        (r["id"], r["uses"], yaml.safe_dump(r.get("settings") or {}, sort_keys=True).strip())
        for r in _rows(report)
        if r.get("uses") != "import"
    ]

    # markdown twin, plots beside it
    pdir = root / PLOTS_DIR
    pdir.mkdir(exist_ok=True)
    for key, (_, svg) in plots.items():
        (pdir / f"{key}.svg").write_text(svg)
    md = [f"# polm run {report['name']}", "", meta, ""]
    md += ["## Stages", "", _md_table(head, body), ""]
    if gates:
        md += ["## Gates", "", _md_table(["stage", "gate", "result", "figures"], gates), ""]
    if report.get("packages"):
        md += ["## Packages", ""]
        md += [
            f"- {p['name']} ({p['target']} from {p['from']}): `{p['path']}`"
            for p in report["packages"]
        ]
        md.append("")
    md += ["## Lineage", "", "```mermaid", "graph LR"]
    for r in report["stages"]:
        md += [f"  {src} --> {r['id']}" for src in r.get("inputs", [])]
    md += ["```", ""]
    for key, (title, _) in plots.items():
        md += [f"## {title}", "", f"![{title}]({PLOTS_DIR}/{key}.svg)", ""]
    md += ["## Settings", ""]
    for sid, uses, text in settings:
        md += [
            f"<details><summary>{sid} ({uses})</summary>",
            "",
            "```yaml",
            text,
            "```",
            "",
            "</details>",
            "",
        ]
    (root / MD_NAME).write_text("\n".join(md))

    # self-contained HTML
    e = html.escape
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>polm run {e(report['name'])}</title><style>{CSS}</style></head><body>",
        f"<h1>polm run {e(report['name'])}</h1><p class=meta>{e(meta)}</p>",
        "<h2>Stages</h2>",
        _html_table(head, body),
    ]
    if gates:
        parts += ["<h2>Gates</h2>", _html_table(["stage", "gate", "result", "figures"], gates)]
    if report.get("packages"):
        parts.append("<h2>Packages</h2><ul>")
        parts += [
            f"<li>{e(p['name'])} ({e(p['target'])} from {e(p['from'])}): "
            f"<code>{e(p['path'])}</code></li>"
            for p in report["packages"]
        ]
        parts.append("</ul>")
    for key, (title, svg) in plots.items():
        parts.append(f"<h2>{e(title)}</h2><figure id=plot-{key}>{svg}</figure>")
    parts.append("<h2>Settings</h2>")
    for sid, uses, text in settings:
        parts.append(
            f"<details><summary>{e(sid)} ({e(uses)})</summary><pre>{e(text)}</pre></details>"
        )
    parts.append("</body></html>")
    out = root / HTML_NAME
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(out)
    return out


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "?"


def _md_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _html_table(head: list[str], body: list[list[str]]) -> str:
    e = html.escape

    def cell(c: str) -> str:
        cls = {"passed": "pass", "FAILED": "fail", "blocked": "blocked"}.get(c)
        return f"<td class={cls}>{e(c)}</td>" if cls else f"<td>{e(c)}</td>"

    rows = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in body)
    return f"<table><tr>{''.join(f'<th>{e(h)}</th>' for h in head)}</tr>{rows}</table>"
