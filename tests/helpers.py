"""Plain helpers the tests share: the repository's path, the `polm` command line, models built
once per run, an in-process client for the serving app, and a real `bentoml serve`.

Fixtures live in conftest.py (which may import from here); tests import helpers from here,
never from conftest.py or from another test module. Heavy libraries are imported inside the
functions that need them, so importing this module stays cheap for every test file.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from polm.checkpoint import Checkpoint
    from serve.state import ServerState

REPO = Path(__file__).resolve().parents[1]

# The shared SFT models train on the whole task split, as when the tests downstream (GRPO, DPO,
# RLAIF, distillation) were calibrated; a capped run otherwise takes only the examples it uses.
ALL_DATA = {"n_train": 20_000}

ADD_SFT_STEPS = 200  # the shared add_sft fixture's length (about 70% exact match on add)


def polm_cli(*args, cwd=None, timeout=600, env=None, fresh=False):
    """Run the real `polm` command line in a child process (with tqdm's bars off, unless ``env``
    says what the environment is) and return its ``subprocess.CompletedProcess``.

    The child is forked from a server that has already imported what `polm` commands import
    (``tests/cli_preload.py``: torch, transformers, TRL...; one per test worker, started on
    first use), then runs ``polm.cli.main`` as ``python -m polm.cli`` does, in its own
    directory, environment and output files: about 5 s of imports saved a command. What differs
    from a fresh interpreter is what happens at import time, done once in the server: modules'
    import-time warnings are not printed again and an environment variable read only at import
    keeps the server's value. ``fresh=True`` runs a new interpreter instead, for the tests
    about what a user sees from a cold start (output, warnings) or about its timing."""
    args = [str(a) for a in args]
    env = {**os.environ, "TQDM_DISABLE": "1"} if env is None else env
    if fresh:
        return subprocess.run(
            [sys.executable, "-m", "polm.cli", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    import tempfile

    with tempfile.TemporaryDirectory(prefix="polm-cli-") as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        out.touch()
        err.touch()
        proc = _forkserver().Process(
            target=_cli_child, args=(args, str(cwd or os.getcwd()), env, str(out), str(err))
        )
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(["polm", *args], timeout)
        return subprocess.CompletedProcess(
            ["polm", *args], proc.exitcode, out.read_text(errors="replace"),
            err.read_text(errors="replace"),
        )  # fmt: skip


_FORKSERVER = None


def _forkserver():
    global _FORKSERVER
    if _FORKSERVER is None:
        import multiprocessing
        from multiprocessing import forkserver

        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["tests.cli_preload"])
        # Start the server in the repository, since Python 3.11's server imports the preload
        # module from its working directory (it sets no sys.path first), and with the
        # environment a command gets by default, which is what its imports read.
        here, tqdm = os.getcwd(), os.environ.get("TQDM_DISABLE")
        os.chdir(REPO)
        os.environ["TQDM_DISABLE"] = "1"
        try:
            forkserver.ensure_running()
        finally:
            os.chdir(here)
            if tqdm is None:
                del os.environ["TQDM_DISABLE"]
    return _FORKSERVER


def _cli_child(args: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """`python -m polm.cli ARGS` in a process forked from the preloaded server."""
    os.chdir(cwd)  # (the server flushed what its imports printed: tests/cli_preload.py)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = [str(REPO / "polm" / "cli.py"), *args]
    from polm.cli import main

    sys.exit(main(args))


def shared(tmp_path_factory, name: str, build) -> Checkpoint:
    """A checkpoint built once per test run and shared by the pytest-xdist workers (read-only
    for tests): the first worker to ask builds it under a file lock, the others wait and open it."""
    from filelock import FileLock

    from polm.checkpoint import Checkpoint

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above each worker's own
    if keep := os.environ.get("POLM_TEST_KEEP"):
        # a developer's option (never CI's): keep built models across runs in this directory;
        # delete it after changing what a fixture builds
        root = Path(keep)
    out = root / "shared" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "polm.json").exists():
            return Checkpoint.open(out)
        return build(out)


def build_onnx_int4(add_sft: Checkpoint, tmp_path_factory) -> Checkpoint:
    """The int4 ONNX export of ``add_sft`` (with a 100-prompt parity check), built once per run:
    the ONNX tests' subject and the model the serving and edge tests serve."""
    from optimize.onnx import OnnxSettings, run

    s = OnnxSettings(precision="int4", task="add", parity_n=100)
    return shared(tmp_path_factory, "onnx_int4", lambda out: run([add_sft], s, out))


