"""The OpenAI-compatible HTTP routes, as a Starlette app the BentoML service mounts.

Split the way vLLM splits its server: :mod:`serve.protocol` declares the wire format and its
bounds, the routes here stay thin (parse, check against the model, call the engine, shape the
answer), and one function, :func:`error_response`, turns every exception into an
OpenAI-shaped error. A client mistake is always a 4xx; an engine failure is a 500 whose body
says only that (details go to the server log, never a traceback, path or address).

The request limits live in :class:`Limits`, a plain ASGI middleware in front of the routes:
a body over ``max_body_bytes`` is a 413 (checked on the header and while reading), and a
generation request beyond ``max_concurrency`` in flight is a 429. Health probes are BentoML's
(``/livez``, ``/readyz``) and never pass through it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serve.backends import GenParams, TokenLogprob
from serve.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatTokenLogprob,
    ChunkChoice,
    Completion,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    DeltaFunction,
    DeltaToolCall,
    ModelCard,
    ModelList,
    NamedToolChoice,
    TextChoice,
    ToolCall,
    TopLogprob,
    Usage,
    new_id,
    validation_error,
)
from serve.state import ServerState
from serve.tools import CallStream, template_writes_calls
from serve.tools import parse as parse_calls

log = logging.getLogger("polm.serve")
STATIC = Path(__file__).parent / "static"
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


# ---- errors ----------------------------------------------------------------------------


def to_api_error(exc: Exception) -> APIError:
    """The one mapping from exceptions to the errors clients see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        return validation_error(exc)
    if isinstance(exc, HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind)
    log.exception("internal error")
    return APIError(500, "internal server error", type="server_error")


def error_response(exc: Exception) -> JSONResponse:
    err = to_api_error(exc)
    return JSONResponse(err.body(), status_code=err.status)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


# ---- limits ----------------------------------------------------------------------------


class Limits:
    """413 for oversized bodies and 429 beyond the concurrency cap, OpenAI-shaped."""

    def __init__(self, app, max_body_bytes: int, max_concurrency: int):
        self.app, self.max_body, self.cap = app, max_body_bytes, max_concurrency
        self.active = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        too_big = APIError(
            413,
            f"request body over {self.max_body} bytes",
            param=None,
            code="request_too_large",
        )
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await error_response(too_big)(scope, receive, send)
        limited = scope["path"] in GENERATION_PATHS
        if limited and self.active >= self.cap:
            busy = APIError(
                429,
                f"the server is at its limit of {self.cap} concurrent requests; retry later",
                type="rate_limit_error",
                code="rate_limit_exceeded",
            )
            return await error_response(busy)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise APIError(413, too_big.message, code="request_too_large")
            return message

        self.active += limited
        try:
            await self.app(scope, counted, send)
        finally:
            self.active -= limited


