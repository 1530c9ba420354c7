"""Tool calls in the format chat templates write them, and back to OpenAI's ``tool_calls``.

polm reads the Hermes format (Hermes 2 Pro, Qwen 2.5 and 3, polm's built-in template; what
vLLM's ``hermes`` parser reads)::

    <tool_call>
    {"name": "add", "arguments": {"a": 57, "b": 468}}
    </tool_call>

A model's template is taken to write it when it mentions ``<tool_call>``; a request with tools
for a model whose template does not is a 400 (its calls could not be read back).

- :func:`parse` splits a finished answer into its text and its calls (a block whose JSON does
  not parse as a call stays text);
- :class:`CallStream` streams the text before the first ``<tool_call>`` as it comes and holds
  the rest back for :func:`parse` at the end (what could still become ``<tool_call>`` is held
  back too, as stop strings are);
- :func:`call_grammar` is the grammar (llguidance's Lark with ``%json``) that makes the answer
  one call of the named tool, or of any of them: ``tool_choice`` ``required`` or named.
"""

from __future__ import annotations

import json
import re
import uuid

from serve.grammar import JSON_STYLE

OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def template_writes_calls(template: str | None) -> bool:
    return bool(template) and OPEN in template


def parse(text: str) -> tuple[str | None, list[dict]]:
    """The answer's text (None when empty) and its calls as OpenAI ``tool_calls``."""
    calls, kept, last = [], [], 0
    for m in BLOCK.finditer(text):
        call = _call(m.group(1))
        if call is None:
            continue
        kept.append(text[last : m.start()])
        last = m.end()
        calls.append(call)
    kept.append(text[last:])
    rest = "".join(kept).strip()
    return (rest or None), calls


def _call(body: str) -> dict | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {
            "name": obj["name"],
            "arguments": args if isinstance(args, str) else json.dumps(args),
        },
    }


class CallStream:
    """Streamed text up to the first ``<tool_call>``; everything from there on is held."""

    def __init__(self):
        self.text, self.sent, self.calling = "", 0, False

    def push(self, piece: str) -> str:
        """The text that can be shown now."""
        self.text += piece
        if self.calling:
            return ""
        at = self.text.find(OPEN, max(0, self.sent - len(OPEN)))
        if at != -1:
            self.calling = True
            return self._take(at)
        hold = max((k for k in range(1, len(OPEN)) if self.text.endswith(OPEN[:k])), default=0)
        return self._take(len(self.text) - hold)

    def _take(self, end: int) -> str:
        new = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return new

    def finish(self) -> tuple[str, list[dict]]:
        """At the end: the text not shown yet (outside the calls), and the calls."""
        content, calls = parse(self.text[self.sent :])
        if not calls:  # no call after all: the rest is text
            return self._take(len(self.text)), []
        return content or "", calls


def call_grammar(tools: list[dict], name: str | None = None) -> str:
    """Lark for llguidance: one Hermes call of the tool ``name`` (or of any of ``tools``), its
    arguments valid under that tool's parameter schema."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    alts = []
    for i, f in enumerate(chosen):
        schema = {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "arguments": f.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
            "x-guidance": JSON_STYLE,
        }
        alts.append(f"call{i}: %json {json.dumps(schema)}")
    rules = "\n".join(alts)
    body = " | ".join(f"call{i}" for i in range(len(chosen)))
    return f'start: "<tool_call>\\n" ({body}) "\\n</tool_call>"\n{rules}\n'
