"""The serving app in-process (the same Starlette app and loader the BentoML service runs,
driven by the official `openai` client over httpx's ASGI transport) on every checkpoint format
the earlier stages write: GPTQ, 1-bit, MoE and ONNX are each served and answer (the 1-bit
model's answers are its own greedy ones, not its parent's); the transformers backend batches
concurrent requests and its batched greedy answers equal the evaluation's; backend choice
follows the format; stop strings are cut across tokens."""

import asyncio

import httpx
import pytest

from polm.errors import PolmError
from polm.evaluate import greedy_generate
from polm.loading import load_model
from polm.tasks import get_task
from serve.app import build_app
from serve.backends import TextStream, choose_backend
from serve.state import ServerState, load_state
from tests.helpers import answers, app_client, shared

pytestmark = pytest.mark.slow
PROMPTS = [ex for ex in get_task("add").examples("test", 8)]


@pytest.fixture(scope="module")
def formats(add_sft, onnx_int4, tmp_path_factory):
    from merge.moe import MoESettings
    from merge.moe import run as moe
    from optimize.gguf import GgufSettings
    from optimize.gguf import run as gguf
    from optimize.gptq import GPTQSettings
    from optimize.gptq import run as gptq
    from optimize.onebit import OneBitSettings
    from optimize.onebit import run as onebit

    def build(name, fn):
        return shared(tmp_path_factory, f"serve_{name}", fn)

    return {
        "gptq": build("gptq", lambda o: gptq([add_sft], GPTQSettings(bits=4, task="add"), o)),
        "onebit": build(
            "onebit",
            lambda o: onebit([add_sft], OneBitSettings(method="ternary", recovery=False), o),
        ),
        "moe": build(
            "moe",
            lambda o: moe(
                [add_sft], MoESettings(num_experts=2, gate_mode="random", noise_scale=0.001), o
            ),
        ),
        "onnx": onnx_int4,
        "gguf": build(
            "gguf", lambda o: gguf([add_sft], GgufSettings(outtype="q8_0", parity_n=0), o)
        ),
    }


def correct(task_answers: list[str]) -> int:
    task = get_task("add")
    return sum(task.score(a, ex) for a, ex in zip(task_answers, PROMPTS))


@pytest.mark.parametrize(
    "fmt,backend,min_correct",
    [
        ("gptq", "transformers", 5),
        ("onebit", "transformers", None),  # no longer adds: see the test after this one
        ("moe", "transformers", 5),
        ("onnx", "onnx", 5),
        ("gguf", "llamacpp", 5),
    ],
)
def test_each_format_is_served_and_answers(formats, fmt, backend, min_correct):
    ckpt = formats[fmt]
    state = load_state(ServerState(), str(ckpt.path))
    assert state.ready, state.failed
    try:
        assert state.card["format"] == ckpt.format and state.card["backend"] == backend
        assert ckpt.format == ("hf" if fmt == "moe" else fmt)  # a Mixtral is a plain HF model
        assert state.card["lineage"][0]["stage"] == ckpt.stage
        assert any(n["stage"] == "align.sft" for n in state.card["lineage"])
        outs = asyncio.run(
            answers(state, [ex.prompt for ex in PROMPTS], temperature=0, max_tokens=48)
        )
        assert all(isinstance(o, str) for o in outs)
        assert sum(bool(o.strip()) for o in outs) >= 6, outs
        if min_correct is not None:  # the compressed models still add (the parent: ~7 of 8)
            assert correct(outs) >= min_correct, outs
    finally:
        state.backend.close()


def test_onebit_service_serves_the_onebit_model_greedily(formats, add_sft):
    """Ternary without recovery no longer adds (its answers decay into runs of zeros), so what
    the service must get right is serving that model: every answer is non-empty, equals the
    greedy answer of the checkpoint loaded through the spine's loader, and the answers are not
    the full-precision parent's (the quantized weights are served)."""
    ckpt = formats["onebit"]
    prompts = [ex.prompt for ex in PROMPTS]
    state = load_state(ServerState(), str(ckpt.path))
    try:
        served = asyncio.run(answers(state, prompts, temperature=0, max_tokens=48))
    finally:
        state.backend.close()
    assert all(isinstance(o, str) and o.strip() for o in served), served
    model, tok = load_model(ckpt)
    assert served == greedy_generate(model, tok, prompts, max_new_tokens=48)
    parent, parent_tok = load_model(add_sft)
    assert served != greedy_generate(parent, parent_tok, prompts, max_new_tokens=48)


def test_transformers_backend_batches_and_matches_the_evaluation(add_sft):
    state = load_state(ServerState(), str(add_sft.path))
    try:
        prompts = [ex.prompt for ex in PROMPTS]
        served = asyncio.run(answers(state, prompts, temperature=0, max_tokens=48))
        stats = state.backend.stats
        # 8 concurrent requests (plus the warm-up) ran in fewer forward batches than requests
        assert stats["max_rows"] >= 4 and stats["batches"] < stats["requests"], stats
        model, tok = load_model(add_sft)
        assert served == greedy_generate(model, tok, prompts, max_new_tokens=48)
    finally:
        state.backend.close()


