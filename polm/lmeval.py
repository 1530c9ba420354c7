"""lm-evaluation-harness against a served model: polm's built-in tasks as lm-eval tasks, run
through lm-eval's own ``local-completions`` client on an OpenAI-compatible endpoint.

The task data is written by polm to local files (JSON lines and lm-eval task YAMLs, nothing
from a hub): each prompt is rendered with the model's own chat template (the way polm asks it
everywhere else), so that a served polm model is scored on the turns it was trained on.

- ``polm_<task>``: greedy generation (``generate_until``), exact match of the final answer
  (what follows the last ``=>``, as polm's own scorer reads it): the same figure as
  ``polm eval``'s ``eval.<task>.accuracy`` on the same examples;
- ``polm_<task>_choice``, for tasks whose answers come from a closed set (``compare``: less,
  more, same): multiple choice by log-likelihood (the completions endpoint's ``echo`` +
  ``logprobs``), lm-eval's ``acc``.

    polm eval CKPT --endpoint http://127.0.0.1:3000/v1 --task add --task compare

runs both kinds for each task (CKPT gives the tokenizer and chat template, and should be the
served checkpoint). The same tasks run from lm-eval's own command line::

    polm eval CKPT --endpoint URL --task compare --write-tasks DIR   # writes DIR, then runs
    lm_eval --model local-completions --include_path DIR --tasks polm_compare_choice \\
    --model_args model=NAME,base_url=URL/completions,tokenizer=CKPT,tokenizer_backend=huggingface
"""

from __future__ import annotations

import json
from pathlib import Path

from polm.errors import PolmError

# the answers of tasks that are a choice among a few words
CHOICES = {"compare": ["less", "more", "same"]}
# what polm's scorer reads as the answer: the text after the last "=>", else all of it
FINAL_ANSWER = r"^(?:.*=>)?\s*(.*?)\s*$"
MAX_GEN_TOKENS = 64


def write_tasks(out: Path, tokenizer_dir: Path, tasks: list[str], n: int | None) -> list[str]:
    """lm-eval tasks for polm's built-in ``tasks`` in ``out`` (YAML + JSON lines); returns the
    lm-eval task names."""
    from transformers import AutoTokenizer

    from polm.tasks import get_task

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not tok.chat_template:
        raise PolmError(f"{tokenizer_dir} has no chat template: polm's tasks are chat turns")
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for task in tasks:
        rows = []
        for ex in get_task(task).examples("test", n):
            context = tok.apply_chat_template(
                [{"role": "user", "content": ex.prompt}], tokenize=False, add_generation_prompt=True
            )
            row = {"context": context, "target": ex.target}
            if task in CHOICES:
                row["label"] = CHOICES[task].index(ex.target)
            rows.append(row)
        data = out / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        names.append(f"polm_{task}")
        (out / f"polm_{task}.yaml").write_text(_yaml(_generation_task(task, data)))
        if task in CHOICES:
            names.append(f"polm_{task}_choice")
            (out / f"polm_{task}_choice.yaml").write_text(_yaml(_choice_task(task, data)))
    return names


def _common(name: str, data: Path) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "metadata": {"version": 1},
    }


def _generation_task(task: str, data: Path) -> dict:
    return {
        **_common(f"polm_{task}", data),
        "output_type": "generate_until",
        "doc_to_target": "{{target}}",
        "generation_kwargs": {
            "until": ["\n"],
            "max_gen_toks": MAX_GEN_TOKENS,
            "do_sample": False,
            "temperature": 0,
        },
        "filter_list": [
            {
                "name": "final_answer",
                "filter": [
                    {"function": "regex", "regex_pattern": FINAL_ANSWER, "fallback": ""},
                    {"function": "take_first"},
                ],
            }
        ],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }


def _choice_task(task: str, data: Path) -> dict:
    return {
        **_common(f"polm_{task}_choice", data),
        "output_type": "multiple_choice",
        "doc_to_target": "{{label}}",
        "doc_to_choice": CHOICES[task],
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


def _yaml(spec: dict) -> str:
    import yaml

    return yaml.safe_dump(spec, sort_keys=False)


def run_lm_eval(
    endpoint: str,
    tokenizer_dir: Path,
    tasks: list[str],
    n: int | None = None,
    model: str | None = None,
    api_key: str | None = None,
    task_dir: Path | None = None,
) -> dict:
    """Run polm's ``tasks`` through lm-eval's ``local-completions`` on ``endpoint`` (the
    server's ``/v1``); returns ``{lm_eval.<lm-eval task>.<metric>: value}``."""
    import tempfile

    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise PolmError(
            "--endpoint runs lm-evaluation-harness: pip install 'lm-eval>=0.4.13,<0.5'"
        ) from None
    base = endpoint.rstrip("/")
    model = model or _served_model(base, api_key)
    with tempfile.TemporaryDirectory(prefix="polm-lm-eval-") as tmp:
        where = Path(task_dir or tmp)
        names = write_tasks(where, tokenizer_dir, tasks, n)
        args = {
            "model": model,
            "base_url": f"{base}/completions",
            "tokenizer": str(tokenizer_dir),
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "max_length": 100_000,  # the server checks its own context
            "max_retries": 1,
        }
        if api_key:
            args["header"] = {"Authorization": f"Bearer {api_key}"}
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=args,
            tasks=names,
            task_manager=TaskManager(include_path=str(where)),
            batch_size=1,
            log_samples=False,
        )
    out = {}
    for name, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and metric in ("exact_match", "acc", "acc_norm"):
                out[f"lm_eval.{name}.{metric}"] = float(value)
    return out


def _served_model(base: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{base}/models", headers=headers, timeout=30)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise PolmError(f"could not list the models at {base}/models: {e}") from None