class ApiKeys:
    """With API keys set, every ``/v1`` route takes ``Authorization: Bearer <key>`` (compared in
    constant time against every key); a missing or wrong key is an OpenAI-shaped 401, before the
    body is read or a model is reached. The chat page and BentoML's probes stay open."""

    def __init__(self, app, keys: list[str]):
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        ok = False
        for key in self.keys:  # no early exit: the time does not say which key came close
            ok |= hmac.compare_digest(token.strip(), key)
        if ok and scheme.lower() == b"bearer":
            return await self.app(scope, receive, send)
        err = APIError(
            401,
            "a valid API key is required: send it as 'Authorization: Bearer <key>'"
            if given
            else "no API key was given: send it as 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )
        response = error_response(err)
        response.headers["WWW-Authenticate"] = "Bearer"
        return await response(scope, receive, send)


# ---- routes ----------------------------------------------------------------------------


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.polm
    if state.failed:
        # the reason (with paths) is in the server log, not in a body anyone can read
        raise APIError(
            503,
            "the model failed to load; the server log says why",
            type="server_error",
            code="model_load_failed",
        )
    if not state.ready:
        raise APIError(
            503,
            "the model is still loading; retry when /readyz answers 200",
            type="server_error",
            code="model_not_ready",
        )
    return state


async def _json(request: Request) -> dict:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return data


def _check_model(state: ServerState, name: str | None) -> str | None:
    """The adapter a request's ``model`` names (None: the base); a 404 for any other name."""
    if name in (None, state.model_id):
        return None
    if name in state.adapters:
        return name
    served = ", ".join(repr(n) for n in [state.model_id, *state.adapters])
    raise APIError(
        404,
        f"the model {name!r} does not exist; this server serves {served}",
        type="not_found_error",
        param="model",
        code="model_not_found",
    )


def _params(
    state: ServerState, req, n_prompt: int, choice: int = 0, prompt_logprobs=None, adapter=None
) -> GenParams:
    ctx = state.backend.context_length
    budget = req.token_budget()
    if n_prompt >= ctx:
        raise APIError(
            400,
            f"the prompt is {n_prompt} tokens, but this model's context is {ctx} tokens",
            param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    if budget is not None and n_prompt + budget > ctx:
        raise APIError(
            400,
            f"max_tokens {budget} plus the prompt's {n_prompt} tokens exceeds this model's "
            f"context of {ctx} tokens (at most {ctx - n_prompt} here)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    max_tokens = budget if budget is not None else min(ctx - n_prompt, state.default_max_tokens)
    if req.min_tokens > max_tokens:
        raise APIError(
            400,
            f"min_tokens {req.min_tokens} is more than max_tokens {max_tokens}",
            param="min_tokens",
        )
    bias = req.bias()
    _check_token_ids(state, list(bias), "logit_bias")
    constraint = _constraint(req) if isinstance(req, ChatCompletionRequest) else None
    return GenParams(
        max_tokens=max_tokens,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        # each of n choices samples on its own; with a seed, choice i takes seed + i
        seed=None if req.seed is None else (req.seed + choice) % 2**63,
        stop=req.stop_list(),
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logit_bias=bias,
        logprobs=req.logprobs_k(),
        prompt_logprobs=prompt_logprobs,
        constraint=constraint,
        adapter=adapter,
    )


def _constraint(req: ChatCompletionRequest) -> tuple | None:
    """What decoding is held to: one tool call (``tool_choice`` required or named), else the
    ``response_format`` schema, else nothing."""
    choice = req.tool_choice
    if req.tools and (choice == "required" or isinstance(choice, NamedToolChoice)):
        from serve.tools import call_grammar

        name = choice.function.name if isinstance(choice, NamedToolChoice) else None
        return ("lark", call_grammar(req.active_tools(), name))
    fmt = req.response_format
    schema = fmt.schema() if fmt is not None else None
    return None if schema is None else ("json_schema", schema)


def _check_constraint(req: ChatCompletionRequest) -> None:
    """A schema decoding cannot be held to is the client's 400, not the worker's 500."""
    constraint = _constraint(req)
    if constraint is None:
        return
    from serve.grammar import check_constraint

    if why := check_constraint(constraint):
        param = "response_format" if constraint[0] == "json_schema" else "tools"
        raise APIError(
            400,
            f"{param}: the schema cannot constrain decoding: {why}",
            param=param,
            code="invalid_schema",
        )


def _check_token_ids(state: ServerState, ids, param: str) -> None:
    vocab = state.backend.vocab_size
    bad = [t for t in ids if vocab and t >= vocab]
    if bad:
        raise APIError(
            400,
            f"{param}: token id {bad[0]} is outside this model's vocabulary of {vocab} tokens",
            param=param,
        )


async def list_models(request: Request) -> JSONResponse:
    state = _state(request)
    cards = [_card(state, None), *(_card(state, name) for name in state.adapters)]
    return JSONResponse(ModelList(data=cards).model_dump())


async def get_model(request: Request) -> JSONResponse:
    state = _state(request)
    adapter = _check_model(state, request.path_params["model"])
    return JSONResponse(_card(state, adapter).model_dump())


def _card(state: ServerState, adapter: str | None) -> ModelCard:
    """The base's card, or an adapter's: its lineage, and the base as its ``parent`` (as vLLM
    lists LoRA adapters)."""
    ctx = state.backend.context_length
    if adapter is None:
        return ModelCard(id=state.model_id, max_model_len=ctx, polm=state.card)
    return ModelCard(
        id=adapter,
        max_model_len=ctx,
        root=state.model_id,
        parent=state.model_id,
        polm=state.adapters[adapter],
    )


async def chat_completions(request: Request) -> Response:
    state = _state(request)
    req = ChatCompletionRequest.model_validate(await _json(request))
    adapter = _check_model(state, req.model)
    _check_constraint(req)
    tools = req.active_tools()
    if tools and not template_writes_calls(state.backend.chat_template):
        raise APIError(
            400,
            "tools: this model's chat template writes no tool calls polm can read (the Hermes "
            "<tool_call> format); send the request without tools",
            param="tools",
        )
    messages = [m.for_template() for m in req.messages]
    ids = state.backend.encode(state.backend.render_chat(messages, tools))
    params = [_params(state, req, len(ids), i, adapter=adapter) for i in range(req.n)]
    rid = new_id("chatcmpl")
    names = TokenNames(state.backend)
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse(_chat_chunks(state, rid, ids, params, usage, names, bool(tools)))
    done = await asyncio.gather(*(_collect(state, ids, p) for p in params))
    choices = []
    for i, r in enumerate(done):
        content, calls = parse_calls(r.text) if tools else (r.text, [])
        choices.append(
            ChatChoice(
                index=i,
                message=AssistantMessage(
                    content=content, tool_calls=[ToolCall(**c) for c in calls] or None
                ),
                finish_reason="tool_calls" if calls else r.reason,
                logprobs=names.chat(r.logprobs) if req.logprobs else None,
            )
        )
    return JSONResponse(
        ChatCompletion(
            id=rid,
            model=state.model_id,
            choices=choices,
            usage=_usage([ids], sum(r.tokens for r in done)),
        ).model_dump()
    )


async def completions(request: Request) -> Response:
    state = _state(request)
    req = CompletionRequest.model_validate(await _json(request))
    adapter = _check_model(state, req.model)
    prompts = []  # (token ids, the text echo returns: "" without echo)
    given = req.prompts()
    for k, prompt in enumerate(given):
        param = "prompt" if len(given) == 1 else f"prompt.{k}"
        if isinstance(prompt, str):
            ids = state.backend.encode(prompt)
            if not ids:
                raise APIError(400, "the prompt is empty", param=param)
        else:
            _check_token_ids(state, prompt, param)
            ids = prompt
        echo = (
            (prompt if isinstance(prompt, str) else state.backend.decode(ids)) if req.echo else ""
        )
        prompts.append((ids, echo))
    # echo with logprobs: the prompt's tokens are scored too (lm-evaluation-harness's loglikelihood)
    scored = req.logprobs if req.echo else None
    jobs = [
        (ids, echo, _params(state, req, len(ids), i, scored, adapter))
        for ids, echo in prompts
        for i in range(req.n)
    ]
    rid = new_id("cmpl")
    names = TokenNames(state.backend)
    want = req.logprobs is not None
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse(_text_chunks(state, rid, jobs, [p[0] for p in prompts], usage, names, req))
    done = await asyncio.gather(*(_collect(state, ids, p) for ids, _, p in jobs))
    choices = []
    for i, ((ids, echo, _), r) in enumerate(zip(jobs, done)):
        lps = names.completion(ids if req.echo else [], r.prompt_logprobs, r.logprobs)
        choices.append(
            TextChoice(
                index=i,
                text=echo + r.text,
                finish_reason=r.reason,
                logprobs=lps if want else None,
            )
        )
    return JSONResponse(
        Completion(
            id=rid,
            model=state.model_id,
            choices=choices,
            usage=_usage([p[0] for p in prompts], sum(r.tokens for r in done)),
        ).model_dump()
    )


def _usage(prompts: list[list[int]], n: int) -> Usage:
    p = sum(len(ids) for ids in prompts)
    return Usage(prompt_tokens=p, completion_tokens=n, total_tokens=p + n)


@dataclass
class Done:
    """One choice, generated to its end."""

    text: str
    reason: str
    tokens: int
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob | None] | None


async def _generate(state: ServerState, ids: list[int], params: GenParams):
    """The backend's pieces for one choice, recorded in the server's metrics."""
    watch = state.metrics.watch(len(ids)) if state.metrics is not None else None
    if watch is None:
        async for piece in state.backend.generate(ids, params):
            yield piece
        return
    reason, n = None, 0
    try:
        async for piece in state.backend.generate(ids, params):
            if piece.text:
                watch.token()
            if piece.finish_reason:
                reason, n = piece.finish_reason, piece.completion_tokens
            yield piece
    finally:
        watch.end(reason, n)


async def _collect(state: ServerState, ids: list[int], params: GenParams) -> Done:
    parts, reason, n, lps, prompt_lps = [], "length", 0, [], None
    scored = params.prompt_logprobs is not None  # then the first piece is the prompt's
    async for piece in _generate(state, ids, params):
        if scored:
            scored, prompt_lps = False, piece.logprobs
            continue
        parts.append(piece.text)
        lps.extend(piece.logprobs)
        if piece.finish_reason:
            reason, n = piece.finish_reason, piece.completion_tokens
    return Done("".join(parts), reason, n, lps, prompt_lps)


class TokenNames:
    """Log-probs as clients read them: token ids as text (each decoded once per request), in
    the chat shape or the legacy completions shape."""

    def __init__(self, backend):
        self.decode, self.seen = backend.decode, {}

    def text(self, token: int) -> str:
        if token not in self.seen:
            self.seen[token] = self.decode([token])
        return self.seen[token]

    def _top(self, lp: TokenLogprob) -> list[TopLogprob]:
        return [
            TopLogprob(token=(t := self.text(i)), logprob=v, bytes=list(t.encode()))
            for i, v in lp.top
        ]

    def chat(self, lps: list[TokenLogprob]) -> ChatLogprobs:
        content = []
        for lp in lps:
            t = self.text(lp.token)
            content.append(
                ChatTokenLogprob(
                    token=t, logprob=lp.logprob, bytes=list(t.encode()), top_logprobs=self._top(lp)
                )
            )
        return ChatLogprobs(content=content)

    def completion(self, prompt_ids, prompt_lps, lps, offset: int = 0) -> CompletionLogprobs:
        """The echoed prompt's tokens (``prompt_ids``; their log-probs when scored) then the
        generated ones; ``text_offset`` counts from ``offset``."""
        out = CompletionLogprobs()
        entries = list(zip(prompt_ids, prompt_lps or [None] * len(prompt_ids)))
        entries += [(lp.token, lp) for lp in lps]
        for token, lp in entries:
            t = self.text(token)
            out.tokens.append(t)
            out.token_logprobs.append(None if lp is None else lp.logprob)
            top = None if lp is None else {self.text(i): v for i, v in lp.top}
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(t)
        return out


def _sse(events) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except Exception as e:  # the status line is sent: report the error in the stream
            yield f"data: {json.dumps(to_api_error(e).body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _merge(streams):
    """The events of several async iterators as they come (n choices streamed together); the
    ones still running are cancelled when the consumer stops (a client that went away)."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield event
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(stream):
        try:
            async for event in stream:
                await queue.put(event)
        except Exception as e:  # noqa: BLE001 - raised again in the consumer
            await queue.put(e)
        await queue.put(end)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            event = await queue.get()
            if event is end:
                left -= 1
            elif isinstance(event, Exception):
                raise event
            else:
                yield event
    finally:
        for t in tasks:
            t.cancel()


async def _chat_chunks(state, rid, ids, params: list[GenParams], usage: bool, names, tools: bool):
    """Chat chunks of every choice; with tools, the text before a ``<tool_call>`` streams as
    it comes and the calls follow as ``tool_calls`` deltas (one per call) at the end."""
    made = [0] * len(params)

    def chunk(i, delta: Delta | None, reason=None, use=None, lps=None):
        return ChatCompletionChunk(
            id=rid,
            model=state.model_id,
            usage=use,
            choices=[ChunkChoice(index=i, delta=delta, finish_reason=reason, logprobs=lps)]
            if delta
            else [],
        ).model_dump(exclude_none=True)

    async def one(i: int, p: GenParams):
        yield chunk(i, Delta(role="assistant", content=""))
        calls = CallStream() if tools else None
        async for piece in _generate(state, ids, p):
            lps = names.chat(piece.logprobs) if p.logprobs is not None and piece.logprobs else None
            text = calls.push(piece.text) if calls else piece.text
            if text or lps:
                yield chunk(i, Delta(content=text), lps=lps)
            if piece.finish_reason:
                made[i] = piece.completion_tokens
                reason = piece.finish_reason
                if calls:
                    rest, found = calls.finish()
                    if rest:
                        yield chunk(i, Delta(content=rest))
                    for k, c in enumerate(found):
                        fn = DeltaFunction(**c["function"])
                        call = DeltaToolCall(index=k, id=c["id"], type="function", function=fn)
                        yield chunk(i, Delta(tool_calls=[call]))
                    reason = "tool_calls" if found else reason
                yield chunk(i, Delta(), reason)

    async for event in _merge([one(i, p) for i, p in enumerate(params)]):
        yield event
    if usage:
        yield chunk(0, None, use=_usage([ids], sum(made)))


async def _text_chunks(state, rid, jobs, prompts, usage: bool, names, req):
    made = [0] * len(jobs)
    want = req.logprobs is not None

    def chunk(i, text, reason=None, lps=None):
        return Completion(
            id=rid,
            model=state.model_id,
            choices=[TextChoice(index=i, text=text, finish_reason=reason, logprobs=lps)],
        ).model_dump(exclude_none=True)

    async def one(i: int, ids, echo, p: GenParams):
        offset = 0
        if req.echo and p.prompt_logprobs is None:  # the prompt first, unscored
            lps = names.completion(ids, None, []) if want else None
            yield chunk(i, echo, lps=lps)
            offset = len(echo)
        scored = p.prompt_logprobs is not None  # then the first piece is the prompt's
        async for piece in _generate(state, ids, p):
            if scored:
                scored = False
                yield chunk(i, echo, lps=names.completion(ids, piece.logprobs, []))
                offset = len(echo)
                continue
            lps = names.completion([], None, piece.logprobs, offset) if want else None
            if piece.text or piece.finish_reason or (lps and lps.tokens):
                yield chunk(i, piece.text, piece.finish_reason, lps)
            offset += len(piece.text)
            if piece.finish_reason:
                made[i] = piece.completion_tokens

    async for event in _merge([one(i, *job) for i, job in enumerate(jobs)]):
        yield event
    if usage:
        yield Completion(
            id=rid, model=state.model_id, choices=[], usage=_usage(prompts, sum(made))
        ).model_dump(exclude_none=True)


async def no_route(request: Request) -> Response:
    if request.url.path in (*GENERATION_PATHS, "/v1/models"):
        raise APIError(405, f"{request.method} is not allowed on {request.url.path}")
    raise APIError(404, f"no route {request.method} {request.url.path}", type="not_found_error")


async def chat_page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html")


def build_app(
    state: ServerState | None = None,
    max_body_bytes: int = 1 << 20,
    max_concurrency: int = 32,
    api_keys: list[str] | None = None,
) -> Starlette:
    """The ASGI app: OpenAI routes, the chat page, API keys, the limits and the error
    mapping."""
    routes = [
        Route("/", chat_page, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/{rest:path}", no_route, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]
    handlers = {e: _http_error for e in (APIError, ValidationError, HTTPException, Exception)}
    app = Starlette(
        routes=routes,
        exception_handlers=handlers,
        middleware=[
            Middleware(ApiKeys, keys=list(api_keys or [])),
            Middleware(Limits, max_body_bytes=max_body_bytes, max_concurrency=max_concurrency),
        ],
    )
    app.state.polm = state or ServerState()
    return app
