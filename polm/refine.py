"""Self-refine: generate, critique, revise, by the same model (Madaan et al., arXiv 2303.17651).

One conversation, through the model's chat template::

    user: <question>            assistant: <answer>
    user: Check your answer.    assistant: <critique>      ("It is right." ends the loop)
    user: Write the corrected answer.    assistant: <revision>

The critic is the model itself by default (``critic="self"``): it writes the critique. A model
that lacks the skill learns it from ``align.sft`` with ``critique: true`` (its own answers to the
task's training prompts, critiqued by the task's verifier; see :func:`critique_rows`). The
verifier (``critic="verifier"``, a tool's check as in CRITIC, Gou et al., arXiv 2305.11738) says
*where* an answer goes wrong and never what the right answer is: the first wrong scratchpad step
of ``add``, the first wrong letter of ``reverse``, that a ``compare`` answer is wrong.

The revision starts from the model's own answer up to the element the critique names (the
steps before it, which the critique passed) and the model writes the rest: every digit in it
that the model did not write before is the model's.

``polm eval --self-refine N [--critic self|verifier]`` reports accuracy before and after and how
many answers were revised; ``align.rlaif`` refines its second answers the same way
(``refine_rounds``), so that its AI feedback is the model's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Literal

from polm.tasks import ADD_DIGITS, Example, get_task

CHECK = "Check your answer."
REVISE = "Write the corrected answer."
RIGHT = "It is right."
CRITIC_KINDS = ("self", "verifier")
Critic = Literal["self", "verifier"]
CRITIQUE_TOKENS = 16  # the longest critique ("step 3 is missing.") with room to spare


@dataclass(frozen=True)
class Critique:
    message: str  # where the answer is wrong, in words (never the right answer)
    prefix: str  # the model's own answer up to the element the message names


def _steps(answer: str) -> tuple[list[str], str]:
    head, _, total = answer.strip().partition("=>")
    return head.split(), total.strip()


def _critique_add(ex: Example, answer: str) -> Critique | None:
    a, b = map(int, ex.prompt.split("+"))
    da, db = str(a).zfill(ADD_DIGITS)[::-1], str(b).zfill(ADD_DIGITS)[::-1]
    steps, total = _steps(answer)
    carry = 0
    for i, (x, y) in enumerate(zip(da, db)):
        s = int(x) + int(y) + carry
        if i >= len(steps):
            return Critique(f"step {i + 1} is missing.", _prefix(steps, i))
        if steps[i] != f"{x}+{y}+{carry}={s:02d}":
            return Critique(f"step {i + 1} is wrong.", _prefix(steps, i))
        carry = s // 10
    if len(steps) != ADD_DIGITS:
        return Critique("there are too many steps.", _prefix(steps, ADD_DIGITS))
    if total != str(a + b):
        return Critique("the total is wrong.", _prefix(steps, ADD_DIGITS) + "=> ")
    return None


def _prefix(steps: list[str], n: int) -> str:
    return "".join(f"{s} " for s in steps[:n])


def _critique_reverse(ex: Example, answer: str) -> Critique | None:
    got, right = answer.strip(), ex.target
    if got == right:
        return None
    i = next((k for k, (g, r) in enumerate(zip(got, right)) if g != r), min(len(got), len(right)))
    if i >= len(right):
        return Critique("the answer is too long.", "")
    if i >= len(got):
        return Critique("the answer is too short.", got)
    return Critique(f"letter {i + 1} is wrong.", got[:i])


def _critique_compare(ex: Example, answer: str) -> Critique | None:
    if answer.strip() == ex.target:
        return None
    return Critique("the answer is wrong.", "")


CRITICS = {"add": _critique_add, "reverse": _critique_reverse, "compare": _critique_compare}


def critique(task: str, ex: Example, answer: str) -> Critique | None:
    """The verifier's critique of ``answer``, or None when it finds nothing wrong."""
    return CRITICS[task](ex, answer)


