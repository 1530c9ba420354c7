"""polm's service on the vLLM backend beside a bare `vllm serve` of the same model, in one run on
one GPU: the aggregate completion tokens/s of concurrent clients against each, and the ratio.

    python bench/vllm_throughput.py [--model DIR] [--clients 16] [--requests 64] [--tokens 64]

Without --model it serves builtin:tiny-base (imported into a temporary directory). Needs a CUDA
GPU and vLLM (``pip install 'polm[vllm]'``). The servers run one after the other, each with the
whole GPU and the gpu_memory_utilization polm's backend uses (0.85), so neither server's KV
cache is squeezed by the other's. Each gets one untimed warm-up request. A server that exits, or
is not healthy within --wait-s, stops the run with the end of its log. It prints; it asserts
nothing about speed (benchmarks are not tests).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
GPU_MEMORY_UTILIZATION = 0.85  # serve/backends/vllm.py's default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:]


class Server:
    """A server process on a free port of 127.0.0.1 (``{port}`` in argv is replaced), its
    output in ``work/<slug>.log``; ready once ``health_path`` answers 200."""

    def __init__(self, name: str, argv: list[str], env: dict, health_path: str, work: Path):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / (name.replace(" ", "-") + ".log")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [a.replace("{port}", str(self.port)) for a in argv],
                cwd=REPO,
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.health_url = self.url + health_path

    def wait_until_healthy(self, timeout_s: float) -> None:
        """Return once the health route answers 200; raise with the end of the server's log if
        the server exits first or the time runs out."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode} before it was healthy; "
                    f"the end of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            try:
                if httpx.get(self.health_url, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise TimeoutError(
            f"{self.name} was not healthy at {self.health_url} within {timeout_s:.0f} s; "
            f"the end of {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def stop(self) -> None:
        """Terminate the server and its children (BentoML's workers leave the process group)."""
        from processes import terminate_tree  # bench/, first on the path of a bench script

        terminate_tree(self.proc.pid, timeout=60)
        self.proc.wait()


def aggregate_tokens_per_s(server: Server, clients: int, requests: int, tokens: int) -> float:
    """All completion tokens of ``requests`` sampled chat requests from ``clients`` concurrent
    clients, over the wall time; one untimed warm-up request first."""
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=600)
    model = client.models.list().data[0].id

    def one(i: int) -> int:
        r = client.chat.completions.create(
            model=model,
            max_tokens=tokens,
            temperature=0.7,
            seed=i,
            messages=[{"role": "user", "content": f"{i}+{i}"}],
        )
        return r.usage.completion_tokens

    one(requests)  # warm-up, not timed
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(one, range(requests)))
    return total / (time.perf_counter() - start)


def measure(server: Server, args) -> float:
    try:
        server.wait_until_healthy(args.wait_s)
        return aggregate_tokens_per_s(server, args.clients, args.requests, args.tokens)
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a polm checkpoint directory (hf or gptq); default tiny-base")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--wait-s", type=float, default=600, help="how long a server may take to start")
    a = p.parse_args()
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit("needs vLLM on a CUDA GPU: pip install 'polm[vllm]'")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from polm.checkpoint import Checkpoint
    from polm.importer import import_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = (
            Checkpoint.open(a.model)
            if a.model
            else import_model("builtin:tiny-base", work / "tiny-base")
        )
        polm = Server(
            "polm on vLLM",
            [str(BIN / "bentoml"), "serve", "serve.service:Polm"]
            + ["--host", "127.0.0.1", "--port", "{port}"],
            {"POLM_MODEL": str(ckpt.path), "POLM_BACKEND": "vllm", "POLM_CACHE": tmp},
            "/readyz",
            work,
        )
        ours = measure(polm, a)
        bare = Server(
            "bare vllm serve",
            [str(BIN / "vllm"), "serve", str(ckpt.path), "--host", "127.0.0.1"]
            + ["--port", "{port}", "--served-model-name", "bare"]
            + ["--gpu-memory-utilization", str(GPU_MEMORY_UTILIZATION)],
            {},
            "/health",
            work,
        )
        theirs = measure(bare, a)
    print(
        f"{torch.cuda.get_device_name(0)}, {ckpt.path.name}: {a.clients} clients, "
        f"{a.requests} requests of up to {a.tokens} tokens (temperature 0.7)"
    )
    print(f"  polm on vLLM (bentoml serve)  {ours:8.0f} tok/s")
    print(f"  bare vllm serve               {theirs:8.0f} tok/s")
    print(f"  ratio polm / bare             {ours / theirs:8.2f}")


if __name__ == "__main__":
    main()
