"""RL from AI feedback: a judge model labels pairs sampled from the policy; DPO trains on them.

Following RLAIF (Bai et al., Constitutional AI, arXiv 2212.08073; Lee et al., arXiv 2309.00267)
with DPO in place of a reward model plus PPO:

1. sample two answers per prompt from the policy (``temperature``); identical pairs are dropped;
2. optionally improve the second answer with self-refine (``refine_rounds``; the policy
   critiques its own answer by default, ``refine_critic: verifier`` has the task's verifier say
   where it is wrong; see ``polm.refine``), so "chosen" candidates get better than the policy's;
3. the judge labels each pair. The judge is the second input, or the policy itself when none is
   given (self-rewarding, Yuan et al., arXiv 2401.10020):

   - ``reward``: a reward-model checkpoint (``align.reward``) scores each answer;
   - ``likelihood``: a causal LM prefers the answer it finds more probable (summed log-prob);
   - ``prompt``: a causal LM is asked which answer is correct, "A" or "B", in both orders (to
     cancel position bias); its preference is the mean log-odds of the two letters;

4. pairs whose judge margin is at most ``min_margin`` are dropped; the rest are written next to
   the checkpoint (``rlaif_pairs.jsonl``, TRL's preference format plus the judge's margin and the
   ground truth) and DPO (any ``align.dpo`` loss) trains the policy on them.

For built-in tasks the manifest records the judge's agreement with the task's scorer on the pairs
where exactly one answer is right (``rlaif.judge_agreement``), and how many such pairs there were.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from align.dpo import DPOSettings, build_trainer
from polm.checkpoint import Checkpoint
from polm.errors import PolmError
from polm.stage import load_prompts, require_policy
from polm.training import save_trained, scratch_dir, train

STAGE = "align.rlaif"
PAIRS_FILE = "rlaif_pairs.jsonl"
JUDGE_PROMPT = (
    "Question: {question}\nAnswer A: {a}\nAnswer B: {b}\n"
    "Which answer is correct? Reply with A or B."
)


class RLAIFSettings(DPOSettings):
    """Settings of ``align.rlaif``: sampling and judging, then DPO's own settings."""

    n_train: int | None = Field(
        default=1024, gt=0, description="Prompts to sample and label (per task)."
    )
    temperature: float = Field(default=0.7, gt=0, description="Sampling temperature.")
    max_completion_length: int = Field(default=48, gt=0, description="Tokens per answer.")
    judge_mode: Literal["auto", "reward", "likelihood", "prompt"] = Field(
        default="auto",
        description="How the judge labels pairs (auto: reward for a reward model, else "
        "likelihood).",
    )
    min_margin: float = Field(
        default=0.0, ge=0, description="Drop pairs the judge separates by this much or less."
    )
    refine_rounds: int = Field(
        default=1,
        ge=0,
        description="Self-refine rounds applied to the second answer (tasks with a critic; "
        "0 turns it off). It turns more pairs into right-versus-wrong ones.",
    )
    refine_critic: Literal["self", "verifier"] = Field(
        default="self",
        description="Who critiques in self-refine: the policy itself, or the task's verifier "
        "(where the answer is wrong, never the right answer).",
    )
    sft_weight: float = Field(
        default=1.0,
        ge=0,
        description="Weight of the SFT term on the chosen answers (see align.dpo); without it "
        "DPO on the policy's own samples lowered accuracy (20.5% -> 14.5% on add).",
    )


class Judge:
    """Scores each answer of a pair; the pair's margin is score(a) - score(b)."""

    def __init__(self, ckpt: Checkpoint, mode: str):
        from polm.loading import is_reward_model, load_model, load_reward_model

        rm = is_reward_model(ckpt)
        self.mode = ("reward" if rm else "likelihood") if mode == "auto" else mode
        if (self.mode == "reward") != rm:
            kind = "a reward model" if rm else "a causal LM"
            raise PolmError(f"{STAGE}: judge_mode {self.mode!r} does not fit {ckpt.path} ({kind}).")
        self.model, self.tokenizer = (load_reward_model if rm else load_model)(ckpt)

    def margins(self, questions: list[str], a: list[str], b: list[str]) -> list[float]:
        from polm.evaluate import completion_logprobs, reward_scores

        if self.mode == "prompt":
            return self._prompted(questions, a, b)
        rows = [
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": x}],
                "rejected": [{"role": "assistant", "content": y}],
            }
            for q, x, y in zip(questions, a, b)
        ]
        fn = reward_scores if self.mode == "reward" else completion_logprobs
        scores = fn(self.model, self.tokenizer, rows)
        return [x - y for x, y in zip(scores[0::2], scores[1::2])]

    def _letter_logodds(self, questions, first, second) -> list[float]:
        """log p("A") - log p("B") as the judge's first answer token, batched."""
        import torch

        tok = self.tokenizer
        ids = [tok.encode(letter, add_special_tokens=False)[0] for letter in ("A", "B")]
        tok.padding_side = "left"
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": JUDGE_PROMPT.format(question=q, a=x, b=y)}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for q, x, y in zip(questions, first, second)
        ]
        out = []
        for i in range(0, len(texts), 64):
            enc = tok(
                texts[i : i + 64], return_tensors="pt", padding=True, add_special_tokens=False
            )
            with torch.no_grad():
                logits = self.model(**enc).logits[:, -1].float().log_softmax(-1)
            out += (logits[:, ids[0]] - logits[:, ids[1]]).tolist()
        return out

    def _prompted(self, questions, a, b) -> list[float]:
        ab = self._letter_logodds(questions, a, b)  # > 0: prefers a
        ba = self._letter_logodds(questions, b, a)  # > 0: prefers b
        return [(x - y) / 2 for x, y in zip(ab, ba)]