def prefix_for(task: str, answer: str, message: str) -> str:
    """The part of ``answer`` a critique ``message`` (the model's own, or the verifier's)
    passed: the steps (``add``) or letters (``reverse``) before the one it names."""
    found = re.search(r"\b(step|letter) (\d+)", message)
    if task == "add":
        steps, _ = _steps(answer)
        if found and found.group(1) == "step":
            return _prefix(steps, int(found.group(2)) - 1)
        if "total" in message:
            return _prefix(steps, ADD_DIGITS) + "=> "
        if "too many steps" in message:
            return _prefix(steps, ADD_DIGITS)
        return ""
    if task == "reverse" and found and found.group(1) == "letter":
        return answer.strip()[: int(found.group(2)) - 1]
    return ""


def is_right(message: str) -> bool:
    return message.strip().lower().startswith(RIGHT.lower().rstrip("."))


def conversation(prompt: str, answer: str, message: str | None = None) -> list[dict]:
    """The chat up to the critique (``message`` None) or up to the revision."""
    chat = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": CHECK},
    ]
    if message is not None:
        chat += [{"role": "assistant", "content": message}, {"role": "user", "content": REVISE}]
    return chat


def critique_rows(task: str, examples: list[Example], answers: list[str]) -> list[dict]:
    """Training rows (TRL's conversational prompt/completion) that teach the critique and the
    revision: for each of the model's own ``answers``, the verifier's critique (or that it is
    right); where it is wrong, the reference answer as the revision. Made from the task's
    scorer, at training time only."""
    rows = []
    for ex, answer in zip(examples, answers):
        answer = answer.strip()
        c = critique(task, ex, answer)
        message = RIGHT if c is None else c.message
        rows.append(
            {
                "prompt": conversation(ex.prompt, answer),
                "completion": [{"role": "assistant", "content": message}],
            }
        )
        if c is not None:
            rows.append(
                {
                    "prompt": conversation(ex.prompt, answer, message),
                    "completion": [{"role": "assistant", "content": ex.answer}],
                }
            )
    return rows


@dataclass
class Trace:
    prompt: str
    answers: list[str] = field(default_factory=list)  # the first answer, then each revision
    critiques: list[str] = field(default_factory=list)


def _render(tokenizer, chat: list[dict]) -> str:
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def _generate(model, tokenizer, texts: list[str], max_new_tokens: int) -> list[str]:
    from polm.evaluate import generate_texts

    out = []
    for j in range(0, len(texts), 128):
        out += generate_texts(model, tokenizer, texts[j : j + 128], max_new_tokens, do_sample=False)
    return out


def self_critiques(model, tokenizer, prompts: list[str], answers: list[str]) -> list[str]:
    """The model's own critiques of its ``answers`` (greedy)."""
    texts = [_render(tokenizer, conversation(p, a.strip())) for p, a in zip(prompts, answers)]
    return [c.strip() for c in _generate(model, tokenizer, texts, CRITIQUE_TOKENS)]


def self_refine(
    model,
    tokenizer,
    task: str,
    examples: list[Example],
    rounds: int,
    first: list[str],
    critic: Critic = "self",
) -> list[Trace]:
    """Refine the answers ``first`` to ``examples`` for up to ``rounds`` rounds: critique
    (by the model itself, or the task's verifier), then the model's revision from the part the
    critique passed."""
    from polm.evaluate import MAX_NEW_TOKENS

    if critic not in CRITIC_KINDS:
        raise ValueError(f"critic must be one of {CRITIC_KINDS}, not {critic!r}")
    traces = [Trace(ex.prompt, [a]) for ex, a in zip(examples, first)]
    open_ = list(range(len(traces)))  # still being refined
    for _ in range(rounds):
        answers = [traces[i].answers[-1].strip() for i in open_]
        if critic == "self":
            messages = self_critiques(
                model, tokenizer, [examples[i].prompt for i in open_], answers
            )
        else:
            found = [critique(task, examples[i], a) for i, a in zip(open_, answers)]
            messages = [RIGHT if c is None else c.message for c in found]
        todo = []
        for i, answer, message in zip(open_, answers, messages):
            traces[i].critiques.append(message)
            if not is_right(message):
                todo.append((i, answer, message, prefix_for(task, answer, message)))
        if not todo:
            break
        texts = [
            _render(tokenizer, conversation(examples[i].prompt, answer, message)) + prefix
            for i, answer, message, prefix in todo
        ]
        revised = _generate(model, tokenizer, texts, MAX_NEW_TOKENS)
        for (i, _, _, prefix), rest in zip(todo, revised):
            traces[i].answers.append(prefix + rest)
        open_ = [i for i, *_ in todo]
    return traces


