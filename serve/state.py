"""What the routes serve: the loaded model, its card (format, backend, lineage) and whether it
is ready. :func:`load_state` is what the BentoML service runs on its loading thread; tests call
it directly to serve a checkpoint in-process through the same app."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.backends import Backend

log = logging.getLogger("polm.serve")


@dataclass
class ServerState:
    """What the routes need: set by the service once the model is loaded and warm."""

    model_id: str = ""
    backend: Backend | None = None
    card: dict = field(default_factory=dict)  # format, backend, lineage (ModelCard.polm)
    ready: bool = False
    failed: str | None = None  # why loading failed (logged in full; shown in short)
    # a request without max_tokens gets the rest of the context, up to this many tokens
    default_max_tokens: int = 1024
    metrics: Any = None  # serve.metrics.ServeMetrics, when the server reports /metrics
    adapters: dict = field(default_factory=dict)  # served name -> its card (LoRA by name)


def load_state(
    state: ServerState,
    model: str | None,
    backend: str = "auto",
    served_model_name: str | None = None,
    lineage: list[dict] | None = None,
    adapters: dict[str, str] | None = None,
    draft: str | None = None,
    draft_tokens: int = 4,
) -> ServerState:
    """Open the checkpoint, load it on its backend, warm it up, then mark ``state`` ready; on
    failure record why (the routes answer 503 with it, the log has the traceback).
    ``lineage``: the model card's lineage when the parents are not on disk (a bento's).
    ``adapters``: served name -> a ``peft-adapter`` checkpoint trained on this very base (its
    manifest's parent hash is the base's), each served under its own name.
    ``draft``: a checkpoint with the model's tokenizer for speculative decoding (transformers
    backend), ``draft_tokens`` proposed a step; when not given, the ``optimize.distill`` student
    that recorded itself as this model's draft (:func:`lineage_draft`); ``"none"``: no draft."""
    try:
        from polm.checkpoint import Checkpoint
        from serve.backends import GenParams, open_backend
        from serve.backends.choose import choose_backend

        ckpt = Checkpoint.open(model or default_model())
        named = check_adapters(ckpt, adapters or {})
        options = {}
        if draft == "none":
            draft = None
        elif draft is None and choose_backend(ckpt.format, backend) == "transformers":
            draft = lineage_draft(ckpt)
            if draft:
                log.info("draft model from the lineage: %s (draft_for_teacher)", draft)
        if draft:
            options = {"draft": Checkpoint.open(draft), "draft_tokens": draft_tokens}
        engine = open_backend(ckpt, backend, **options)
        if draft and state.metrics is not None:
            engine.on_draft = state.metrics.draft
        if named:
            engine.add_adapters({name: a.path for name, a in named.items()})
        _warm_up(engine, GenParams(max_tokens=4, temperature=0))
        state.card = {
            "format": ckpt.format,
            "backend": engine.name,
            "stage": ckpt.stage,
            "lineage": lineage if lineage is not None else lineage_records(ckpt),
        }
        if draft:
            state.card["draft"] = {"path": str(options["draft"].path), "tokens": draft_tokens}
        state.model_id = served_model_name or ckpt.path.name
        state.adapters = {
            name: {
                "format": a.format,
                "backend": engine.name,
                "stage": a.stage,
                "lineage": lineage_records(a),
            }
            for name, a in named.items()
        }
        state.backend = engine
        state.ready = True
        log.info("serving %s on %s", ckpt.path, engine.name)
    except Exception as e:
        log.exception("loading the model failed")
        state.failed = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    return state


def lineage_draft(ckpt) -> str | None:
    """The draft recorded for ``ckpt``, looked for beside it (a recipe's stages share its work
    directory): the ``optimize.distill`` student distilled from it with ``draft_for_teacher:
    true`` (its manifest names the teacher by content hash), or that student's ``onnx`` export
    where one sits beside it too, which drafts faster (onnxruntime's forward pass of a small
    model costs a fraction of transformers'). None if there is none."""
    from polm.checkpoint import MANIFEST, Checkpoint
    from polm.errors import PolmError

    beside = []
    for manifest in sorted(ckpt.path.parent.glob(f"*/{MANIFEST}")):
        try:
            beside.append(Checkpoint.open(manifest.parent))
        except PolmError:
            continue

    def made_from(parent, stage: str) -> list:
        return [
            c
            for c in beside
            if c.stage == stage
            and c.manifest.parents
            and c.manifest.parents[0].content_hash == parent.manifest.content_hash
        ]

    students = [
        c
        for c in made_from(ckpt, "optimize.distill")
        if c.manifest.settings.get("draft_for_teacher")
    ]
    if not students:
        return None
    return str((made_from(students[0], "optimize.onnx") or students)[0].path)


