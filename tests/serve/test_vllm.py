"""The vLLM backend on a GPU: the end-to-end checks of tests/e2e/test_serve.py against a real
`bentoml serve` on vLLM, and 16-client throughput beside a bare `vllm serve` of the same model
(printed as a ratio; tests never assert on time). Skipped without a CUDA GPU or without vLLM
(``pip install 'polm[vllm]'``)."""

import importlib.util
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.e2e, pytest.mark.slow]
if importlib.util.find_spec("vllm") is None:
    pytest.skip(
        "vLLM is not installed (pip install 'polm[vllm]' on a GPU machine)", allow_module_level=True
    )

from tests.helpers import MALFORMED, Server, chat, free_port  # noqa: E402


@pytest.fixture(scope="module")
def vllm_server(add_sft, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("vllm"), model=add_sft.path, backend="vllm")
    yield s
    s.stop()


def test_the_service_on_vllm_answers_streams_and_refuses_bad_requests(vllm_server):
    card = vllm_server.client.models.list().data[0].model_extra
    assert card["polm"]["backend"] == "vllm"
    r = chat(vllm_server, "12+34", temperature=0, max_tokens=48)
    assert r.choices[0].message.content and r.usage.completion_tokens > 0
    with ThreadPoolExecutor(4) as pool:
        outs = list(
            pool.map(
                lambda _: (
                    chat(vllm_server, "12+34", temperature=0, max_tokens=48)
                    .choices[0]
                    .message.content
                ),
                range(4),
            )
        )
    assert outs == [r.choices[0].message.content] * 4
    for name, path, body, status, _param in MALFORMED:
        if isinstance(body, dict):
            got = httpx.post(vllm_server.url + path, json=body, timeout=30)
            assert got.status_code == status, (name, got.text)


def aggregate_tokens_per_s(base_url: str, model: str) -> float:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="-", max_retries=0)

    def one(i):
        r = client.chat.completions.create(
            model=model,
            max_tokens=64,
            temperature=0.7,
            seed=i,
            messages=[{"role": "user", "content": f"{i}+{i}"}],
        )
        return r.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        tokens = sum(pool.map(one, range(64)))
    return tokens / (time.perf_counter() - start)


def test_throughput_beside_bare_vllm_serve(vllm_server, add_sft, tmp_path):
    vllm = shutil.which("vllm") or str(Path(sys.executable).with_name("vllm"))
    port = free_port()
    log = open(tmp_path / "vllm.log", "w")
    bare = subprocess.Popen(
        [vllm, "serve", str(add_sft.path), "--port", str(port), "--served-model-name", "bare"],
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        ours = aggregate_tokens_per_s(vllm_server.url + "/v1", vllm_server.model)
        theirs = aggregate_tokens_per_s(f"http://127.0.0.1:{port}/v1", "bare")
        print(
            f"\n16 clients: polm on vLLM {ours:.0f} tok/s, bare vllm serve {theirs:.0f} "
            f"tok/s, ratio {ours / theirs:.2f}"
        )
        assert ours > 0 and theirs > 0
    finally:
        bare.terminate()
        bare.wait(timeout=60)
