"""What OpenAI clients ask of the sampler, on every token backend (transformers, onnxruntime-genai,
llama.cpp), in-process through the official `openai` client: log-probs (chat and completions,
streamed and not), the prompt's log-probs with echo and ``max_tokens: 0`` (how
lm-evaluation-harness scores answers), ``n`` choices with seeds, ``logit_bias``, the
presence and frequency penalties, and structured outputs (``response_format``)."""

import asyncio
import json

import pytest

from polm.tasks import get_task
from serve.state import ServerState, load_state
from tests.helpers import app_client, shared

pytestmark = pytest.mark.slow
ADD = [ex for ex in get_task("add").examples("test", 4)]


@pytest.fixture(scope="module", params=["transformers", "onnx", "llamacpp"])
def served(request, add_sft, onnx_int4, tmp_path_factory):
    """One served model per token backend: the add SFT, its int4 ONNX export, its q8_0 GGUF."""
    if request.param == "transformers":
        ckpt = add_sft
    elif request.param == "onnx":
        ckpt = onnx_int4
    else:
        from optimize.gguf import GgufSettings
        from optimize.gguf import run as gguf

        s = GgufSettings(outtype="q8_0", parity_n=0)
        ckpt = shared(tmp_path_factory, "serve_gguf", lambda o: gguf([add_sft], s, o))
    state = load_state(ServerState(), str(ckpt.path))
    assert state.ready, state.failed
    assert state.card["backend"] == request.param
    yield state
    state.backend.close()


def run(coro):
    return asyncio.run(coro)


def _chat(state, prompt, **kw):
    c = app_client(state)
    return c.chat.completions.create(
        model=state.model_id, messages=[{"role": "user", "content": prompt}], **kw
    )


def test_chat_logprobs_are_the_greedy_tokens_and_stream_alike(served, add_sft):
    prompt = ADD[0].prompt
    r = run(_chat(served, prompt, temperature=0, max_tokens=24, logprobs=True, top_logprobs=3))
    content = r.choices[0].logprobs.content
    assert content and "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # greedy picks the most likely token: its log-prob is the first alternative's
        assert t.logprob == pytest.approx(tops[0], abs=1e-5)
        assert bytes(t.bytes).decode() == t.token

    async def streamed():
        stream = await _chat(
            served,
            prompt,
            temperature=0,
            max_tokens=24,
            logprobs=True,
            top_logprobs=3,
            stream=True,
        )
        out = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].logprobs:
                out += chunk.choices[0].logprobs.content
        return out

    again = run(streamed())
    assert [(t.token, round(t.logprob, 4)) for t in again] == [
        (t.token, round(t.logprob, 4)) for t in content
    ]
    if served.card["backend"] == "transformers":
        # each chosen token's log-prob is what `polm eval` computes for the same continuation
        # (its preference scoring: the chat-rendered prompt + answer through the torch model)
        from polm.evaluate import completion_token_logprobs
        from polm.loading import load_model

        model, tok = load_model(add_sft)  # what the transformers backend serves
        row = {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": r.choices[0].message.content}],
        }
        (want,) = completion_token_logprobs(model, tok, [row], keys=("chosen",))
        assert len(want) > len(content)  # and the template's closing tokens
        assert [t.logprob for t in content] == pytest.approx(want[: len(content)], abs=1e-4)
    # without logprobs the answer has none
    plain = run(_chat(served, prompt, temperature=0, max_tokens=24))
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == r.choices[0].message.content