# --- the serving app in-process -------------------------------------------------------------


def app_client(state: ServerState, api_key: str = "-", **app_options):
    """The official `openai` client on the serving app, over httpx's ASGI transport."""
    import httpx
    from openai import AsyncOpenAI

    from serve.app import build_app

    transport = httpx.ASGITransport(app=build_app(state, **app_options))
    http = httpx.AsyncClient(transport=transport, base_url="http://polm.test/v1")
    return AsyncOpenAI(base_url="http://polm.test/v1", api_key=api_key, http_client=http)


async def answers(state: ServerState, prompts: list[str], **kw) -> list[str]:
    """The served chat answers to ``prompts``, all requested at once."""
    import asyncio

    c = app_client(state)

    async def one(p):
        r = await c.chat.completions.create(
            model=state.model_id, messages=[{"role": "user", "content": p}], **kw
        )
        return r.choices[0].message.content

    return await asyncio.gather(*(one(p) for p in prompts))


# --- a real `bentoml serve` -----------------------------------------------------------------

BENTOML = str(Path(sys.executable).with_name("bentoml"))
MAX_BODY = 65536  # the request body limit tests/e2e/test_serve.py's server runs with


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`bentoml serve` of polm's service (or of a bento: ``target``) on a free port of
    127.0.0.1; ``env`` becomes POLM_* variables (``model=DIR`` -> ``POLM_MODEL=DIR``),
    ``process_env`` is added to the server's environment as it is. Fails with the server's
    log if it exits or is not ready within ``ready_s`` seconds."""

    def __init__(
        self,
        tmp: Path,
        target="serve.service:Polm",
        cwd=REPO,
        home=None,
        ready_s=180,
        process_env=None,
        client_api_key="unused",
        **env,
    ):
        import httpx
        from openai import OpenAI

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [BENTOML, "serve", target, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=cwd,
            env={
                **os.environ,
                "POLM_CACHE": str(tmp / "cache"),
                "OMP_NUM_THREADS": "1",
                **({"BENTOML_HOME": str(home)} if home else {}),
                **(process_env or {}),
                **{f"POLM_{k.upper()}": str(v) for k, v in env.items()},
            },
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.readyz_codes = []
        deadline = time.time() + ready_s
        while time.time() < deadline:
            assert self.proc.poll() is None, self.read_log()
            try:
                code = httpx.get(self.url + "/readyz", timeout=2).status_code
                self.readyz_codes.append(code)
                if code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        else:
            raise AssertionError("server never became ready:\n" + self.read_log())
        self.client = OpenAI(base_url=self.url + "/v1", api_key=client_api_key, max_retries=0)
        self.model = self.client.models.list().data[0].id

    def read_log(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def stop(self) -> None:
        stop_process_tree(self.proc)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``url`` answers (any status) while ``proc``, the server, keeps running."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            assert proc.poll() is None, f"the server behind {url} exited"
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def stop_process_tree(proc: subprocess.Popen) -> None:
    """Kill a server and its workers: BentoML's workers leave the process group."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    if proc.poll() is None:
        proc.wait()


def chat(server: Server, content: str, **kw):
    return server.client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": content}], **kw
    )


