"""Synthetic tasks with verifiable answers, rendered in TRL's dataset formats.

Every task has fixed ``train`` and ``test`` splits (disjoint, generated from a fixed seed, so
everyone sees the same examples), a scorer, and renderings as TRL expects them:
``messages`` (conversational language modeling), ``prompt``/``completion`` (conversational
prompt-completion) and ``prompt`` + ``answer`` (for reward functions, as in GRPO).

``add`` answers with a per-digit scratchpad, least significant digit first, each step
written as ``a+b+carry=two-digit sum``, then ``=> sum``::

    user:      57+468
    assistant: 7+8+0=15 5+6+1=12 0+4+1=05 => 525

Natural-format multi-digit addition is slow for small transformers to learn and plateaus on
operands of different lengths; a scratchpad makes every step local (Nye et al., "Show Your
Work", arXiv 2112.00114). The scorer checks only the final answer after ``=>``, as GSM8K
scorers check the text after ``####``.

``reverse`` reverses a lowercase word (the base model is pretrained on it); ``compare`` says
whether the first of two numbers is ``more``, ``less`` or the ``same`` as the second (the base
model never saw it: with ``add``, a pair of skills the base lacks, for merging experts).

``tool`` teaches tool calling: given an ``add(a, b)`` tool, ``sum 57 468`` is answered with a
call, the tool's result with the sum (the chat template writes both turns)::

    system:    <tools> add(a: integer, b: integer) # ... </tools>
    user:      sum 57 468
    assistant: <tool_call>\n{"name": "add", "arguments": {"a": 57, "b": 468}}\n</tool_call>
    tool:      525
    assistant: => 525

It is scored on the call (the same tool and arguments); its training conversations also carry
the tool's result and the answer after it.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from polm.errors import PolmError

SPLIT_SEEDS = {"train": 1, "test": 2}
TRAIN_SIZE = 20_000
TEST_SIZE = 500


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # the reference completion
    target: str  # what the scorer compares against
    tools: tuple = ()  # OpenAI tool definitions the prompt is asked with
    followup: tuple = ()  # messages after the answer in training conversations (tool results)


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    sample: Callable[[random.Random], Example]
    extract: Callable[[str], str]
    tools: tuple = ()  # the tools every prompt of the task is asked with

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        """The task's fixed split (``train`` or ``test``), optionally its first ``n`` examples."""
        if split not in SPLIT_SEEDS:
            raise PolmError(f"unknown split {split!r} of task {self.name!r}; use 'train' or 'test'")
        data = _split(self.name, split)
        return list(data if n is None else data[:n])

    def score(self, completion: str, example: Example) -> float:
        """1.0 when the completion's final answer equals the reference, else 0.0."""
        return float(self.extract(completion) == example.target)


# --- add -----------------------------------------------------------------------------------

ADD_DIGITS = 3


def _number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def add_scratchpad(a: int, b: int, width: int = ADD_DIGITS) -> str:
    da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    carry, steps = 0, []
    for x, y in zip(da, db):
        s = int(x) + int(y) + carry
        steps.append(f"{x}+{y}+{carry}={s:02d}")
        carry = s // 10
    return " ".join(steps) + f" => {a + b}"


def _sample_add(rng: random.Random) -> Example:
    a, b = _number(rng, ADD_DIGITS), _number(rng, ADD_DIGITS)
    return Example(prompt=f"{a}+{b}", answer=add_scratchpad(a, b), target=str(a + b))


def _final_answer(completion: str) -> str:
    return completion.rsplit("=>", 1)[-1].strip() if "=>" in completion else completion.strip()


# --- reverse -------------------------------------------------------------------------------


def _sample_reverse(rng: random.Random) -> Example:
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8)))
    return Example(prompt=f"reverse {word}", answer=word[::-1], target=word[::-1])


# --- compare -------------------------------------------------------------------------------


def _sample_compare(rng: random.Random) -> Example:
    a, b = _number(rng, ADD_DIGITS), _number(rng, ADD_DIGITS)
    word = "more" if a > b else "less" if a < b else "same"
    return Example(prompt=f"compare {a} {b}", answer=word, target=word)


# --- tool ----------------------------------------------------------------------------------

ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "the sum of a and b",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