def test_echo_scores_the_prompt_as_the_generation_scored_it(served):
    """lm-evaluation-harness's request (token ids, echo, logprobs 1, max_tokens 0 here, or 1 as
    it sends): the prompt's log-probs; for the model's own greedy answer appended to a prompt,
    they equal the log-probs its generation reported, and a right sum outscores a wrong one."""
    c = app_client(served)
    tok = served.backend
    ex = ADD[1]
    prompt = tok.render_chat([{"role": "user", "content": ex.prompt}])
    gen = run(
        c.completions.create(
            model=served.model_id, prompt=prompt, temperature=0, max_tokens=16, logprobs=2
        )
    )
    lp = gen.choices[0].logprobs
    ids = tok.encode(prompt)
    answer_ids = tok.encode(prompt + gen.choices[0].text)[len(ids) :]
    assert len(answer_ids) >= 3
    for max_tokens in (0, 1):
        scored = run(
            c.completions.create(
                model=served.model_id,
                prompt=ids + answer_ids,
                echo=True,
                logprobs=1,
                max_tokens=max_tokens,
                temperature=0,
            )
        )
        s = scored.choices[0].logprobs
        n = len(ids) + len(answer_ids)
        assert len(s.token_logprobs) == n + max_tokens and s.token_logprobs[0] is None
        assert scored.usage.prompt_tokens == n and scored.usage.completion_tokens == max_tokens
        assert scored.choices[0].text.startswith(tok.decode(ids + answer_ids))
        k = min(len(answer_ids), len(lp.token_logprobs)) - 1
        assert s.token_logprobs[len(ids) : len(ids) + k] == pytest.approx(
            lp.token_logprobs[:k], abs=2e-3
        )
        assert all(x <= 0 for x in s.token_logprobs[1:])
        assert s.text_offset == sorted(s.text_offset)

    def continuation_logprob(text: str) -> float:
        full = prompt + text
        n_ctx = len(tok.encode(prompt))
        r = run(
            c.completions.create(
                model=served.model_id, prompt=full, echo=True, logprobs=1, max_tokens=0
            )
        )
        return sum(r.choices[0].logprobs.token_logprobs[n_ctx:])

    # the model's own answer outscores the same answer garbled
    answer = gen.choices[0].text
    assert continuation_logprob(answer) > continuation_logprob(answer[::-1] + " 999")


def test_n_choices_sample_on_their_own_and_a_seed_repeats_them(served):
    kw = dict(temperature=1.5, max_tokens=12, n=3, seed=7)
    a = run(_chat(served, ADD[2].prompt, **kw))
    b = run(_chat(served, ADD[2].prompt, **kw))
    texts = [ch.message.content for ch in a.choices]
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts == [ch.message.content for ch in b.choices]  # the seed repeats all three
    assert len(set(texts)) > 1, texts  # but each choice is its own sample
    assert a.usage.completion_tokens >= len(texts)
    # completions: every prompt gets n choices, indexed prompt-major
    c = app_client(served)
    r = run(
        c.completions.create(
            model=served.model_id, prompt=["12+3=", "4+5="], n=2, max_tokens=4, temperature=0
        )
    )
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text

    async def streamed():
        stream = await _chat(served, ADD[2].prompt, stream=True, **kw)
        parts = {}
        async for chunk in stream:
            for ch in chunk.choices:
                parts[ch.index] = parts.get(ch.index, "") + (ch.delta.content or "")
        return [parts[i] for i in sorted(parts)]

    assert run(streamed()) == texts


def test_logit_bias_forces_and_forbids_tokens(served):
    prompt = ADD[3].prompt
    greedy = run(_chat(served, prompt, temperature=0, max_tokens=8, logprobs=True))
    first = greedy.choices[0].logprobs.content[0]
    first_id = served.backend.encode(first.token)[0]
    banned = run(
        _chat(served, prompt, temperature=0, max_tokens=8, logit_bias={str(first_id): -100})
    )
    assert banned.choices[0].message.content != greedy.choices[0].message.content
    assert not banned.choices[0].message.content.startswith(first.token)
    x = served.backend.encode("7")[0]
    forced = run(_chat(served, prompt, temperature=0, max_tokens=6, logit_bias={str(x): 100}))
    assert forced.choices[0].message.content == "7" * 6


def test_ignore_eos_and_min_tokens_keep_generating_past_the_answer(served):
    """vLLM's ``ignore_eos`` and ``min_tokens`` (sent through the client's ``extra_body``): the
    answer that ends on its own runs to ``max_tokens``, or at least ``min_tokens``; the greedy
    start is unchanged, and ``min_tokens`` above ``max_tokens`` is a 400 naming the field."""
    import openai

    prompt = ADD[0].prompt
    plain = run(_chat(served, prompt, temperature=0, max_tokens=200))
    ended = plain.usage.completion_tokens
    assert plain.choices[0].finish_reason == "stop" and ended < 190
    text = plain.choices[0].message.content
    more = run(
        _chat(served, prompt, temperature=0, max_tokens=ended + 6, extra_body={"ignore_eos": True})
    )
    assert more.choices[0].finish_reason == "length"
    assert more.usage.completion_tokens == ended + 6
    assert more.choices[0].message.content.startswith(text)
    least = run(
        _chat(served, prompt, temperature=0, max_tokens=200, extra_body={"min_tokens": ended + 3})
    )
    assert least.usage.completion_tokens >= ended + 3
    with pytest.raises(openai.BadRequestError) as e:
        run(_chat(served, prompt, max_tokens=4, extra_body={"min_tokens": 5}))
    assert e.value.body["param"] == "min_tokens"


