"""Tool calls through the served API, in-process with the official `openai` client: a model that
learned to call tools (tiny-base after a short SFT on the built-in ``tool`` task) calls one of
its own accord when asked with tools, and answers after the tool's result comes back (the round
trip), streamed and not; ``tool_choice`` ``required`` and named hold even a model that never saw
a tool to a valid call (constrained decoding); ``none`` leaves the tools out; and the chat
template renders chats without tools as before.

What 100 steps teach tiny-base (measured, AMD EPYC): the call format, every answer a call of
``add`` with two integers, but not to copy the prompt's numbers into it (``eval.tool.accuracy``
0-3% after 100, 200 and 400 steps, also from the add SFT and at learning rate 3e-3; a 1M-parameter
model pretrained on 128-token blocks). The tests hold the format and the round trip, not the
sums."""

import asyncio
import json

import pytest

from polm.tasks import ADD_TOOL, get_task
from serve.state import ServerState, load_state
from tests.helpers import app_client, shared

pytestmark = pytest.mark.slow
# 100 steps of 16 tool conversations: every greedy answer a well-formed call (measured, AMD EPYC,
# fp32 and bf16); 80 steps did too, 60 did not (47% fp32, 19% bf16)
TOOL_STEPS, TOOL_BATCH = 100, 16
EXAMPLES = get_task("tool").examples("test", 8)
NOT_A_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "a word's meaning",
        "parameters": {
            "type": "object",
            "properties": {"word": {"type": "string", "maxLength": 8}},
            "required": ["word"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}


@pytest.fixture(scope="module")
def tool_sft(base_ckpt, tmp_path_factory):
    from align.sft import SFTSettings
    from align.sft import run as sft

    settings = SFTSettings(
        task="tool", max_steps=TOOL_STEPS, per_device_train_batch_size=TOOL_BATCH
    )
    return shared(tmp_path_factory, "tool_sft", lambda out: sft([base_ckpt], settings, out))


@pytest.fixture(scope="module")
def served(tool_sft):
    state = load_state(ServerState(), str(tool_sft.path))
    assert state.ready, state.failed
    yield state
    state.backend.close()


def run(coro):
    return asyncio.run(coro)


def _ask(state, messages, max_tokens=80, **kw):
    c = app_client(state)
    return c.chat.completions.create(
        model=state.model_id, messages=messages, temperature=0, max_tokens=max_tokens, **kw
    )


def _calls_add(text: str) -> bool:
    """The answer is one call of ``add`` with two integers (what the tool task's format is)."""
    from serve.tools import parse

    content, calls = parse(text)
    if content or len(calls) != 1 or calls[0]["function"]["name"] != "add":
        return False
    args = json.loads(calls[0]["function"]["arguments"])
    return set(args) == {"a", "b"} and all(type(v) is int for v in args.values())


def test_the_task_teaches_the_call_format(base_ckpt, tool_sft):
    from polm.evaluate import evaluate_checkpoint, greedy_generate
    from polm.loading import load_model

    tools = get_task("tool").tools
    prompts = [ex.prompt for ex in get_task("tool").examples("test", 32)]
    made = {}
    for name, ckpt in (("base", base_ckpt), ("sft", tool_sft)):
        model, tok = load_model(ckpt)
        outs = greedy_generate(model, tok, prompts, max_new_tokens=88, tools=tools)
        made[name] = sum(map(_calls_add, outs)) / len(outs)
    assert made["base"] == 0 and made["sft"] >= 0.9, made
    m = evaluate_checkpoint(tool_sft, ["tool"], n=16, with_perplexity=False)
    assert 0 <= m["eval.tool.accuracy"] <= 1 and m["eval.tool.n"] == 16


def test_a_model_that_learned_tools_calls_one_and_answers_after_its_result(served):
    for ex in EXAMPLES:
        user = [{"role": "user", "content": ex.prompt}]
        r = run(_ask(served, user, tools=[ADD_TOOL]))
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        assert not choice.message.content  # the call is not repeated as text
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "add" and call.id
        args = json.loads(call.function.arguments)
        assert set(args) == {"a", "b"}
        # the round trip: the call and the tool's result go back through the template
        result = str(args["a"] + args["b"])
        back = user + [
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": result},
        ]
        final = run(_ask(served, back, max_tokens=16, tools=[ADD_TOOL])).choices[0]
        assert final.finish_reason == "stop" and not final.message.tool_calls, final
        assert final.message.content.startswith("=> "), final.message.content


def test_the_round_trip_streamed_is_the_round_trip_whole(served):
    """Both turns streamed (the call as deltas, then the answer after the tool's result): each
    is what the unstreamed request returns."""
    user = [{"role": "user", "content": EXAMPLES[0].prompt}]
    whole = run(_ask(served, user, tools=[ADD_TOOL])).choices[0].message

    async def streamed(messages, max_tokens=80):
        stream = await _ask(served, messages, max_tokens, tools=[ADD_TOOL], stream=True)
        calls, reasons, text = [], [], ""
        async for chunk in stream:
            for ch in chunk.choices:
                calls += ch.delta.tool_calls or []
                text += ch.delta.content or ""
                reasons += [ch.finish_reason] if ch.finish_reason else []
        return calls, reasons, text

    calls, reasons, text = run(streamed(user))
    assert reasons == ["tool_calls"] and text == ""  # no <tool_call> text leaks as content
    assert [(c.index, c.function.name, c.function.arguments) for c in calls] == [
        (0, w.function.name, w.function.arguments) for w in whole.tool_calls
    ]
    (call,) = calls
    assert call.id and call.type == "function"
    # the second turn: the streamed call (as a client assembles it) and the tool's result
    args = json.loads(call.function.arguments)
    back = user + [
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": str(args["a"] + args["b"])},
    ]
    final = run(_ask(served, back, max_tokens=16, tools=[ADD_TOOL])).choices[0].message
    calls, reasons, text = run(streamed(back, max_tokens=16))
    assert reasons == ["stop"] and calls == [] and text == final.content
    assert text.startswith("=> "), text


@pytest.mark.parametrize("choice", ["required", "named"])
def test_required_and_named_choices_hold_any_model_to_a_valid_call(add_sft, choice):
    """The add SFT never saw a tool: constrained decoding still makes its answer one call of
    the chosen tool with arguments valid under the tool's schema."""
    state = load_state(ServerState(), str(add_sft.path))
    try:
        tools = [ADD_TOOL, NOT_A_TOOL]
        tool_choice = (
            "required"
            if choice == "required"
            else {"type": "function", "function": {"name": "lookup"}}
        )
        for ex in EXAMPLES[:3]:
            r = run(
                _ask(
                    state,
                    [{"role": "user", "content": ex.prompt}],
                    tools=tools,
                    tool_choice=tool_choice,
                )  # fmt: skip
            )
            ch = r.choices[0]
            assert ch.finish_reason == "tool_calls", ch.message
            (call,) = ch.message.tool_calls
            args = json.loads(call.function.arguments)
            if choice == "named" or call.function.name == "lookup":
                assert call.function.name == "lookup" and set(args) == {"word"}
                assert isinstance(args["word"], str) and len(args["word"]) <= 8
            else:
                assert call.function.name == "add" and set(args) == {"a", "b"}
                assert all(type(v) is int for v in args.values())
    finally:
        state.backend.close()


def test_tool_choice_none_leaves_the_tools_out(served):
    user = [{"role": "user", "content": EXAMPLES[1].prompt}]
    r = run(_ask(served, user, tools=[ADD_TOOL], tool_choice="none")).choices[0]
    assert r.message.tool_calls is None and r.finish_reason in ("stop", "length")


def test_bad_tool_requests_are_400s(served, tmp_path):
    import openai

    user = [{"role": "user", "content": "sum 1 2"}]
    with pytest.raises(openai.BadRequestError, match="no tool is named"):
        sub = {"type": "function", "function": {"name": "sub"}}
        run(_ask(served, user, tools=[ADD_TOOL], tool_choice=sub))
    with pytest.raises(openai.BadRequestError, match="no tools to choose from"):
        run(_ask(served, user, tool_choice="required"))
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        run(_ask(served, user + [{"role": "tool", "content": "3"}], tools=[ADD_TOOL]))


def test_a_template_without_tool_calls_refuses_tools(chatml_sft):
    import openai

    state = load_state(ServerState(), str(chatml_sft.path))
    try:
        with pytest.raises(openai.BadRequestError, match="writes no tool calls"):
            run(_ask(state, [{"role": "user", "content": "sum 1 2"}], tools=[ADD_TOOL]))
    finally:
        state.backend.close()


def test_the_template_renders_chats_without_tools_as_before():
    from polm.tokenizer import CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer(["a small corpus"], vocab_size=300)
    tok.chat_template = CHAT_TEMPLATE
    chat = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|bos|><|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\nA<|end|>\n"
        "<|user|>\nV<|end|>\n<|assistant|>\n"
    )
    with_tools = tok.apply_chat_template(
        chat, tools=[ADD_TOOL], tokenize=False, add_generation_prompt=True
    )
    assert with_tools.startswith(
        "<|bos|><|system|>\nS\n<tools>\nadd(a: integer, b: integer) # the sum of a and b\n"
        "</tools><|end|>\n<|user|>\nU<|end|>\n"
    )
