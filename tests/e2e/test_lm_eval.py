"""lm-evaluation-harness (from PyPI, offline: its task data is a file polm writes) against a real
`bentoml serve` of a polm model with an API key: a generation task scores what `polm eval`
scores, and a log-likelihood task (echo + logprobs on /v1/completions) picks the answers the
model's own log-likelihoods pick."""

import json

import pytest

from polm.evaluate import evaluate_checkpoint
from polm.lmeval import CHOICES
from polm.loading import load_model
from polm.tasks import get_task
from tests.helpers import Server, polm_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
N = 24


def _choice_accuracy(ckpt, task: str, n: int) -> float:
    """Multiple choice by the torch model's own log-likelihoods: the share of examples whose
    most likely answer (given the chat-rendered prompt) is the right one."""
    import torch

    model, tok = load_model(ckpt)
    right = 0
    for ex in get_task(task).examples("test", n):
        context = tok.apply_chat_template(
            [{"role": "user", "content": ex.prompt}], tokenize=False, add_generation_prompt=True
        )
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in CHOICES[task]:
            full = tok(context + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([full])).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            scores.append(sum(lp[i - 1, full[i]].item() for i in range(len(ctx), len(full))))
        right += CHOICES[task][scores.index(max(scores))] == ex.target
    return right / n


def test_lm_eval_scores_the_served_model_as_polm_does(add_sft, tmp_path):
    tasks = tmp_path / "tasks"
    server = Server(
        tmp_path, model=add_sft.path, api_key="lm-eval-key", client_api_key="lm-eval-key"
    )
    try:
        proc = _eval(add_sft, server, "lm-eval-key", "--write-tasks", tasks)
        # without the key the server answers 401, and polm says so in one line
        bad = _eval(add_sft, server, "wrong-key")
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout[proc.stdout.index("{") :])
    own = evaluate_checkpoint(add_sft, ["add", "compare"], n=N, with_perplexity=False)
    assert got["lm_eval.polm_add.exact_match"] == pytest.approx(own["eval.add.accuracy"])
    assert got["lm_eval.polm_add.exact_match"] >= 0.5  # the SFT adds: a score, not a zero
    assert got["lm_eval.polm_compare.exact_match"] == pytest.approx(own["eval.compare.accuracy"])
    want = _choice_accuracy(add_sft, "compare", N)
    assert got["lm_eval.polm_compare_choice.acc"] == pytest.approx(want)
    # the tasks lm-eval ran are files polm wrote, there to run again with lm_eval itself
    assert {p.name for p in tasks.iterdir()} >= {
        "add.jsonl",
        "compare.jsonl",
        "polm_add.yaml",
        "polm_compare.yaml",
        "polm_compare_choice.yaml",
    }
    assert bad.returncode == 2 and "401" in bad.stderr and "Traceback" not in bad.stderr


def _eval(ckpt, server, key, *extra):
    import os

    env = {**os.environ, "TQDM_DISABLE": "1", "POLM_API_KEY": key}
    return polm_cli(
        "eval",
        ckpt.path,
        "--endpoint",
        f"{server.url}/v1",
        *("--task", "add", "--task", "compare", "--n", N, "--json", *extra),
        env=env,
    )
