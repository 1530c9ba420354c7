"""The OpenAI wire format: request and response models, with every bound declared in the types.

Only what polm serves is accepted: an unknown field is a 400 naming it (OpenAI answers the same
way), so a typo such as ``max_token`` never silently falls back to a default. ``user`` is
accepted and ignored. Limits that depend on the model (its context length, its vocabulary) are
checked by the routes, which know it.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4  # OpenAI's own limit on stop sequences
MAX_STOP_CHARS = 64
MAX_MESSAGES = 256
MAX_TEXT_CHARS = 200_000  # per message or prompt; the body-size cap bounds the whole request
MAX_TOKENS_CAP = 4096
MAX_N = 8  # choices per request (each decodes as its own sequence)
MAX_PROMPTS = 32  # prompts in one /v1/completions request
MAX_TOP_LOGPROBS = 20  # vLLM's limit (OpenAI's is 20 on chat, 5 on completions)
MAX_LOGIT_BIAS = 1024
MAX_TOOLS = 128


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "10" is not a number here


Stop = (
    Annotated[str, Field(max_length=MAX_STOP_CHARS)]
    | Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
        Field(max_length=MAX_STOP),
    ]
    | None
)


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """The sampling fields shared by chat and text completions."""

    model: str | None = Field(None, max_length=256, description="served model id")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Stop = None
    n: int = Field(1, ge=1, le=MAX_N, description="choices, each sampled on its own")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: (
        Annotated[
            dict[
                Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
                Annotated[float, Field(ge=-100, le=100)],
            ],
            Field(max_length=MAX_LOGIT_BIAS),
        ]
        | None
    ) = Field(None, description="token id (a decimal string) -> bias added to its logit")
    user: str | None = Field(None, max_length=256)
    # vLLM's extensions (also llama.cpp's ``ignore_eos``): the end-of-sequence token cannot
    # be drawn at all, or not before ``min_tokens`` tokens
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS_CAP)

    def stop_list(self) -> list[str]:
        if self.stop is None or self.stop == "":
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def bias(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}


class TextPart(BaseModel):
    """One part of a message's content. Only ``text`` parts are read (these models read text);
    any other type is a 400 that names it."""

    model_config = ConfigDict(extra="allow", strict=True)  # an image part has other fields
    type: str = Field(max_length=64)
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS)

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":
            raise ValueError(
                f"content parts of type {self.type!r} are not supported: this model reads text "
                "only (parts of type 'text')"
            )
        if self.text is None or self.model_extra:
            raise ValueError("a text part has exactly the fields 'type' and 'text'")
        return self


# what OpenAI's "developer" role is to a chat template: the system's instructions
ROLE_FOR_TEMPLATE = {"developer": "system"}


FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class FunctionDef(Strict):
    name: FunctionName
    description: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: FunctionName


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class CalledFunction(Strict):
    name: FunctionName
    arguments: str = Field(max_length=MAX_TEXT_CHARS, description="the arguments, as JSON")


class ToolCall(Strict):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: (
        str | Annotated[list[TextPart], Field(min_length=1, max_length=MAX_MESSAGES)] | None
    ) = Field(
        None,
        description="a string, or a list of text parts (joined with newlines, as vLLM does); "
        "may be null on an assistant message that calls tools",
    )
    name: str | None = Field(None, max_length=64)
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: str | None = Field(None, max_length=256)

    @field_validator("content")
    @classmethod
    def _bounded(cls, v):
        if v is not None and len(cls.join(v)) > MAX_TEXT_CHARS:
            raise ValueError(f"the content is longer than {MAX_TEXT_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _shape(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message calls tools")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(
                "content: a message needs content (or, from the assistant, tool_calls)"
            )
        return self

    @staticmethod
    def join(content) -> str:
        if content is None:
            return ""
        return content if isinstance(content, str) else "\n".join(p.text for p in content)

    def for_template(self) -> dict:
        """The message as a chat template takes it: plain text, OpenAI roles mapped, tool calls
        with their arguments as objects (as Hugging Face chat templates expect them)."""
        role = ROLE_FOR_TEMPLATE.get(self.role, self.role)
        out: dict = {"role": role, "content": self.join(self.content)}
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": _args(c.function.arguments)},
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


def _args(arguments: str):
    """A call's arguments as the template writes them: the object, when the string is JSON."""
    import json

    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class JsonSchemaFormat(Strict):
    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=MAX_STOP_CHARS * 64)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the output is always held to the schema

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ResponseFormat(Strict):
    """OpenAI's structured outputs: any JSON object, or JSON valid under a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given exactly when type is 'json_schema'")
        return self

    def schema(self) -> dict | None:
        """The JSON schema decoding is held to, or None for free text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            return self.json_schema.schema_
        return None


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if v[-1].role == "assistant":
            raise ValueError("the last message must be from the user or the system")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info):
        if v and not info.data.get("logprobs"):
            raise ValueError("needs logprobs set to true")
        return v

    @model_validator(mode="after")
    def _choice_names_a_tool(self):
        choice = self.tool_choice
        if choice is None or choice in ("none", "auto"):
            return self
        names = [t.function.name for t in self.tools or []]
        if not names:
            raise ValueError("tool_choice: there are no tools to choose from")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice: no tool is named {choice.function.name!r}")
        return self

    def logprobs_k(self) -> int | None:
        """How many alternatives each token's log-probs list, or None for no log-probs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def active_tools(self) -> list[dict] | None:
        """The tools the model is asked with (none when ``tool_choice`` is ``none``)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(Sampling):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(description="a prompt, a list of prompts, or token ids (one list per prompt)")
    # 0 with echo: the prompt's log-probs alone (how lm-evaluation-harness scores answers)
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_CAP)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _bounded(cls, v):
        for one in [v] if isinstance(v, str) else v:
            if isinstance(one, str) and len(one) > MAX_TEXT_CHARS:
                raise ValueError(f"a prompt is longer than {MAX_TEXT_CHARS} characters")
            if isinstance(one, list) and len(one) > MAX_TEXT_CHARS:
                raise ValueError(f"a prompt is longer than {MAX_TEXT_CHARS} tokens")
        return v

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def token_budget(self) -> int | None:
        return self.max_tokens


# ---- responses -------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "polm"
    root: str | None = None
    parent: str | None = None  # an adapter's base model
    max_model_len: int
    polm: dict[str, Any] = Field(default_factory=dict, description="format, backend, lineage")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(BaseModel):
    """The legacy completions shape (what lm-evaluation-harness reads)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


# ---- errors ----------------------------------------------------------------------------


class APIError(Exception):
    """An error the client sees, OpenAI-shaped: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def validation_error(e) -> APIError:
    """A pydantic ``ValidationError`` as one 400 naming the first offending field."""
    errors = e.errors(include_url=False, include_context=False, include_input=False)
    # a union reports every member that failed: prefer the member whose type matched (a list
    # of five stop strings is "too long", not "not a string")
    err = min(errors, key=lambda x: x["type"].endswith("_type") or x["type"] == "literal_error")
    param = ".".join(str(p) for p in err["loc"] if _is_field(p)) or None
    if err["type"] == "extra_forbidden":
        msg = f"unrecognized request argument supplied: {param}"
    else:
        text = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for our own checks
        msg = f"{param}: {text}" if param else text
    return APIError(400, msg, param=param, code=err["type"])


def _is_field(part) -> bool:
    """Field names and list indices, not the union-member tags pydantic puts in locations
    (``str``, ``constrained-str``, ``list[...]``, ``function-after[...]``)."""
    return isinstance(part, int) or (
        part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict")
    )