def parse_adapters(spec: str | None) -> dict[str, str]:
    """``a=DIR,b=DIR`` (``--arg adapters=...``, ``POLM_ADAPTERS``) as {name: directory}."""
    from polm.errors import PolmError

    out: dict[str, str] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise PolmError(f"adapters: {item!r} is not NAME=DIR")
        if name in out:
            raise PolmError(f"adapters: the name {name!r} is given twice")
        out[name] = path
    return out


def check_adapters(base, adapters: dict[str, str]) -> dict:
    """Open each adapter and check it belongs on ``base``: a ``peft-adapter`` checkpoint whose
    parent is this base, byte for byte (its content hash), or, for an ``onnx`` export, the
    model it was exported from; else a PolmError naming both."""
    from polm.checkpoint import Checkpoint
    from polm.errors import PolmError

    out = {}
    trained_on = base.manifest.content_hash
    if base.format == "onnx" and base.manifest.parents:  # the export carries its parent's weights
        trained_on = base.manifest.parents[0].content_hash
    for name, path in adapters.items():
        a = Checkpoint.open(path)
        if a.format != "peft-adapter":
            raise PolmError(f"adapter {name!r} ({a.path}) is a {a.format!r} checkpoint, not a "
                            "peft-adapter")  # fmt: skip
        parent = a.manifest.parents[0].content_hash if a.manifest.parents else None
        if parent != trained_on:
            raise PolmError(
                f"adapter {name!r} ({a.path}) was trained on a base with content hash "
                f"{(parent or 'none')[:12]}, but the served base {base.path} is "
                f"{trained_on[:12]}: serve it on its own base"
            )
        out[name] = a
    return out


def _warm_up(backend, params) -> None:
    import asyncio

    async def go():
        ids = backend.encode(backend.render_chat([{"role": "user", "content": "hello"}]))
        async for _ in backend.generate(ids, params):
            pass

    asyncio.run(go())


def lineage_records(ckpt, full: bool = False) -> list[dict]:
    """A checkpoint's lineage as JSON-ready records, newest first: short (name, stage, format,
    hash prefix, evaluations) for the model card, or ``full`` (whole hash, settings, metrics,
    versions) for an edge package, whose parents stay behind."""
    from polm.checkpoint import Checkpoint, lineage

    out = []
    for depth, node in lineage(ckpt):
        if not isinstance(node, Checkpoint):  # a parent no longer on disk: the child's record
            out.append(
                {
                    "depth": depth,
                    "name": Path(node.path).name,
                    "stage": node.stage,
                    "content_hash": node.content_hash,
                    "missing": True,
                }
            )
            continue
        m = node.manifest
        rec = {
            "depth": depth,
            "name": node.path.name,
            "stage": m.stage,
            "format": m.format,
            "content_hash": m.content_hash if full else m.content_hash[:12],
        }
        if full:
            rec.update(settings=m.settings, metrics=m.metrics, versions=m.versions)
        else:
            rec["metrics"] = {k: v for k, v in m.metrics.items() if k.startswith("eval.")}
        if m.stage == "import":
            rec["source"] = m.settings.get("source")
        out.append(rec)
    return out


def default_model() -> Path:
    """The built-in tiny chat model, imported once into polm's cache directory."""
    from polm.checkpoint import Checkpoint
    from polm.errors import PolmError
    from polm.importer import import_model

    root = Path(os.environ.get("POLM_CACHE") or Path.home() / ".cache" / "polm")
    out = root / "serve" / "tiny-base"
    try:
        Checkpoint.open(out)
    except PolmError:
        import_model("builtin:tiny-base", out)
    return out