def test_the_frequency_penalty_lowers_repetition(served):
    prompt = ADD[0].prompt

    def most_repeated(**kw) -> tuple[str, int]:
        r = run(_chat(served, prompt, temperature=0, max_tokens=32, logprobs=True, **kw))
        toks = [t.token for t in r.choices[0].logprobs.content]
        return r.choices[0].message.content, max(toks.count(t) for t in toks)

    plain, plain_rep = most_repeated()
    freq, freq_rep = most_repeated(frequency_penalty=2.0)
    assert plain_rep >= 3, plain  # the sum's scratchpad repeats digits
    assert freq != plain and freq_rep < plain_rep, (plain, freq)


def test_presence_counts_once_and_frequency_every_time():
    """OpenAI's definitions on a hand-made distribution: the presence penalty is subtracted once
    a token has appeared, the frequency penalty once per appearance."""
    import numpy as np

    from serve.backends import GenParams, Sampler

    logits = np.array([3.0, 2.0, 0.0], dtype=np.float32)

    def picks(**kw) -> list[int]:
        s = Sampler(GenParams(max_tokens=4, temperature=0, **kw))
        return [s.pick(logits)[0] for _ in range(4)]

    assert picks() == [0, 0, 0, 0]
    # 3 - 1.5 < 2; then both appeared: 1.5 > 0.5, for good (presence does not grow)
    assert picks(presence_penalty=1.5) == [0, 1, 0, 0]
    # 3 - 0.6 > 2 > 3 - 1.2; then 1.8 > 2 - 0.6: it grows with every appearance
    assert picks(frequency_penalty=0.6) == [0, 0, 1, 0]
    assert picks(logit_bias={2: 5.0}) == [2, 2, 2, 2]
    assert picks(presence_penalty=-2.0, logit_bias={1: 1.5}) == [1, 1, 1, 1]  # rewards repeats


SCHEMA = {
    "type": "object",
    "properties": {
        "sum": {"type": "integer", "minimum": 0, "maximum": 9999},
        "carry": {"type": "boolean"},
        "digits": {"type": "array", "items": {"enum": ["one", "two", "three"]}, "maxItems": 3},
    },
    "required": ["sum", "carry", "digits"],
    "additionalProperties": False,
}


def _valid(doc) -> bool:
    """``doc`` against SCHEMA, by hand."""
    return (
        isinstance(doc, dict)
        and set(doc) == {"sum", "carry", "digits"}
        and type(doc["sum"]) is int
        and 0 <= doc["sum"] <= 9999
        and type(doc["carry"]) is bool
        and isinstance(doc["digits"], list)
        and len(doc["digits"]) <= 3
        and all(d in ("one", "two", "three") for d in doc["digits"])
    )


