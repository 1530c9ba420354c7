"""Structured outputs: OpenAI's ``response_format`` (``json_object``, ``json_schema``) as a JSON
schema that constrains decoding, token by token, through llguidance (guidance-ai's grammar
engine, the one vLLM, SGLang and llama.cpp use): at every step the tokens that cannot continue
a valid document are masked out before sampling, so the answer parses and validates whenever it
ends by itself (``finish_reason: "stop"``; a ``max_tokens`` cut can still end it early, as in
vLLM).

Each token backend builds one :class:`Guide` from its own tokenizer (the Hugging Face fast
tokenizer's JSON for transformers and onnxruntime-genai, llama.cpp's vocabulary for gguf),
lazily, the first time a request asks for a format; each request gets its own matcher.
"""

from __future__ import annotations

import json
import threading
from typing import Any

# JSON as json.dumps writes it: one space after ',' and ':', no other whitespace. llguidance's
# default lets any whitespace go between tokens, and a small model then pads forever (measured
# on tiny-base: '{' and 60 tokens of newlines, on every backend); a schema's "x-guidance"
# options override these.
JSON_STYLE: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


def grammar(schema: dict) -> str:
    """llguidance's grammar for JSON valid under ``schema`` (ValueError if it is not JSON)."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_STYLE)


def compile_constraint(constraint: tuple[str, object]) -> str:
    """llguidance's grammar for ``("json_schema", schema)`` or ``("lark", text)``."""
    kind, value = constraint
    if kind == "json_schema":
        return grammar(value)
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_lark(value)


def check_constraint(constraint: tuple[str, object]) -> str | None:
    """Why ``constraint`` cannot constrain decoding (llguidance's message), or None."""
    from llguidance import LLMatcher

    try:
        g = compile_constraint(constraint)
    except ValueError as e:
        return str(e)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(g)
    return messages[0] if is_error else None


class Guide:
    """The llguidance tokenizer of one backend (built once: about a second for a large
    vocabulary) and a matcher per request."""

    def __init__(self, make_tokenizer):
        self._make, self._tok, self._lock = make_tokenizer, None, threading.Lock()

    def tokenizer(self):
        with self._lock:
            if self._tok is None:
                self._tok = self._make()
            return self._tok

    def matcher(self, constraint: tuple[str, object]) -> Matcher:
        from llguidance import LLMatcher

        tok = self.tokenizer()
        m = LLMatcher(tok, compile_constraint(constraint), log_level=0)
        if m.is_error():
            raise ValueError(f"the grammar cannot constrain decoding: {m.get_error()}")
        return Matcher(m, tok.vocab_size)


class Matcher:
    """One request's grammar state: the mask over the next token, then the token it took."""

    def __init__(self, m, vocab_size: int):
        self.m, self.vocab_size = m, vocab_size

    def mask(self, z) -> None:
        """Set the logits of tokens the grammar does not allow next to -inf, in place."""
        import numpy as np

        bits = np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)
        n = min(len(z), len(allowed))
        z[:n][~allowed[:n]] = -np.inf
        z[n:] = -np.inf

    def take(self, token: int) -> None:
        self.m.consume_token(token)


def hf_tokenizer_json(tokenizer) -> str:
    """A transformers fast tokenizer as the tokenizers-library JSON llguidance reads."""
    from copy import copy

    backend = copy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    return backend.to_str()