def tool_call_text(name: str, arguments: dict) -> str:
    """A call as the built-in chat template writes it."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def _sample_tool(rng: random.Random) -> Example:
    a, b = _number(rng, ADD_DIGITS), _number(rng, ADD_DIGITS)
    call = {"name": "add", "arguments": {"a": a, "b": b}}
    return Example(
        prompt=f"sum {a} {b}",
        answer=tool_call_text("add", call["arguments"]),
        target=json.dumps(call, sort_keys=True),
        tools=(ADD_TOOL,),
        followup=(
            {"role": "tool", "content": str(a + b)},
            {"role": "assistant", "content": f"=> {a + b}"},
        ),
    )


def _first_call(completion: str) -> str:
    """The first ``<tool_call>`` in a completion as canonical JSON ('' if none parses)."""
    m = TOOL_CALL.search(completion)
    try:
        return json.dumps(json.loads(m.group(1)), sort_keys=True) if m else ""
    except ValueError:
        return ""


TASKS: dict[str, Task] = {
    "add": Task(
        "add",
        "integer addition, operands up to 3 digits, per-digit scratchpad answer",
        _sample_add,
        _final_answer,
    ),
    "reverse": Task(
        "reverse", "reverse a lowercase word of 3-8 letters", _sample_reverse, str.strip
    ),
    "compare": Task(
        "compare",
        "is the first number more than, less than or the same as the second (up to 3 digits)",
        _sample_compare,
        str.strip,
    ),
    "tool": Task(
        "tool",
        "call the add(a, b) tool for 'sum a b' (up to 3 digits), then answer with its result",
        _sample_tool,
        _first_call,
        tools=(ADD_TOOL,),
    ),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise PolmError(
            f"unknown task {name!r}; the built-in tasks are: {', '.join(sorted(TASKS))}"
        ) from None


def validate_task_names(value: str | list[str] | None) -> str | list[str] | None:
    """For settings validators: unknown task names are a ValueError naming the known ones."""
    for name in [value] if isinstance(value, str) else value or []:
        if name not in TASKS:
            raise ValueError(
                f"unknown task {name!r}; the built-in tasks are: {', '.join(sorted(TASKS))}"
            )
    return value


@cache
def _split(name: str, split: str) -> tuple[Example, ...]:
    """Sample both splits together so that no test prompt appears in train."""
    task = TASKS[name]
    rng = random.Random(f"polm-task-{name}")
    seen: set[str] = set()
    out: dict[str, list[Example]] = {"test": [], "train": []}
    for part, size in (("test", TEST_SIZE), ("train", TRAIN_SIZE)):
        tries = 0
        while len(out[part]) < size and tries < size * 50:
            tries += 1
            ex = task.sample(rng)
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                out[part].append(ex)
    return tuple(out[split])


# --- renderings in TRL's formats -----------------------------------------------------------


def _with_tools(row: dict, ex: Example) -> dict:
    """A task with tools adds TRL's ``tools`` column (the chat template renders them)."""
    return {**row, "tools": list(ex.tools)} if ex.tools else row


def to_messages(ex: Example) -> dict:
    """TRL conversational language-modeling format."""
    messages = [
        {"role": "user", "content": ex.prompt},
        {"role": "assistant", "content": ex.answer},
        *ex.followup,
    ]
    return _with_tools({"messages": messages}, ex)


def to_prompt_completion(ex: Example) -> dict:
    """TRL conversational prompt-completion format."""
    completion = [{"role": "assistant", "content": ex.answer}, *ex.followup]
    return _with_tools(
        {"prompt": [{"role": "user", "content": ex.prompt}], "completion": completion}, ex
    )


def to_prompt_only(ex: Example) -> dict:
    """TRL prompt-only format plus the reference answer, for reward functions (GRPO)."""
    return _with_tools(
        {"prompt": [{"role": "user", "content": ex.prompt}], "answer": ex.target}, ex
    )


RENDERINGS = {
    "messages": to_messages,
    "prompt_completion": to_prompt_completion,
    "prompt_only": to_prompt_only,
}


def render(task: str, split: str, fmt: str = "messages", n: int | None = None) -> list[dict]:
    """A built-in task split rendered in one of TRL's formats (see ``RENDERINGS``)."""
    if fmt not in RENDERINGS:
        raise PolmError(f"unknown dataset format {fmt!r}; choose one of {sorted(RENDERINGS)}")
    return [RENDERINGS[fmt](ex) for ex in get_task(task).examples(split, n)]