def refined_accuracy(
    model,
    tokenizer,
    task: str,
    n: int | None,
    rounds: int,
    trace_file=None,
    critic: Critic = "self",
    first: list[str] | None = None,
):
    """Accuracy on the task's test split before and after ``rounds`` of self-refine, from the
    model's greedy answers (or ``first``, when the caller has them)."""
    from polm.evaluate import greedy_generate

    t = get_task(task)
    examples = t.examples("test", n)
    if first is None:
        first = greedy_generate(model, tokenizer, [e.prompt for e in examples])
    traces = self_refine(model, tokenizer, task, examples, rounds, first, critic)
    if trace_file is not None:
        with open(trace_file, "a") as f:
            for tr in traces:
                f.write(json.dumps({"task": task, "critic": critic, **tr.__dict__}) + "\n")
    before = sum(t.score(tr.answers[0], e) for tr, e in zip(traces, examples))
    after = sum(t.score(tr.answers[-1], e) for tr, e in zip(traces, examples))
    # the critic's verdicts on the first answers, against the scorer's
    said_right = [is_right(tr.critiques[0]) if tr.critiques else True for tr in traces]
    was_right = [bool(t.score(tr.answers[0], e)) for tr, e in zip(traces, examples)]
    return {
        "accuracy": before / len(examples),
        "self_refine_accuracy": after / len(examples),
        "revised": sum(len(tr.answers) > 1 for tr in traces),
        "revisions": sum(len(tr.answers) - 1 for tr in traces),
        "critic_agreement": sum(s == w for s, w in zip(said_right, was_right)) / len(examples),
        "n": len(examples),
    }


def refine_metrics(ckpt, tasks, n, rounds, trace=None, critic="self") -> dict:
    """``eval.<task>.refine_<critic>.accuracy`` (and ``.rounds``, ``.revised``,
    ``.critic_agreement``: how often the critic's verdict on the first answer matched the
    scorer's) for each critic asked for (``both``: the model's own and the verifier, side by
    side), after ``rounds`` of self-refine on the first ``n`` test examples."""
    from pathlib import Path

    from polm.errors import PolmError
    from polm.evaluate import greedy_generate
    from polm.loading import TORCH_FORMATS, is_reward_model, load_model

    if ckpt.format not in TORCH_FORMATS or is_reward_model(ckpt):
        raise PolmError(
            f"self-refine runs a language model polm loads with torch ({', '.join(TORCH_FORMATS)}"
            f"); {ckpt.path} is a {'reward model' if ckpt.format == 'hf' else ckpt.format}."
        )
    missing = [t for t in tasks if t not in CRITICS]
    if missing:
        raise PolmError(f"no self-refine critic for task(s) {', '.join(missing)}.")
    model, tokenizer = load_model(ckpt)
    if trace:
        Path(trace).write_text("")
    out = {}
    for task in tasks:
        prompts = [e.prompt for e in get_task(task).examples("test", n)]
        first = greedy_generate(model, tokenizer, prompts)  # one set for every critic
        for c in CRITIC_KINDS if critic == "both" else (critic,):
            r = refined_accuracy(model, tokenizer, task, n, rounds, trace, c, first)
            key = f"eval.{task}.refine_{c}"
            out[f"{key}.accuracy"] = r["self_refine_accuracy"]
            out[f"{key}.rounds"] = rounds
            out[f"{key}.revised"] = r["revised"]
            out[f"{key}.critic_agreement"] = r["critic_agreement"]
    return out
