"""A real `bentoml serve` on 127.0.0.1, driven by the official `openai` client (and raw HTTP
for what a client library would refuse to send), on the transformers backend (the built-in
model) and on the llama.cpp one (its f16 GGUF export), each through the same tests: the OpenAI
routes, usage counts, identical greedy answers under concurrency, a table of malformed requests
that must all be 4xx with the OpenAI error shape, 16 concurrent streams, what today's clients
send (content parts, the developer role, log-probs, n, echo, structured outputs, tool calls;
also on the ONNX backend), the concurrency cap's 429, API keys, metrics, graceful SIGTERM and
the chat page in headless Chromium."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.helpers import (
    BENTOML,
    CHAT,
    LONG,
    MALFORMED,
    MAX_BODY,
    MSG,
    REPO,
    Server,
    chat,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module", params=["transformers", "llamacpp"])
def server(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    if request.param == "transformers":  # the built-in model, imported by the service itself
        s = Server(tmp, max_body_bytes=MAX_BODY)
        s.tokenizer_dir = tmp / "cache" / "serve" / "tiny-base"
    else:
        from optimize.gguf import GgufSettings
        from optimize.gguf import run as gguf
        from polm.importer import import_model

        base = import_model("builtin:tiny-base", tmp / "base")
        exported = gguf([base], GgufSettings(outtype="f16", parity_n=0), tmp / "tiny-base")
        s = Server(tmp, max_body_bytes=MAX_BODY, model=exported.path)
        s.tokenizer_dir = base.path
    s.backend = request.param
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tokenizer(server):
    from polm.loading import load_tokenizer

    return load_tokenizer(server.tokenizer_dir)


def test_models_chat_and_completions_with_right_usage(server, tokenizer):
    models = server.client.models.list().data
    assert [m.id for m in models] == ["tiny-base"]
    card = models[0].model_extra
    fmt = {"transformers": "hf", "llamacpp": "gguf"}[server.backend]
    assert card["max_model_len"] == 256 and card["polm"]["format"] == fmt
    assert card["polm"]["backend"] == server.backend
    assert card["polm"]["lineage"][-1]["source"] == "builtin:tiny-base"

    messages = [{"role": "user", "content": "Reverse the letters: abcd"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    r = server.client.chat.completions.create(
        model=server.model, messages=messages, temperature=0, max_tokens=64
    )
    answer = r.choices[0].message.content
    assert answer and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(
        tokenizer(answer, add_special_tokens=False)["input_ids"]
    )
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    # the same request streamed: the same text in pieces, the same usage at the end
    pieces, usage, reasons = [], None, []
    for chunk in server.client.chat.completions.create(
        model=server.model,
        messages=messages,
        temperature=0,
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert "".join(pieces) == answer and len([p for p in pieces if p]) > 1
    assert reasons[-1] == "stop" and usage == r.usage

    # max_tokens cuts the answer: finish_reason length, exactly that many tokens
    cut = chat(server, "Reverse the letters: abcdefghij", temperature=0, max_tokens=3)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3

    # text completions, plain and streamed
    c = server.client.completions.create(
        model=server.model, prompt="<|user|>\nhello", max_tokens=5, temperature=0
    )
    assert c.usage.completion_tokens <= 5 and c.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(
        ch.choices[0].text
        for ch in server.client.completions.create(
            model=server.model,
            prompt="<|user|>\nhello",
            max_tokens=5,
            temperature=0,
            stream=True,
        )
        if ch.choices
    )
    assert streamed == c.choices[0].text


def test_stop_strings_and_seeded_sampling(server):
    full = chat(server, "Reverse the letters: abcdef", temperature=0, max_tokens=32)
    text = full.choices[0].message.content
    assert len(text) > 2
    stopped = chat(
        server, "Reverse the letters: abcdef", temperature=0, max_tokens=32, stop=[text[2]]
    )
    assert stopped.choices[0].message.content == text[: text.index(text[2])]
    assert stopped.choices[0].finish_reason == "stop"
    a, b = (
        chat(server, "Tell me something.", temperature=1.0, seed=7, max_tokens=24) for _ in range(2)
    )
    assert a.choices[0].message.content == b.choices[0].message.content


def test_greedy_answers_are_identical_across_concurrent_requests(server):
    with ThreadPoolExecutor(4) as pool:
        outs = list(
            pool.map(
                lambda _: (
                    chat(server, "Reverse the letters: polm", temperature=0, max_tokens=40)
                    .choices[0]
                    .message.content
                ),
                range(4),
            )
        )
    assert outs[0] and outs == [outs[0]] * 4


def test_sixteen_concurrent_streams_finish_without_errors(server):
    def stream(i):
        text = ""
        for chunk in server.client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": f"Reverse: ab{i}"}],
            stream=True,
            max_tokens=48,
            temperature=0.7,
            seed=i,
        ):
            for c in chunk.choices:
                text += c.delta.content or ""
        return text

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stream, range(16)))
    assert len(results) == 16 and all(isinstance(r, str) for r in results)
    assert sum(bool(r) for r in results) >= 12  # answers, not just empty streams


@pytest.mark.parametrize("name,path,body,status,param", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_openai_shaped_4xx(server, name, path, body, status, param):
    if isinstance(body, (dict, list)):
        content = json.dumps(body).encode()
    else:
        content = body.encode() if isinstance(body, str) else body
    r = httpx.post(
        server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    for leak in ("Traceback", str(REPO), "/tmp/", "127.0.0.1"):
        assert leak not in err["message"], err


def test_the_openai_client_sees_typed_errors(server):
    import openai

    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="nope", messages=MSG)
    with pytest.raises(openai.BadRequestError, match="context"):
        chat(server, LONG)
    r = httpx.get(server.url + CHAT)  # wrong method
    assert r.status_code == 405 and "error" in r.json()


@pytest.fixture(scope="module")
def onnx_server(onnx_lora, loras, tmp_path_factory):
    """The ONNX backend (tiny-base's export with LoRA slots, two LoRA adapters by name) for
    what clients send beyond the basics."""
    from polm.loading import load_tokenizer

    adapters = ",".join(f"{name}={c.path}" for name, c in loras.items())
    s = Server(tmp_path_factory.mktemp("onnx"), model=onnx_lora.path, adapters=adapters)
    s.backend, s.tokenizer = "onnx", load_tokenizer(onnx_lora.path)
    yield s
    s.stop()


def test_content_parts_and_the_developer_role_read_as_text_and_system(server):
    content_parts_and_the_developer_role(server)


def test_what_clients_send_works_on_a_real_server(server, tokenizer):
    what_clients_send(server, tokenizer)


def test_what_clients_send_works_on_a_real_onnx_server(onnx_server, loras):
    models = onnx_server.client.models.list().data
    assert [m.id for m in models] == [onnx_server.model, "adder", "comparer"]
    card = models[0].model_extra["polm"]
    assert card["backend"] == "onnx" and card["format"] == "onnx"
    content_parts_and_the_developer_role(onnx_server)
    what_clients_send(onnx_server, onnx_server.tokenizer)
    # a LoRA adapter by name answers as its checkpoint does
    from polm.evaluate import greedy_generate
    from polm.loading import load_model
    from polm.tasks import get_task

    prompt = get_task("add").examples("test", 1)[0].prompt
    model, tok = load_model(loras["adder"])
    (want,) = greedy_generate(model, tok, [prompt], max_new_tokens=24)
    got = onnx_server.client.chat.completions.create(
        model="adder",
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=24,
    )
    assert got.choices[0].message.content == want


def content_parts_and_the_developer_role(server):
    """What the official SDK and agent frameworks send: content as a list of text parts, and the
    ``developer`` role for system text; the model reads them as the plain forms."""
    plain = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Reverse the letters:\nabcd"},
    ]
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Reverse the letters:"},
                {"type": "text", "text": "abcd"},
            ],
        },
    ]
    a, b = (
        server.client.chat.completions.create(
            model=server.model, messages=m, temperature=0, max_completion_tokens=24
        )
        for m in (plain, parts)
    )
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    import openai

    with pytest.raises(openai.BadRequestError, match="'image_url' are not supported"):
        image = {"type": "image_url", "image_url": {"url": "x"}}
        server.client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": [image]}]
        )


def what_clients_send(server, tokenizer):
    """Each client-side feature once, through the official client on `bentoml serve` (the
    in-process suite, tests/serve/test_sampling.py and test_tools.py, holds them in depth)."""
    c, model = server.client, server.model
    small = {"type": "integer", "minimum": 0, "maximum": 99}
    add_tool = {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": small, "b": small},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    }
    # log-probs, streamed and not, and n choices with a seed
    r = c.chat.completions.create(
        model=model, messages=MSG, temperature=0, max_tokens=8, logprobs=True, top_logprobs=2
    )
    lps = r.choices[0].logprobs.content
    assert lps and "".join(t.token for t in lps) == r.choices[0].message.content
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5) for t in lps)
    kw = dict(model=model, messages=MSG, temperature=1.0, max_tokens=8, n=3, seed=5)
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    assert [x.message.content for x in a.choices] == [x.message.content for x in b.choices]
    assert [x.index for x in a.choices] == [0, 1, 2]
    # lm-evaluation-harness's log-likelihood request: token ids, echo, max_tokens 0
    ids = tokenizer("reverse abc", add_special_tokens=False)["input_ids"]
    e = c.completions.create(model=model, prompt=ids, echo=True, logprobs=1, max_tokens=0)
    assert len(e.choices[0].logprobs.token_logprobs) == len(ids)
    assert e.choices[0].logprobs.token_logprobs[0] is None
    # structured output
    schema = {
        "type": "object",
        "properties": {"word": {"enum": ["cba", "abc"]}, "n": {"type": "integer", "maximum": 9}},
        "required": ["word", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}
    j = c.chat.completions.create(
        model=model, messages=MSG, response_format=fmt, temperature=0, max_tokens=40
    )
    doc = json.loads(j.choices[0].message.content)
    assert doc["word"] in ("cba", "abc") and type(doc["n"]) is int and doc["n"] <= 9
    # a required tool call, streamed, from a model that never saw a tool
    stream = c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "sum 1 2"}],
        tools=[add_tool],
        tool_choice="required",
        temperature=0,
        max_tokens=120,
        stream=True,
    )
    calls, reasons = [], []
    for chunk in stream:
        for ch in chunk.choices:
            calls += ch.delta.tool_calls or []
            reasons += [ch.finish_reason] if ch.finish_reason else []
    assert reasons == ["tool_calls"] and [x.function.name for x in calls] == ["add"]
    assert set(json.loads(calls[0].function.arguments)) == {"a", "b"}


KEYS = "key-one,key-two"  # the capped server's API keys
AUTH = {"Authorization": "Bearer key-two"}


@pytest.fixture(scope="module")
def capped(base_ckpt, loras, tmp_path_factory):
    """tiny-base with two LoRA adapters by name, a concurrency cap of 2 and API keys."""
    adapters = ",".join(f"{name}={c.path}" for name, c in loras.items())
    s = Server(tmp_path_factory.mktemp("capped"), max_concurrency=2, api_key=KEYS,
               client_api_key="key-two", model=base_ckpt.path, adapters=adapters)  # fmt: skip
    yield s
    s.stop()


def test_lora_adapters_answer_by_name_behind_the_key(capped, loras):
    """The transformers backend's adapters on a real server: each name answers as its own
    checkpoint does (tests/serve/test_adapters.py holds them in depth)."""
    from polm.evaluate import greedy_generate
    from polm.loading import load_model
    from polm.tasks import get_task

    models = capped.client.models.list().data
    assert [m.id for m in models] == [capped.model, "adder", "comparer"]
    assert models[1].model_extra["parent"] == capped.model
    prompt = get_task("compare").examples("test", 1)[0].prompt
    for name in ("adder", "comparer"):
        model, tok = load_model(loras[name])
        (want,) = greedy_generate(model, tok, [prompt], max_new_tokens=16)
        got = capped.client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=16,
        )
        assert got.choices[0].message.content == want, name
    r = httpx.post(capped.url + CHAT, json={"model": "adder", "messages": MSG})
    assert r.status_code == 401  # an adapter is no way around the key


def test_with_api_keys_set_the_client_needs_one(capped):
    import openai
    from openai import OpenAI

    r = capped.client.chat.completions.create(
        model=capped.model, messages=MSG, temperature=0, max_tokens=8
    )
    assert r.choices[0].message.content is not None
    wrong = OpenAI(base_url=capped.url + "/v1", api_key="key-three", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=capped.model, messages=MSG)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    bare = httpx.post(capped.url + CHAT, json={"messages": MSG})
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(capped.url + "/readyz").status_code == 200  # probes stay open


def _polm_metrics(url: str) -> dict[str, float]:
    """polm's series on /metrics (open without a key, as the probes are), summed over pids."""
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200, r.text
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        if line.startswith("polm:") and "_bucket" not in line:
            name, _, value = line.rpartition(" ")
            name = re.sub(r'\{?pid="\d+",?\}?', "", name)
            out[name] = out.get(name, 0.0) + float(value)
    return out


def test_metrics_count_tokens_and_time_the_first_token(capped):
    before = _polm_metrics(capped.url)
    done = [
        capped.client.chat.completions.create(
            model=capped.model, messages=MSG, temperature=0, max_tokens=6, n=2
        )
        for _ in range(2)
    ]
    after = _polm_metrics(capped.url)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    made = sum(r.usage.completion_tokens for r in done)
    assert grew("polm:generation_tokens_total") == made > 0
    # each of the n choices reads its prompt
    assert grew("polm:prompt_tokens_total") == 2 * sum(r.usage.prompt_tokens for r in done)
    assert grew("polm:time_to_first_token_seconds_count") == 4
    reasons = [ch.finish_reason for r in done for ch in r.choices]
    for reason in ("stop", "length"):
        key = f'polm:request_success_total{{finished_reason="{reason}"}}'
        assert grew(key) == reasons.count(reason), (key, before, after)
    assert after["polm:num_requests_running"] == 0


def slow_request(url: str, path: str = CHAT):
    """Open a request whose body never finishes arriving: it holds a slot until released."""
    body = json.dumps({"messages": MSG, "max_tokens": 4, "temperature": 0}).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: {AUTH['Authorization']}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body[:5]
    )

    def finish() -> tuple[int, bytes]:
        sock.sendall(body[5:])
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            got = sock.recv(65536)
            if not got:
                break
            data += got
        sock.close()
        return int(data.split(b" ", 2)[1]), data

    return finish