LONG = "x " * 400  # far over the 256-token context
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
MALFORMED = [
    # (id, path, body (dict/list -> JSON, str/bytes -> raw), status, param)
    ("invalid-json", CHAT, b'{"messages": [', 400, None),
    ("body-is-a-list", CHAT, [MSG], 400, None),
    ("body-is-a-string", CHAT, '"hello"', 400, None),
    ("not-utf8", CHAT, b"\xff\xfe\x00", 400, None),
    ("no-messages", CHAT, {"max_tokens": 5}, 400, "messages"),
    ("empty-messages", CHAT, {"messages": []}, 400, "messages"),
    ("messages-not-a-list", CHAT, {"messages": "hi"}, 400, "messages"),
    ("bad-role", CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, 400, None),
    ("content-not-text", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, None),
    ("max-tokens-zero", CHAT, {"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-negative", CHAT, {"messages": MSG, "max_tokens": -3}, 400, "max_tokens"),
    ("max-tokens-string", CHAT, {"messages": MSG, "max_tokens": "10"}, 400, "max_tokens"),
    ("temperature-negative", CHAT, {"messages": MSG, "temperature": -0.5}, 400, "temperature"),
    ("temperature-too-high", CHAT, {"messages": MSG, "temperature": 9}, 400, "temperature"),
    ("top-p-zero", CHAT, {"messages": MSG, "top_p": 0}, 400, "top_p"),
    ("top-p-over-one", CHAT, {"messages": MSG, "top_p": 1.5}, 400, "top_p"),
    ("too-many-stops", CHAT, {"messages": MSG, "stop": list("abcde")}, 400, "stop"),
    ("n-over-bound", CHAT, {"messages": MSG, "n": 9}, 400, "n"),
    ("penalty-over-range", CHAT, {"messages": MSG, "presence_penalty": 2.5}, 400, None),
    ("top-logprobs-alone", CHAT, {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    ("top-logprobs-over", CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 21}, 400, None),
    ("logit-bias-key", CHAT, {"messages": MSG, "logit_bias": {"abc": 1}}, 400, None),
    ("logit-bias-value", CHAT, {"messages": MSG, "logit_bias": {"5": 101}}, 400, None),
    ("logit-bias-vocab", CHAT, {"messages": MSG, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("stream-not-bool", CHAT, {"messages": MSG, "stream": "yes"}, 400, "stream"),
    ("format-type", CHAT, {"messages": MSG, "response_format": {"type": "yaml"}}, 400, None),
    (
        "format-no-schema",
        CHAT,
        {"messages": MSG, "response_format": {"type": "json_schema"}},
        400,
        "response_format",
    ),
    (
        "format-bad-schema",
        CHAT,
        {
            "messages": MSG,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
            },
        },
        400,
        "response_format",
    ),
    ("unknown-field", CHAT, {"messages": MSG, "max_token": 5}, 400, "max_token"),
    ("negative-seed", CHAT, {"messages": MSG, "seed": -1}, 400, "seed"),
    (
        "image-part",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "messages.0.content.0",
    ),
    ("empty-parts", CHAT, {"messages": [{"role": "user", "content": []}]}, 400, None),
    ("tool-role", CHAT, {"messages": [{"role": "tool", "content": "4"}]}, 400, None),
    (
        "prompt-over-context",
        CHAT,
        {"messages": [{"role": "user", "content": LONG}]},
        400,
        "messages",
    ),
    ("prompt-plus-max-tokens", CHAT, {"messages": MSG, "max_tokens": 250}, 400, "max_tokens"),
    ("unknown-model", CHAT, {"model": "gpt-9", "messages": MSG}, 404, "model"),
    (
        "oversized-body",
        CHAT,
        {"messages": [{"role": "user", "content": "y" * MAX_BODY}]},
        413,
        None,
    ),
    ("completion-no-prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("completion-33-prompts", "/v1/completions", {"prompt": ["a"] * 33}, 400, "prompt"),
    ("completion-token-vocab", "/v1/completions", {"prompt": [1, 99999999]}, 400, "prompt"),
    ("completion-token-negative", "/v1/completions", {"prompt": [1, -2]}, 400, None),
    ("completion-logprobs-over", "/v1/completions", {"prompt": "a", "logprobs": 21}, 400, None),
    ("completion-max-tokens-neg", "/v1/completions", {"prompt": "a", "max_tokens": -1}, 400, None),
    ("completion-prompt-number", "/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("completion-over-context", "/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("unknown-route", "/v1/embeddings", {"input": "hi"}, 404, None),
]


# A multi-turn chat (system, user, assistant, user) for chat template checks.
CHAT_TURNS = [
    {"role": "system", "content": "answer with the sum"},
    {"role": "user", "content": "12+34"},
    {"role": "assistant", "content": "=> 46"},
    {"role": "user", "content": "5+7"},
]
