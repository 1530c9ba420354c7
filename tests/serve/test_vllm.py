"""The vLLM backend on a GPU: the end-to-end checks of tests/e2e/test_serve.py against a real
`bentoml serve` on vLLM. Skipped without a CUDA GPU or without vLLM (``pip install
'polm[vllm]'``). Its throughput beside a bare `vllm serve` is a benchmark, not a test:
bench/vllm_throughput.py prints it."""

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.e2e, pytest.mark.slow]
if importlib.util.find_spec("vllm") is None:
    pytest.skip(
        "vLLM is not installed (pip install 'polm[vllm]' on a GPU machine)", allow_module_level=True
    )

from tests.helpers import MALFORMED, Server, chat  # noqa: E402


@pytest.fixture(scope="module")
def vllm_server(add_sft, tmp_path_factory):
    # a cold vLLM start (engine, CUDA graph capture, warm-up) may take minutes: allow it 10
    s = Server(tmp_path_factory.mktemp("vllm"), ready_s=600, model=add_sft.path, backend="vllm")
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