def test_json_schema_answers_parse_and_validate(served):
    """A model never trained on JSON answers in the schema, greedy and sampled, streamed and
    not: the grammar masks every token that cannot continue a valid document."""
    fmt = {"type": "json_schema", "json_schema": {"name": "sum", "schema": SCHEMA, "strict": True}}
    answers = []
    for i, ex in enumerate(ADD):
        for temperature in (0, 1.0):
            r = run(
                _chat(
                    served,
                    ex.prompt,
                    response_format=fmt,
                    max_tokens=96,
                    temperature=temperature,
                    seed=i,
                )
            )
            assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
            doc = json.loads(r.choices[0].message.content)
            assert _valid(doc), doc
            answers.append(r.choices[0].message.content)
    # unconstrained, the same model answers with its scratchpad, not JSON
    plain = run(_chat(served, ADD[0].prompt, temperature=0, max_tokens=48))
    assert not plain.choices[0].message.content.startswith("{")

    async def streamed():
        stream = await _chat(
            served, ADD[0].prompt, response_format=fmt, max_tokens=96, temperature=0, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert run(streamed()) == answers[0]
    # json_object: any object; what ends, parses
    r = run(_chat(served, ADD[1].prompt, response_format={"type": "json_object"}, seed=3,
                  temperature=1.0, max_tokens=96))  # fmt: skip
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_top_logprobs_are_the_models_own_log_softmax(add_sft):
    """Transformers backend: every token's log-prob and its top 5 alternatives equal the
    log-softmax of the model's own logits (one forward pass over prompt + answer) within 1e-4."""
    import torch

    from polm.loading import load_model

    state = load_state(ServerState(), str(add_sft.path))
    try:
        r = run(_chat(state, ADD[2].prompt, temperature=0, max_tokens=16, logprobs=True,
                      top_logprobs=5))  # fmt: skip
        content = r.choices[0].logprobs.content
        prompt = state.backend.encode(
            state.backend.render_chat([{"role": "user", "content": ADD[2].prompt}])
        )
    finally:
        state.backend.close()
    model, tok = load_model(add_sft)
    ids = list(prompt)
    with torch.no_grad():
        for t in content:  # the greedy tokens, one at a time: the served ones by their text
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            lp = torch.log_softmax(logits, -1)
            top = torch.topk(lp, 5)
            chosen = int(top.indices[0])  # greedy: the most likely token
            assert tok.decode([chosen]) == t.token
            assert t.logprob == pytest.approx(float(lp[chosen]), abs=1e-4)
            assert [x.logprob for x in t.top_logprobs] == pytest.approx(
                top.values.tolist(), abs=1e-4
            )
            # special tokens read as the content does: empty (skip_special_tokens)
            names = [tok.decode([int(i)], skip_special_tokens=True) for i in top.indices]
            assert [x.token for x in t.top_logprobs] == names
            ids.append(chosen)


SCHEMAS = [
    {  # nested objects, an integer range
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -50, "maximum": 50},
                    "y": {"type": "integer", "minimum": 0, "maximum": 9},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "label": {"type": "string", "maxLength": 6},
        },
        "required": ["point", "label"],
        "additionalProperties": False,
    },
    {  # enums
        "type": "object",
        "properties": {
            "answer": {"enum": ["more", "less", "same"]},
            "sure": {"type": "boolean"},
        },
        "required": ["answer", "sure"],
        "additionalProperties": False,
    },
    {  # an array of bounded integers
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 999},
        "minItems": 1,
        "maxItems": 4,
    },
    {  # an array of objects
        "type": "object",
        "properties": {
            "steps": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"digit": {"type": "integer", "minimum": 0, "maximum": 9}},
                    "required": ["digit"],
                    "additionalProperties": False,
                },
                "maxItems": 3,
            }
        },
        "required": ["steps"],
        "additionalProperties": False,
    },
    {  # a number and a nullable string (a plain "number" lets a tiny model at temperature 1
        # write decimals until max_tokens: "60.41080060105001100..."; multipleOf bounds them)
        "type": "object",
        "properties": {
            "total": {"type": "number", "minimum": 0, "maximum": 2000, "multipleOf": 0.25},
            "note": {"type": ["string", "null"], "maxLength": 5},
        },
        "required": ["total", "note"],
        "additionalProperties": False,
    },
]


def test_two_hundred_schema_answers_parse_and_validate(served):
    """5 schemas x 20 prompts x temperatures 0 and 1, all sent at once: every answer ends by
    itself, parses and validates (jsonschema)."""
    import jsonschema

    prompts = [ex.prompt for ex in get_task("add").examples("test", 10)]
    prompts += [ex.prompt for ex in get_task("compare").examples("test", 10)]
    c = app_client(served)
    slots = asyncio.Semaphore(32)  # the server's default concurrency cap

    async def one(schema, prompt, temperature, seed):
        fmt = {
            "type": "json_schema",
            "json_schema": {"name": "s", "schema": schema, "strict": True},
        }
        async with slots:
            r = await c.chat.completions.create(
                model=served.model_id,
                messages=[{"role": "user", "content": prompt}],
                response_format=fmt,
                temperature=temperature,
                seed=seed,
                max_tokens=160,
            )
        return schema, r.choices[0]

    async def everything():
        jobs = [
            one(schema, p, temperature, seed)
            for schema in SCHEMAS
            for seed, p in enumerate(prompts)
            for temperature in (0, 1.0)
        ]
        return await asyncio.gather(*jobs)

    done = run(everything())
    assert len(done) == 200
    for schema, choice in done:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_the_blockwise_draw_is_the_inverse_cdf():
    """``draw`` sums by blocks (a whole-vocabulary cumsum is slow); it picks what the plain
    inverse CDF picks, on weights with zeros, across block edges and at both ends."""
    import numpy as np

    from serve.backends.base import BLOCK, draw

    rng = np.random.default_rng(0)
    for n in (7, 4 * BLOCK, 10 * BLOCK + 3):
        w = rng.random(n) * (rng.random(n) < 0.3)
        cdf = np.cumsum(w)
        for u in [0.0, 1 - 1e-12, *rng.random(300)]:
            want = min(int(np.searchsorted(cdf, u * cdf[-1])), n - 1)
            got = draw(w, u)
            assert got == want, (n, u)
