"""Speculative decoding on the transformers backend (``draft``), in-process through the official
`openai` client: greedy answers with a draft are the answers without one, token for token,
whether the draft agrees with every proposal (the served model as its own draft: every token
accepted) or with some (the base under its SFT), a torch draft or an onnx one; the acceptance
counts reach ``/metrics``;
a draft with another vocabulary, or on a backend that cannot take one, is refused by name."""

import asyncio
import functools
import types

import prometheus_client
import pytest

from polm.tasks import get_task
from serve.metrics import ServeMetrics
from serve.state import ServerState, load_state
from tests.helpers import app_client

pytestmark = pytest.mark.slow
PROMPTS = [ex.prompt for ex in get_task("add").examples("test", 4)]
PROMPTS += ["reverse abcdefgh", "compare 7 81", "tell me a story"]


def metrics():
    """polm's series in a registry of their own (the default one is process-wide)."""
    registry = prometheus_client.CollectorRegistry()
    maker = types.SimpleNamespace(
        **{
            kind: functools.partial(getattr(prometheus_client, kind), registry=registry)
            for kind in ("Counter", "Gauge", "Histogram")
        }
    )
    return ServeMetrics(maker), registry


def served(model, **kw) -> ServerState:
    state = load_state(ServerState(), str(model.path), "transformers", **kw)
    assert state.ready, state.failed
    return state


def greedy(state, prompts, max_tokens=40) -> list[str]:
    """One request at a time (a lone greedy request is what the draft speeds up)."""
    c = app_client(state)

    async def one(prompt):
        r = await c.chat.completions.create(
            model=state.model_id,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
        )
        return r.choices[0].message.content

    return [asyncio.run(one(p)) for p in prompts]


@pytest.fixture(scope="module")
def plain(add_sft):
    state = served(add_sft)
    yield greedy(state, PROMPTS)
    state.backend.close()


@pytest.mark.parametrize("draft_tokens", [1, 4])
def test_its_own_draft_accepts_every_token_and_changes_no_answer(add_sft, plain, draft_tokens):
    state = served(add_sft, draft=str(add_sft.path), draft_tokens=draft_tokens)
    try:
        assert greedy(state, PROMPTS) == plain
        counts = state.backend.stats["draft"]
        assert counts["proposed"] > 0 and counts["accepted"] == counts["proposed"]
        # every check but the last of each request emits draft_tokens + 1 tokens
        assert counts["checks"] < sum(len(a) for a in plain)
    finally:
        state.backend.close()


def test_a_draft_that_disagrees_changes_no_answer_and_is_counted(add_sft, base_ckpt, plain):
    m, registry = metrics()
    state = ServerState(metrics=m)
    load_state(state, str(add_sft.path), "transformers", draft=str(base_ckpt.path))
    assert state.ready, state.failed
    try:
        assert greedy(state, PROMPTS) == plain
        counts = state.backend.stats["draft"]
        assert 0 < counts["accepted"] < counts["proposed"]
        assert (
            registry.get_sample_value("polm:spec_decode_num_draft_tokens_total")
            == (counts["proposed"])
        )
        assert (
            registry.get_sample_value("polm:spec_decode_num_accepted_tokens_total")
            == (counts["accepted"])
        )
        assert state.card["draft"]["path"] == str(base_ckpt.path)
        # sampled requests decode without the draft
        before = dict(counts)
        c = app_client(state)
        r = asyncio.run(
            c.chat.completions.create(
                model=state.model_id,
                messages=[{"role": "user", "content": PROMPTS[0]}],
                max_tokens=16,
                temperature=1.0,
                seed=1,
            )
        )
        assert r.choices[0].message.content is not None
        assert state.backend.stats["draft"] == before
    finally:
        state.backend.close()


def test_an_onnx_draft_changes_no_answer(add_sft, onnx_int4, plain):
    """The served model's own int4 export as its draft, run by onnxruntime-genai (rewound to
    the accepted tokens after every check)."""
    state = served(add_sft, draft=str(onnx_int4.path))
    try:
        assert greedy(state, PROMPTS) == plain
        counts = state.backend.stats["draft"]
        assert counts["accepted"] > counts["proposed"] / 2
    finally:
        state.backend.close()


def test_a_draft_with_another_vocabulary_is_refused(add_sft, chatml_sft):
    state = load_state(ServerState(), str(add_sft.path), "transformers", draft=str(chatml_sft.path))
    assert not state.ready
    assert "another vocabulary" in state.failed


def test_a_draft_on_the_onnx_backend_is_refused_by_name(onnx_int4, base_ckpt):
    state = load_state(ServerState(), str(onnx_int4.path), draft=str(base_ckpt.path))
    assert not state.ready
    assert "transformers backend" in state.failed and "onnxruntime-genai" in state.failed


@pytest.fixture(scope="module")
def teacher_and_student(add_sft, tmp_path_factory):
    """A recipe's work directory: the teacher, and beside it a half-depth student distilled
    from it with ``draft_for_teacher``."""
    import shutil

    from optimize.distill import DistillSettings
    from optimize.distill import run as distill
    from polm.checkpoint import Checkpoint

    root = tmp_path_factory.mktemp("run")
    shutil.copytree(add_sft.path, root / "teacher")
    teacher = Checkpoint.open(root / "teacher")
    s = DistillSettings(
        task="add", student_layers="every_other", max_steps=30, draft_for_teacher=True
    )
    return teacher, distill([teacher], s, root / "student")


def test_serving_the_teacher_takes_its_distilled_draft_from_the_lineage(teacher_and_student, plain):
    teacher, student = teacher_and_student
    state = served(teacher)
    try:
        assert state.card["draft"]["path"] == str(student.path)
        assert greedy(state, PROMPTS) == plain
        assert state.backend.stats["draft"]["accepted"] > 0
    finally:
        state.backend.close()
    # the student's onnx export beside it drafts faster: it is taken instead
    from optimize.onnx import OnnxSettings
    from optimize.onnx import run as onnx

    export = onnx([student], OnnxSettings(precision="fp32", parity_n=0), student.path.parent / "x")
    state = served(teacher)
    try:
        assert state.card["draft"]["path"] == str(export.path)
        assert greedy(state, PROMPTS) == plain
    finally:
        state.backend.close()
    alone = served(teacher, draft="none")  # and "none" turns it off
    assert "draft" not in alone.card and alone.backend.draft is None
    alone.backend.close()
