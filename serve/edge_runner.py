#!/usr/bin/env python3
"""polm edge runner: chat with, or serve, the ONNX model packaged beside this file.

Needs only onnxruntime-genai (and numpy, which it brings): no torch, no transformers, no polm.
Every file is checked against SHA256SUMS before the model is loaded; a changed or missing
file stops the runner with exit code 3.

    python polm_edge.py chat                       # talk to it in the terminal
    python polm_edge.py generate "Reverse: abc"    # one greedy answer, printed
    python polm_edge.py serve --port 8000          # minimal OpenAI-compatible endpoint
    python polm_edge.py verify                     # check the files only

The endpoint answers GET /v1/models, POST /v1/chat/completions and POST /v1/completions
(``stream`` included), with OpenAI-shaped errors. It decodes one request at a time; the full
service (`bentoml serve`) batches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Lock

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "model"
MAX_BODY = 1 << 20


class ChecksumError(Exception):
    pass


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(root: Path = HERE) -> int:
    """Check every file listed in SHA256SUMS; return how many were checked."""
    sums = root / "SHA256SUMS"
    if not sums.is_file():
        raise ChecksumError(f"{sums.name} is missing: the package is incomplete")
    listed = {}
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    for name, digest in listed.items():
        f = root / name
        if not f.is_file():
            raise ChecksumError(f"checksum failed: {name} is missing")
        if sha256(f) != digest:
            raise ChecksumError(f"checksum failed: {name} does not match SHA256SUMS")
    present = {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.name != "SHA256SUMS" and "__pycache__" not in p.parts
    }
    extra = sorted(present - set(listed))
    if extra:
        raise ChecksumError(f"checksum failed: {extra[0]} is not listed in SHA256SUMS")
    return len(listed)


class Model:
    def __init__(self, path: Path = MODEL_DIR):
        import numpy as np
        import onnxruntime_genai as og

        self.np, self.og = np, og
        self.model = og.Model(str(path))
        self.tokenizer = og.Tokenizer(self.model)
        self.eos = {int(t) for t in self.tokenizer.eos_token_ids}
        cfg = json.loads((path / "genai_config.json").read_text())["model"]
        self.context_length = int(cfg.get("context_length") or 2048)
        # sliding-window layers (Gemma 3) need a KV cache at least one window long
        window = (cfg.get("decoder", {}).get("sliding_window") or {}).get("window_size", 0)
        self.min_cache = min(int(window or 0), self.context_length)
        self.lock = Lock()

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(self.np.array(ids, dtype=self.np.int32))

    def stream(
        self,
        ids: list[int],
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ):
        """Yield (text so far, token count, finish reason or None) as tokens arrive."""
        og = self.og
        params = og.GeneratorParams(self.model)
        cache = min(self.context_length, max(len(ids) + max_tokens, self.min_cache))
        opts = {"max_length": cache, "do_sample": temperature > 0}
        if temperature > 0:
            opts.update(temperature=temperature, top_p=top_p, top_k=0)
            if seed is not None:
                opts["random_seed"] = seed % 2**31
        params.set_search_options(**opts)
        with self.lock:
            gen = og.Generator(self.model, params)
            gen.append_tokens(self.np.array(ids, dtype=self.np.int32))
            out: list[int] = []
            while True:
                gen.generate_next_token()
                tok = int(gen.get_next_tokens()[0])
                if tok in self.eos:
                    yield self.decode(out), len(out), "stop"
                    return
                out.append(tok)
                if len(out) >= max_tokens or gen.is_done():
                    yield self.decode(out), len(out), "length"
                    return
                yield self.decode(out), len(out), None

    def complete(self, ids: list[int], max_tokens: int, **sampling):
        """(text, token count, finish reason) of the whole answer."""
        return deque(self.stream(ids, max_tokens, **sampling), maxlen=1)[0]


# ---- HTTP ------------------------------------------------------------------------------


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _number(body: dict, name: str, default, lo, hi, kind=float):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
        raise BadRequest(400, f"{name} must be a number", name)
    if not lo <= v <= hi:
        raise BadRequest(400, f"{name} must be between {lo} and {hi}", name)
    return kind(v)


def _request(model: Model, body: dict, chat: bool):
    if chat:
        msgs = body.get("messages")
        ok = (
            isinstance(msgs, list)
            and msgs
            and all(
                isinstance(m, dict)
                and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)
                for m in msgs
            )
        )
        if not ok:
            raise BadRequest(
                400, "messages must be a non-empty list of {role, content}", "messages"
            )
        ids = model.chat_ids([{"role": m["role"], "content": m["content"]} for m in msgs])
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest(400, "prompt must be a non-empty string", "prompt")
        ids = model.encode(prompt)
    ctx = model.context_length
    if len(ids) >= ctx:
        raise BadRequest(400, f"the prompt is {len(ids)} tokens, but the context is {ctx}")
    max_tokens = _number(body, "max_tokens", ctx - len(ids), 1, ctx - len(ids), int)
    return ids, {
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 1e-9, 1.0),
        "seed": _number(body, "seed", None, 0, 2**63 - 1, int),
    }


def make_handler(model: Model, name: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet by default
            pass

        def _send(self, status: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, param=None):
            kind = "not_found_error" if status == 404 else "invalid_request_error"
            self._send(
                status, {"error": {"message": message, "type": kind, "param": param, "code": None}}
            )

        def do_GET(self):
            if self.path == "/v1/models":
                card = {
                    "id": name,
                    "object": "model",
                    "owned_by": "polm",
                    "max_model_len": model.context_length,
                }
                self._send(200, {"object": "list", "data": [card]})
            elif self.path == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self):
            chat = self.path == "/v1/chat/completions"
            if not chat and self.path != "/v1/completions":
                return self._error(404, f"no route {self.path}")
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    raise BadRequest(413, f"request body over {MAX_BODY} bytes")
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError:
                    raise BadRequest(400, "the body is not valid JSON") from None
                if not isinstance(body, dict):
                    raise BadRequest(400, "the body must be a JSON object")
                if body.get("model") not in (None, name):
                    raise BadRequest(
                        404, f"the model {body.get('model')!r} does not exist", "model"
                    )
                ids, opts = _request(model, body, chat)
            except BadRequest as e:
                return self._error(e.status, e.message, e.param)
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            if body.get("stream"):
                return self._stream(rid, chat, ids, opts)
            text, n, reason = model.complete(ids, **opts)
            usage = {
                "prompt_tokens": len(ids),
                "completion_tokens": n,
                "total_tokens": len(ids) + n,
            }
            choice = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": reason,
                }
                if chat
                else {"index": 0, "text": text, "finish_reason": reason}
            )
            kind = "chat.completion" if chat else "text_completion"
            self._send(
                200,
                {
                    "id": rid,
                    "object": kind,
                    "created": int(time.time()),
                    "model": name,
                    "choices": [choice],
                    "usage": usage,
                },
            )

        def _stream(self, rid, chat, ids, opts):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            kind = "chat.completion.chunk" if chat else "text_completion"
            sent = 0
            for text, _n, reason in model.stream(ids, **opts):
                if text.endswith("\ufffd") and reason is None:
                    continue
                piece, sent = text[sent:], len(text)
                choice = (
                    {"index": 0, "delta": {"content": piece}, "finish_reason": reason}
                    if chat
                    else {"index": 0, "text": piece, "finish_reason": reason}
                )
                chunk = {
                    "id": rid,
                    "object": kind,
                    "created": int(time.time()),
                    "model": name,
                    "choices": [choice],
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

    return Handler


# ---- commands --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("verify", help="check every file against SHA256SUMS")
    sub.add_parser("chat", help="chat in the terminal")
    g = sub.add_parser("generate", help="print one greedy answer to a user message")
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=128)
    s = sub.add_parser("serve", help="minimal OpenAI-compatible HTTP endpoint")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    a = p.parse_args(argv)
    try:
        n = verify()
    except ChecksumError as e:
        print(f"error: {e}; refusing to load the model", file=sys.stderr)
        return 3
    if a.cmd == "verify":
        print(f"ok: {n} files match SHA256SUMS")
        return 0
    manifest = json.loads((HERE / "polm.json").read_text())
    name = manifest.get("served_model_name") or manifest.get("name") or "polm-edge"
    model = Model()
    if a.cmd == "generate":
        ids = model.chat_ids([{"role": "user", "content": a.prompt}])
        print(model.complete(ids, a.max_tokens, temperature=0.0)[0])
    elif a.cmd == "chat":
        history: list[dict] = []
        print(f"{name} (ctrl-d to quit)")
        while True:
            try:
                line = input("> ")
            except EOFError:
                print()
                return 0
            history.append({"role": "user", "content": line})
            ids = model.chat_ids(history)
            if len(ids) >= model.context_length:
                print("(the conversation no longer fits the context; starting over)")
                history = [history[-1]]
                ids = model.chat_ids(history)
            shown = 0
            text = ""
            for text, _n, _r in model.stream(ids, model.context_length - len(ids), 0.0):
                print(text[shown:], end="", flush=True)
                shown = len(text)
            print()
            history.append({"role": "assistant", "content": text})
    else:
        server = ThreadingHTTPServer((a.host, a.port), make_handler(model, name))
        print(f"serving {name} on http://{a.host}:{server.server_address[1]}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