@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_runtime_services_answer_as_their_evaluation_does(formats, fmt):
    """onnxruntime-genai and llama.cpp: the service's greedy answers are ``polm eval``'s, also
    for a prompt asked again after others (llama.cpp keeps the shared prompt prefix cached)."""
    from polm.llamacpp import GgufLM
    from polm.onnxrt import OnnxLM

    path = formats[fmt].path
    state = load_state(ServerState(), str(path))
    try:
        prompts = [ex.prompt for ex in PROMPTS[:5]]
        served = asyncio.run(answers(state, prompts, temperature=0, max_tokens=48))
        assert served == (OnnxLM if fmt == "onnx" else GgufLM)(path).greedy(prompts, 48)
        again = asyncio.run(answers(state, prompts[:1], temperature=0, max_tokens=48))
        assert again == served[:1]
    finally:
        state.backend.close()


def test_a_checkpoint_that_cannot_load_is_a_503_without_its_path(tmp_path):
    state = load_state(ServerState(), str(tmp_path))  # not a checkpoint
    assert not state.ready and "not a polm checkpoint" in state.failed  # for the log

    async def get():
        transport = httpx.ASGITransport(app=build_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get("/v1/models")

    resp = asyncio.run(get())
    err = resp.json()["error"]
    assert resp.status_code == 503 and err["type"] == "server_error"
    assert "failed to load" in err["message"] and str(tmp_path) not in err["message"]


def test_backend_choice_follows_the_format():
    assert choose_backend("onnx") == "onnx"
    assert choose_backend("gguf") == "llamacpp" and choose_backend("gguf", "llamacpp") == "llamacpp"
    assert choose_backend("gptq") in ("transformers", "vllm")
    assert choose_backend("onebit") == "transformers"  # vLLM cannot read polm's 1-bit format
    assert choose_backend("hf", "transformers") == "transformers"
    for fmt, requested, message in [
        ("hf", "onnx", "Export it first"),
        ("onnx", "transformers", "onnx backend"),
        ("gguf", "onnx", "llamacpp backend"),
        ("hf", "llamacpp", "polm optimize gguf"),
        ("onebit", "vllm", "does not read"),
        ("hf", "tensorrt", "unknown backend"),
    ]:
        with pytest.raises(PolmError, match=message):
            choose_backend(fmt, requested)


def test_stop_strings_are_cut_even_when_split_across_tokens():
    pieces = ["The", " ans", "wer", " is", " 4", "2", "!"]
    vocab = {i: p for i, p in enumerate(pieces)}

    def run(stop):
        stream = TextStream(lambda ids: "".join(vocab[i] for i in ids), stop)
        out = ""
        for i in range(len(pieces)):
            out += stream.push(i)
            if stream.stopped:
                return out, True
        return out + stream.flush(), False

    assert run([]) == ("The answer is 42!", False)
    assert run(["answer"]) == ("The ", True)  # "answer" arrives as " ans" + "wer"
    assert run(["42"]) == ("The answer is ", True)
    assert run(["xyz", "is 4"]) == ("The answer ", True)
    assert run(["!?"]) == ("The answer is 42!", False)  # held back, then released at the end


def test_api_keys_guard_every_v1_route_and_bad_keys_reach_no_model(add_sft):
    state = load_state(ServerState(), str(add_sft.path))
    keys = ["key-one", "key-two"]
    chat_body = {"messages": [{"role": "user", "content": "1+2"}]}

    async def go():
        app = build_app(state, api_keys=keys)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://polm.test") as http:
            before = state.backend.stats["requests"]
            bad = [{}, {"Authorization": "Bearer key-three"}, {"Authorization": "key-one"},
                   {"Authorization": "Bearer "}, {"Authorization": "Basic key-one"}]  # fmt: skip
            routes = [
                ("POST", "/v1/chat/completions", chat_body),
                ("POST", "/v1/completions", {"prompt": "1+2", "max_tokens": 4}),
                ("GET", "/v1/models", None),
                ("GET", "/v1/models/add_sft", None),
            ]
            codes = []
            for headers in bad:
                for method, path, body in routes:  # 5 x 4 = 20 requests
                    r = await http.request(method, path, json=body, headers=headers)
                    codes.append(r.status_code)
                    err = r.json()["error"]
                    assert err["code"] == "invalid_api_key" and "Bearer" in err["message"], err
                    assert r.headers["www-authenticate"] == "Bearer"
            assert codes == [401] * 20
            assert state.backend.stats["requests"] == before  # none reached the model
            assert (await http.get("/")).status_code == 200  # the chat page itself is open
            client = app_client(state, api_key="key-two", api_keys=keys)
            r = await client.chat.completions.create(
                model=state.model_id,
                messages=[{"role": "user", "content": "12+34"}],
                temperature=0,
                max_tokens=32,
            )
            assert r.choices[0].message.content and state.backend.stats["requests"] > before

    try:
        asyncio.run(go())
    finally:
        state.backend.close()
