"""The ONNX backend's continuous batching (serve/backends/onnx_batch.py), in-process through the
official `openai` client: 8 concurrent greedy requests of different lengths get the answers
each gets alone, which are onnxruntime-genai's own greedy answers; seeded sampling gives the
same answers under concurrency as alone; the requests really decoded together; and
onnxruntime-genai's own copy of the weights loads only for what the batch does not take."""

import asyncio

import pytest

from polm.tasks import get_task
from serve.state import ServerState, load_state
from tests.helpers import app_client

pytestmark = pytest.mark.slow
PROMPTS = [ex.prompt for ex in get_task("add").examples("test", 4)]
PROMPTS += ["reverse ab", "compare 7 81", "reverse abcdefgh", "sum 1 2"]


@pytest.fixture(scope="module")
def served(onnx_int4):
    state = load_state(ServerState(), str(onnx_int4.path))
    assert state.ready, state.failed
    assert state.backend.batch is not None
    yield state
    state.backend.close()


def answers(state, prompts, together: bool, **kw) -> list[str]:
    c = app_client(state)

    async def one(i, prompt):
        seed = {"seed": 100 + i} if kw.get("temperature") else {}
        r = await c.chat.completions.create(
            model=state.model_id,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=32,
            **seed,
            **kw,
        )
        return r.choices[0].message.content

    async def all_at_once():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    if together:
        return asyncio.run(all_at_once())
    return [asyncio.run(one(i, p)) for i, p in enumerate(prompts)]


def test_batched_greedy_answers_are_the_one_at_a_time_answers(served):
    alone = answers(served, PROMPTS, together=False, temperature=0)
    rows_alone = served.backend.batch.stats["max_rows"]
    together = answers(served, PROMPTS, together=True, temperature=0)
    assert together == alone
    assert rows_alone == 1 and served.backend.batch.stats["max_rows"] >= 4  # they were batched
    # and they are what onnxruntime-genai's own generator decodes
    assert alone == served.backend.lm.greedy(PROMPTS, 32)


def test_seeded_sampling_is_the_same_under_concurrency(served):
    alone = answers(served, PROMPTS, together=False, temperature=1.0)
    together = answers(served, PROMPTS, together=True, temperature=1.0)
    assert together == alone
    assert len(set(alone)) > 1


def test_the_weights_load_once_until_a_request_needs_onnxruntime_genai(onnx_int4):
    """With batching, onnxruntime-genai's own copy of the weights waits for a request the batch
    does not take (here the prompt's log-probs): until then the batch's session holds the only
    copy."""
    state = load_state(ServerState(), str(onnx_int4.path))
    assert state.ready, state.failed
    try:
        assert answers(state, PROMPTS[:2], together=True, temperature=0)[0]
        assert state.backend.lm._model is None
        c = app_client(state)

        async def echo():
            return await c.completions.create(
                model=state.model_id, prompt="12+34", echo=True, logprobs=1, max_tokens=0
            )

        r = asyncio.run(echo())
        assert r.choices[0].logprobs.token_logprobs[1] < 0  # the prompt's own log-probs
        assert state.backend.lm._model is not None
    finally:
        state.backend.close()


def test_rows_join_and_leave_in_any_order_and_keep_their_answers(served):
    """Requests submitted together (straight to the backend, so that they join in one go): a
    request with room for more tokens than the cache holds joins running rows (the buffers
    regrow, keeping them), rows that finish first leave and the last rows move into their
    places, and every answer is the one it gets alone, at the length it asked for."""
    from serve.backends.base import GenParams

    backend = served.backend
    budgets = [24, 200, 6, 120, 3, 64, 10, 90]
    prompts = [
        backend.encode(backend.render_chat([{"role": "user", "content": p}])) for p in PROMPTS
    ]

    async def one(i, n):
        params = GenParams(max_tokens=n, temperature=0, ignore_eos=True)
        pieces = [piece async for piece in backend.generate(prompts[i], params)]
        return "".join(p.text for p in pieces), pieces[-1].completion_tokens

    async def together():
        return await asyncio.gather(*(one(i, n) for i, n in enumerate(budgets)))

    alone = [asyncio.run(one(i, n)) for i, n in enumerate(budgets)]
    stats = backend.batch.stats
    regrown, rows = stats["regrown"], stats["max_rows"]
    stats["max_rows"] = 0
    assert asyncio.run(together()) == alone
    assert [n for _, n in alone] == budgets
    assert stats["max_rows"] == len(budgets)  # all of them ran together
    assert stats["regrown"] > regrown  # a longer request joined running rows
    stats["max_rows"] = max(rows, stats["max_rows"])
