"""The BentoML service: one polm checkpoint behind an OpenAI-compatible API and a chat page.

    bentoml serve                                   # the built-in tiny chat model
    bentoml serve --arg model=runs/compress/gptq    # any polm checkpoint (or POLM_MODEL=...)

Arguments (``--arg key=value``; each also read from ``POLM_<KEY>``): ``model`` (a checkpoint
directory; default the built-in ``builtin:tiny-base``), ``backend`` (auto, transformers, onnx,
llamacpp, vllm), ``served_model_name`` (default: the checkpoint directory's name),
``max_concurrency`` (generation requests in flight before a 429, default 32),
``max_body_bytes`` (default 1 MiB, 413 above), ``default_max_tokens`` (for requests that name
no ``max_tokens``: the rest of the context, at most this; default 1024), ``timeout_s``
(BentoML's request timeout, default 600), ``api_key`` (comma-separated keys that every
``/v1`` route then requires as ``Authorization: Bearer``; or ``api_key_file``, one key a
line), ``adapters`` (``NAME=DIR,NAME=DIR``: LoRA ``peft-adapter`` checkpoints of this very
base, each served under its own ``model`` name; transformers backend), ``draft`` (a checkpoint
with the model's tokenizer, e.g. its ``optimize.distill`` student: speculative decoding of
greedy requests on the transformers backend; ``draft_tokens`` proposed a step, default 4),
``bento_model`` (a
BentoML model holding the
checkpoint: what ``polm package bento`` builds into a bento, used when ``model`` is not given).

``/metrics`` serves BentoML's request metrics and polm's generation series
(:mod:`serve.metrics`). The module imports only BentoML, Starlette and polm's protocol at
import time. The service
loads the model on a background thread from ``__init__``, so the server answers ``/livez`` at
once and ``/readyz`` 503 until the model is loaded and a warm-up generation has succeeded.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import bentoml
from pydantic import BaseModel, Field

from serve.app import build_app
from serve.metrics import ServeMetrics
from serve.state import ServerState, load_state, parse_adapters

log = logging.getLogger("polm.serve")


class ServeArgs(BaseModel):
    model: str | None = Field(None, description="checkpoint directory; default the built-in")
    backend: str = Field("auto", description="auto | transformers | onnx | vllm | llamacpp")
    served_model_name: str | None = None
    max_concurrency: int = Field(32, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    timeout_s: int = Field(600, ge=1)
    default_max_tokens: int = Field(1024, ge=1, description="when a request names none")
    api_key: str | None = Field(
        None, description="API keys (comma-separated) every /v1 route requires as a Bearer token"
    )
    api_key_file: str | None = Field(None, description="a file of API keys, one per line")
    adapters: str | None = Field(
        None, description="LoRA adapters served by name beside the base: NAME=DIR,NAME=DIR"
    )
    draft: str | None = Field(
        None,
        description="a draft checkpoint for speculative decoding (same tokenizer); default: "
        "the distilled student that recorded itself as the model's draft; none: no draft",
    )
    draft_tokens: int = Field(4, ge=1, le=16, description="tokens the draft proposes a step")
    bento_model: str | None = Field(
        None, description="the BentoML model holding the checkpoint (polm package bento sets it)"
    )


def _args() -> ServeArgs:
    given = dict(vars(bentoml.use_arguments()))
    for name in ServeArgs.model_fields:
        env = os.environ.get(f"POLM_{name.upper()}")
        if env is not None and name not in given:
            given[name] = env
    return ServeArgs(**given)


def _api_keys(args: ServeArgs) -> list[str]:
    keys = [k.strip() for k in (args.api_key or "").split(",")]
    if args.api_key_file:
        keys += [k.strip() for k in Path(args.api_key_file).read_text().splitlines()]
    return [k for k in keys if k and not k.startswith("#")]


ARGS = _args()
STATE = ServerState(
    default_max_tokens=ARGS.default_max_tokens, metrics=ServeMetrics(bentoml.metrics)
)
APP = build_app(
    STATE,
    max_body_bytes=ARGS.max_body_bytes,
    max_concurrency=ARGS.max_concurrency,
    api_keys=_api_keys(ARGS),
)


@bentoml.service(
    name="polm",
    # BentoML's own cap is a backstop over every route; polm's OpenAI-shaped 429 (ARGS
    # max_concurrency, generation routes only) triggers first.
    traffic={"timeout": ARGS.timeout_s, "max_concurrency": ARGS.max_concurrency + 16},
    workers=1,
)
@bentoml.asgi_app(APP, path="/")
class Polm:
    def __init__(self) -> None:
        self.state = STATE
        threading.Thread(target=self._load, name="polm-load", daemon=True).start()

    def _load(self) -> None:
        model, name, lineage = ARGS.model, ARGS.served_model_name, None
        if model is None and ARGS.bento_model:  # a bento that carries its checkpoint
            from serve.bento import packed_checkpoint

            model, packed_name, lineage = packed_checkpoint(ARGS.bento_model)
            name = name or packed_name
        try:
            adapters = parse_adapters(ARGS.adapters)
        except Exception as e:  # a malformed spec: a failed load, answered 503, logged
            log.exception("adapters")
            self.state.failed = str(e)
            return
        load_state(self.state, model, ARGS.backend, name, lineage, adapters,
                   draft=ARGS.draft, draft_tokens=ARGS.draft_tokens)  # fmt: skip

    def __is_ready__(self) -> bool:
        return self.state.ready

    @bentoml.on_shutdown
    def _close(self) -> None:
        if self.state.backend is not None:
            self.state.backend.close()