def label_pairs(policy, tokenizer, judge: Judge, s: RLAIFSettings) -> tuple[list[dict], dict]:
    """Sample, optionally refine, judge; return the preference rows and the judge's stats."""
    import torch

    from polm.evaluate import sample_generate
    from polm.refine import CRITICS, self_refine
    from polm.tasks import get_task

    prompts = load_prompts(s.task, s.dataset, "train", s.n_train)
    torch.manual_seed(s.seed)
    samples = sample_generate(
        policy,
        tokenizer,
        [p.text for p in prompts],
        2,
        s.temperature,
        max_new_tokens=s.max_completion_length,
    )
    first = [x[0] for x in samples]
    second = [x[1] for x in samples]
    if s.refine_rounds:
        for task in {p.task for p in prompts if p.task in CRITICS}:
            idx = [i for i, p in enumerate(prompts) if p.task == task]
            traces = self_refine(
                policy,
                tokenizer,
                task,
                [prompts[i].example for i in idx],
                s.refine_rounds,
                [second[i] for i in idx],
                s.refine_critic,
            )
            for i, tr in zip(idx, traces):
                second[i] = tr.answers[-1]
    keep = [i for i in range(len(prompts)) if first[i].strip() != second[i].strip()]
    margins = judge.margins(
        [prompts[i].text for i in keep], [first[i] for i in keep], [second[i] for i in keep]
    )
    rows, decisive, agree = [], 0, 0
    for i, m in zip(keep, margins):
        if abs(m) <= s.min_margin:
            continue
        q, task, ex = prompts[i].text, prompts[i].task, prompts[i].example
        chosen, rejected = (first[i], second[i]) if m > 0 else (second[i], first[i])
        row = {
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "judge_margin": abs(m),
        }
        if ex is not None:
            t = get_task(task)
            good_c, good_r = t.score(chosen, ex), t.score(rejected, ex)
            row |= {"chosen_correct": bool(good_c), "rejected_correct": bool(good_r)}
            if good_c != good_r:
                decisive += 1
                agree += good_c > good_r
        rows.append(row)
    stats = {
        "rlaif.prompts": len(prompts),
        "rlaif.distinct_pairs": len(keep),
        "rlaif.pairs": len(rows),
        "rlaif.judge_mode": judge.mode,
    }
    if decisive:
        stats |= {"rlaif.decisive_pairs": decisive, "rlaif.judge_agreement": agree / decisive}
    return rows, stats


def run(inputs: list[Checkpoint], settings: RLAIFSettings, out: Path) -> Checkpoint | None:
    from datasets import Dataset

    from polm.loading import load_model

    s = settings
    if len(inputs) not in (1, 2):
        raise PolmError(f"{STAGE} takes a policy and optionally a judge, got {len(inputs)}.")
    for ckpt in inputs:
        ckpt.require_format("hf", stage=STAGE)
    policy_ckpt, judge_ckpt = inputs[0], inputs[-1]
    require_policy(policy_ckpt, STAGE)
    model, tokenizer = load_model(policy_ckpt)
    judge = Judge(judge_ckpt, s.judge_mode)
    rows, stats = label_pairs(model, tokenizer, judge, s)
    if not rows:
        raise PolmError(
            f"{STAGE}: the judge labelled no pairs (all samples identical, or no margin above "
            f"min_margin={s.min_margin}); raise temperature or n_train."
        )
    del judge
    train_rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    dataset = Dataset.from_list(train_rows).shuffle(seed=s.seed)
    trainer = build_trainer(s, model, tokenizer, dataset, scratch_dir(out, s, inputs))
    metrics = train(trainer) | stats
    pairs = "".join(json.dumps(r) + "\n" for r in rows)
    return save_trained(
        trainer,
        tokenizer,
        out,
        stage=STAGE,
        settings=s,
        parents=list(inputs),
        metrics=metrics,
        extra_files={PAIRS_FILE: pairs},
    )