def test_over_the_concurrency_cap_is_429_while_readyz_answers(capped):
    assert 503 in capped.readyz_codes or capped.readyz_codes == [200]
    first, second = slow_request(capped.url), slow_request(capped.url)
    time.sleep(0.5)
    r = httpx.post(capped.url + CHAT, json={"messages": MSG, "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 429, r.text
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert httpx.get(capped.url + "/readyz").status_code == 200
    assert httpx.get(capped.url + "/v1/models", headers=AUTH).status_code == 200  # not generation
    assert first()[0] == 200 and second()[0] == 200
    r = httpx.post(capped.url + CHAT, json={"messages": MSG, "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 200  # slots freed


def test_sigterm_finishes_the_request_in_flight_then_exits(capped):
    finish = slow_request(capped.url)
    time.sleep(0.3)
    capped.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    status, data = finish()
    assert status == 200 and b'"finish_reason"' in data
    assert capped.proc.wait(timeout=60) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(capped.url + "/readyz", timeout=2)


def test_bentoml_build_works_offline_and_the_bento_serves(tmp_path):
    home = tmp_path / "bentoml"
    offline = {**os.environ, "BENTOML_HOME": str(home), "PIP_NO_INDEX": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [BENTOML, "build", "--output", "tag"],
        cwd=REPO,
        env=offline,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    tag = r.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("polm:"), r.stdout
    bento = home / "bentos" / "polm" / tag.split(":")[1]
    assert (bento / "src" / "serve" / "static" / "index.html").is_file()
    assert (bento / "src" / "polm" / "builtin" / "tiny-base" / "model.safetensors").is_file()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    s = Server(tmp_path, target=tag, cwd=outside, home=home)  # the bento's own sources
    try:
        r = chat(s, "Reverse the letters: bento", temperature=0, max_tokens=16)
        assert r.choices[0].message.content
    finally:
        s.stop()


def chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed "
            "(apt-get install chromium chromium-driver; .ci/run tries)"
        )
    return browser, driver


def test_chat_page_streams_an_answer_in_headless_chromium(server):
    browser, driver = chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ):
        opts.add_argument(flag)
    d = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        d.get(server.url + "/")
        wait = WebDriverWait(d, 30)
        wait.until(lambda d: d.find_element(By.ID, "model").get_attribute("value") == "tiny-base")
        assert "builtin:tiny-base" in d.find_element(By.ID, "lineage").text
        # count the answer's DOM mutations as they arrive (records, not callbacks: the browser
        # may hand several SSE events to one read, and their mutations to one callback)
        d.execute_script("""
            window.updates = 0;
            new MutationObserver((records) => window.updates += records.length).observe(
                document.getElementById('log'), {subtree: true, characterData: true,
                                                 childList: true});
        """)
        d.find_element(By.ID, "input").send_keys("Reverse the letters: chromium")
        d.find_element(By.ID, "send").click()
        done = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done]"))
        assert done[0].text.strip()
        # a streamed answer arrives as several deltas, each shown as it comes
        assert int(done[0].get_attribute("data-pieces")) > 3
        assert d.execute_script("return window.updates") > 3
        assert "tokens/s" in d.find_element(By.ID, "stats").text
        assert not d.find_elements(By.CSS_SELECTOR, ".error")
    finally:
        d.quit()
