"""Self-refine: generate, critique, revise (Madaan et al., arXiv 2303.17651).

The critique comes from a verifier, as a tool would give it (Gou et al., CRITIC, arXiv
2305.11738): it checks the answer step by step against the question, and names the first wrong
step and what it should be. The model then revises: it continues its own answer from just
before the error, with the named step corrected, so everything after that step is the model's
own work again. Rounds repeat until the critic finds nothing or ``rounds`` is spent.

Critics exist for the built-in tasks:

- ``add``: every scratchpad step ``x+y+c=s`` must use the operands' digits and the carry of the
  step before, with the right two-digit sum; then ``=> total`` must be the sum;
- ``reverse``: the answer is checked letter by letter against the reversed word;
- ``compare``: the one-word answer is checked against the comparison.

``polm eval --self-refine N`` reports accuracy before and after refinement and how many answers
were revised; ``align.rlaif`` can use it to improve the answers it labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from polm.tasks import ADD_DIGITS, Example, get_task


@dataclass(frozen=True)
class Critique:
    message: str  # what is wrong, for people and traces
    prefix: str  # the answer up to and including the corrected element; the model goes on
    complete: bool = False  # the corrected element was the last one: nothing left to write


def _critique_add(ex: Example, answer: str) -> Critique | None:
    a, b = map(int, ex.prompt.split("+"))
    da, db = str(a).zfill(ADD_DIGITS)[::-1], str(b).zfill(ADD_DIGITS)[::-1]
    text = answer.strip()
    head, _, total = text.partition("=>")
    steps = head.split()
    carry, kept = 0, []
    for i, (x, y) in enumerate(zip(da, db)):
        s = int(x) + int(y) + carry
        right = f"{x}+{y}+{carry}={s:02d}"
        got = steps[i] if i < len(steps) else None
        if got != right:
            what = f"is missing; it is {right}" if got is None else f"{got!r} should be {right}"
            return Critique(f"step {i + 1} {what}.", " ".join([*kept, right]) + " ")
        kept.append(right)
        carry = s // 10
    if len(steps) != ADD_DIGITS or total.strip() != str(a + b):
        return Critique(
            f"the digits of the steps give {a + b}, not {total.strip() or 'nothing'}.",
            " ".join(kept) + f" => {a + b}",
            complete=True,
        )
    return None


def _critique_reverse(ex: Example, answer: str) -> Critique | None:
    got, right = answer.strip(), ex.target
    if got == right:
        return None
    i = next((k for k, (g, r) in enumerate(zip(got, right)) if g != r), min(len(got), len(right)))
    if i >= len(right):
        return Critique(f"the answer is too long: {right!r} ends after {i} letters.", right, True)
    return Critique(f"letter {i + 1} should be {right[i]!r}.", right[: i + 1], i + 1 == len(right))


def _critique_compare(ex: Example, answer: str) -> Critique | None:
    if answer.strip() == ex.target:
        return None
    a, b = ex.prompt.split()[1:]
    return Critique(f"{a} is {ex.target} than {b}, not {answer.strip()!r}.", ex.target, True)


CRITICS = {"add": _critique_add, "reverse": _critique_reverse, "compare": _critique_compare}


def critique(task: str, ex: Example, answer: str) -> Critique | None:
    """The verifier's critique of ``answer``, or None when it finds nothing wrong."""
    return CRITICS[task](ex, answer)


@dataclass
class Trace:
    prompt: str
    answers: list[str] = field(default_factory=list)  # the first answer, then each revision
    critiques: list[str] = field(default_factory=list)


def continue_answers(model, tokenizer, prompts: list[str], prefixes: list[str], max_new_tokens):
    """Greedy continuations of assistant answers that start with ``prefixes``."""
    from polm.evaluate import chat_prompt, generate_texts

    texts = [chat_prompt(tokenizer, p) + prefix for p, prefix in zip(prompts, prefixes)]
    rest = generate_texts(model, tokenizer, texts, max_new_tokens, do_sample=False)
    return [prefix + r for prefix, r in zip(prefixes, rest)]


def self_refine(
    model, tokenizer, task: str, examples: list[Example], rounds: int, first: list[str]
) -> list[Trace]:
    """Refine the answers ``first`` to ``examples`` for up to ``rounds`` rounds."""
    from polm.evaluate import MAX_NEW_TOKENS

    traces = [Trace(ex.prompt, [a]) for ex, a in zip(examples, first)]
    for _ in range(rounds):
        todo, critiqued = [], False
        for i, (ex, tr) in enumerate(zip(examples, traces)):
            c = critique(task, ex, tr.answers[-1])
            if c is None:
                continue
            tr.critiques.append(c.message)
            critiqued = True
            if c.complete:
                tr.answers.append(c.prefix)
            else:
                todo.append((i, c.prefix))
        for j in range(0, len(todo), 128):
            chunk = todo[j : j + 128]
            revised = continue_answers(
                model,
                tokenizer,
                [examples[i].prompt for i, _ in chunk],
                [p for _, p in chunk],
                MAX_NEW_TOKENS,
            )
            for (i, _), answer in zip(chunk, revised):
                traces[i].answers.append(answer)
        if not critiqued:
            break
    return traces


def refined_accuracy(model, tokenizer, task: str, n: int | None, rounds: int, trace_file=None):
    """Accuracy on the task's test split before and after ``rounds`` of self-refine."""
    from polm.evaluate import greedy_generate

    t = get_task(task)
    examples = t.examples("test", n)
    first = greedy_generate(model, tokenizer, [e.prompt for e in examples])
    traces = self_refine(model, tokenizer, task, examples, rounds, first)
    if trace_file is not None:
        with open(trace_file, "a") as f:
            for tr in traces:
                f.write(json.dumps({"task": task, **tr.__dict__}) + "\n")
    before = sum(t.score(tr.answers[0], e) for tr, e in zip(traces, examples))
    after = sum(t.score(tr.answers[-1], e) for tr, e in zip(traces, examples))
    return {
        "accuracy": before / len(examples),
        "self_refine_accuracy": after / len(examples),
        "revised": sum(len(tr.answers) > 1 for tr in traces),
        "revisions": sum(len(tr.answers) - 1 for tr in traces),
        "n": len(examples),
    }
