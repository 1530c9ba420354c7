"""RLHF with PPO: a policy with a value head, trained against a reward model or a verifier.

TRL 1.16 no longer ships PPO, so this is polm's own, in one file, read top to bottom:

1. **Rollout.** Sample a completion for each prompt of a batch at ``temperature``; take the
   log-probabilities of the sampled tokens under the policy and under the frozen reference
   (the starting checkpoint), and the value head's estimates, all at the sampling temperature.
2. **Reward.** Score each completion: a reward model (``align.reward``, given as a second input)
   or the task's verifier (1 for an exactly right final answer). The per-token reward is the
   KL penalty ``-kl_coef * (log pi(a_t) - log pi_ref(a_t))``, plus the score on the last token
   (Ziegler et al., arXiv 1909.08593; InstructGPT, Ouyang et al., arXiv 2203.02155).
3. **Advantages.** Generalized advantage estimation over the completion tokens (Schulman et al.,
   arXiv 1506.02438), whitened over the batch; returns are advantages plus values.
4. **Update.** ``num_ppo_epochs`` passes over the batch in ``num_mini_batches`` minibatches of the
   clipped surrogate loss (Schulman et al., arXiv 1707.06347) plus ``vf_coef`` times the clipped
   value loss.
5. **KL control.** ``kl_coef`` is fixed, or adapted after each batch so the sequence KL to the
   reference tracks ``kl_target`` (Ziegler et al.'s proportional controller).

Implementation details follow Huang et al., "The N+ Implementation Details of RLHF with PPO"
(arXiv 2403.17031): log-probabilities at the sampling temperature, position ids that skip left
padding, no loss past the end-of-sequence token, an optional penalty for completions that never
end. The value head shares the policy's trunk and is dropped when the checkpoint is written (it
only serves training); the output is a plain ``hf`` causal LM.

Before and after training the stage samples completions for held-out prompts (the task's test
split) and records their mean reward and their KL to the reference in the manifest.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator

from polm import progress
from polm.checkpoint import Checkpoint, staging
from polm.errors import PolmError
from polm.precision import Bf16
from polm.stage import DataSettings, Prompt, left_padded_positions, load_prompts, policy_and_reward
from polm.training import TRAIN_LOG, short_sequences_attend_in_math

STAGE = "align.ppo"


class PPOSettings(DataSettings):
    """Settings of ``align.ppo``; names follow TRL's former PPOConfig."""

    max_steps: int = Field(
        default=100, description="PPO iterations (one rollout batch and its updates each)."
    )
    per_device_train_batch_size: int = Field(
        default=32,
        gt=0,
        description="Prompts per rollout batch.",
        validation_alias=AliasChoices("per_device_train_batch_size", "batch_size"),
    )
    num_mini_batches: int = Field(default=2, gt=0, description="Minibatches per PPO epoch.")
    num_ppo_epochs: int = Field(default=2, gt=0, description="Passes over each rollout batch.")
    learning_rate: float = Field(default=3e-5, gt=0, description="Peak learning rate.")
    lr_scheduler_type: str = Field(default="constant", description="transformers scheduler name.")
    warmup_steps: float = Field(default=0.0, ge=0, description="Warm-up steps or fraction.")
    bf16: Bf16 = Field(
        default=False,
        description="bf16 autocast (true, false or auto). Off by default on every machine: "
        "PPO's probability ratios compare two forward passes, and bf16 rounding alone moves "
        "them.",
    )
    response_length: int = Field(
        default=48,
        gt=0,
        description="Tokens sampled per completion.",
        validation_alias=AliasChoices("response_length", "max_completion_length"),
    )
    temperature: float = Field(default=0.7, gt=0, description="Sampling temperature.")
    reward: Literal["auto", "model", "verifier"] = Field(
        default="auto",
        description="Score with the reward model (second input) or the task's verifier; auto: "
        "the reward model when one is given.",
    )
    gamma: float = Field(default=1.0, ge=0, le=1, description="Discount factor.")
    lam: float = Field(default=0.95, ge=0, le=1, description="GAE lambda.")
    cliprange: float = Field(default=0.2, gt=0, description="Clip range of the policy ratio.")
    cliprange_value: float = Field(default=0.2, gt=0, description="Clip range of the value.")
    vf_coef: float = Field(default=0.1, ge=0, description="Weight of the value loss.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
    kl_coef: float = Field(
        default=0.5,
        ge=0,
        description="KL penalty coefficient (the initial one when adaptive). Reward-model "
        "scores span a few units; at 0.05 a tiny policy drifted to KL 10 in 60 steps.",
        validation_alias=AliasChoices("kl_coef", "init_kl_coef"),
    )
    adap_kl_ctrl: bool = Field(
        default=True, description="Adapt kl_coef toward kl_target (False: fixed kl_coef)."
    )
    kl_target: float = Field(
        default=2.0,
        gt=0,
        description="Target KL to the reference, in nats per completion.",
        validation_alias=AliasChoices("kl_target", "target"),
    )
    kl_horizon: int = Field(
        default=100,
        gt=0,
        description="Samples over which the adaptive controller closes the gap: each batch "
        "moves kl_coef by at most 20% x batch / horizon (TRL used 10000 for runs of 100k+ "
        "samples; at 320 a 120-step run lagged to KL 3.1 against a target of 2).",
        validation_alias=AliasChoices("kl_horizon", "horizon"),
    )
    whiten_rewards: bool = Field(default=False, description="Whiten per-token rewards.")
    missing_eos_penalty: float | None = Field(
        default=None, ge=0, description="Subtract from the score of a completion that never ends."
    )
    eval_prompts: int = Field(
        default=128, ge=0, description="Held-out prompts scored before and after training."
    )

    @model_validator(mode="after")
    def _check(self):
        if self.per_device_train_batch_size % self.num_mini_batches:
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a "
                f"multiple of num_mini_batches ({self.num_mini_batches})"
            )
        if self.gradient_accumulation_steps != 1:
            raise ValueError("align.ppo uses num_mini_batches, not gradient_accumulation_steps")
        if self.save_steps is not None:
            raise ValueError("align.ppo does not save resumable steps (save_steps) yet")
        if self.trainer_kwargs:
            raise ValueError("align.ppo runs its own loop: there is no trainer for trainer_kwargs")
        return self


# --- the pieces of PPO, each testable on its own --------------------------------------------


def masked_mean(x, mask, dim=None):
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x, mask, shift_mean: bool = True):
    """Normalize ``x`` to unit variance (and zero mean) over the positions where mask is 1."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * (var + 1e-8).rsqrt()
    return (out if shift_mean else out + mean) * mask


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalized advantage estimation over ``[batch, time]`` tensors.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``,
    with ``V`` and ``A`` zero past the last valid token (the episode ends there). Returns
    ``(advantages, returns)`` with ``returns = advantages + values``.
    """
    import torch

    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_adv
    return advantages, advantages + values


def policy_loss(logp, old_logp, advantages, mask, cliprange: float):
    """PPO's clipped surrogate: ``mean(max(-A * r, -A * clip(r, 1-eps, 1+eps)))`` with the
    ratio ``r = pi / pi_old``. Returns ``(loss, clip_fraction, approx_kl)``."""
    import torch

    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean((logp - old_logp) ** 2, mask)
    return loss, clipfrac, approx_kl


def value_loss(values, old_values, returns, mask, cliprange_value: float):
    """Clipped value loss: ``0.5 * mean(max((V - R)^2, (clip(V, V_old +- eps) - R)^2))``."""
    import torch

    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def kl_per_token(logp, ref_logp):
    """The per-token KL estimate on sampled tokens, ``log pi(a) - log pi_ref(a)`` (its sum over
    a completion is an unbiased estimate of the sequence KL)."""
    return logp - ref_logp


def token_rewards(scores, logp, ref_logp, mask, last, kl_coef: float):
    """Per-token rewards: ``-kl_coef * KL_t`` on every completion token, plus each completion's
    score on its last token (index ``last``)."""
    import torch

    rewards = -kl_coef * kl_per_token(logp, ref_logp) * mask
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


@dataclass
class KLController:
    """Fixed, or Ziegler et al.'s adaptive controller: after a batch of ``n`` samples with mean
    KL ``kl``, ``coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon``."""

    coef: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.coef *= 1 + error * n / self.horizon


# --- the model -------------------------------------------------------------------------------


def _value_model(lm):
    """The policy plus a scalar value head on its last hidden state (shared trunk)."""
    import torch

    class PolicyWithValueHead(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm
            self.v_head = torch.nn.Linear(lm.config.hidden_size, 1)
            torch.nn.init.zeros_(self.v_head.weight)
            torch.nn.init.zeros_(self.v_head.bias)

        def forward(self, input_ids, attention_mask):
            out = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=left_padded_positions(attention_mask),
                output_hidden_states=True,
            )
            return out.logits, self.v_head(out.hidden_states[-1]).squeeze(-1)

    return PolicyWithValueHead(lm)


def token_logprobs(logits, tokens, temperature: float):
    """Log-probabilities of ``tokens`` under ``logits / temperature`` (the sampling policy)."""
    import torch

    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, tokens[..., None])[..., 0]


# --- the stage --------------------------------------------------------------------------------


class Scorer:
    """The score of each completion: a reward model's output or the task verifier's 0/1."""

    def __init__(self, s: PPOSettings, reward_ckpt: Checkpoint | None):
        self.model = self.tokenizer = None
        if reward_ckpt is not None and s.reward != "verifier":
            from polm.loading import load_reward_model

            self.model, self.tokenizer = load_reward_model(reward_ckpt)
        self.kind = "model" if self.model is not None else "verifier"

    def __call__(self, prompts: list[Prompt], texts: list[str]) -> list[float]:
        if self.kind == "model":
            from polm.evaluate import score_completions

            answers = [[{"role": "assistant", "content": t}] for t in texts]
            return score_completions(
                self.model, self.tokenizer, [p.messages for p in prompts], answers
            )
        from polm.tasks import get_task

        return [get_task(p.task).score(t, p.example) for p, t in zip(prompts, texts)]


class Rollouts:
    """Sampled completions for a batch of prompts, with everything PPO needs about them."""

    def __init__(self, policy, ref, tokenizer, prompts: list[Prompt], s: PPOSettings):
        import torch

        self.prompts = prompts
        tokenizer.padding_side = "left"
        texts = [
            tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        enc = tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
            truncation=True,
            max_length=s.max_length,
        )
        with torch.no_grad(), _autocast(s.bf16):
            seq = policy.lm.generate(
                **enc,
                do_sample=True,
                temperature=s.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=s.response_length,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        width = enc["input_ids"].shape[1]
        self.prompt_len = width
        self.tokens = seq[:, width:]
        is_eos = self.tokens == tokenizer.eos_token_id
        ended = is_eos.any(-1)
        first_eos = torch.where(ended, is_eos.int().argmax(-1), self.tokens.shape[1] - 1)
        steps = torch.arange(self.tokens.shape[1])
        self.mask = (steps[None] <= first_eos[:, None]).float()  # up to and including the eos
        self.last = first_eos
        self.ended = ended
        self.input_ids = seq
        self.attention_mask = torch.cat([enc["attention_mask"], self.mask.long()], 1)
        self.texts = tokenizer.batch_decode(
            self.tokens.masked_fill(self.mask == 0, tokenizer.pad_token_id),
            skip_special_tokens=True,
        )
        with torch.no_grad(), _autocast(s.bf16):
            logits, values = policy(self.input_ids, self.attention_mask)
            self.logp = token_logprobs(logits[:, width - 1 : -1], self.tokens, s.temperature)
            self.values = values[:, width - 1 : -1].float()
            ref_logits = ref(
                input_ids=self.input_ids,
                attention_mask=self.attention_mask,
                position_ids=left_padded_positions(self.attention_mask),
            ).logits
            self.ref_logp = token_logprobs(
                ref_logits[:, width - 1 : -1], self.tokens, s.temperature
            )
        self.logp, self.ref_logp = self.logp * self.mask, self.ref_logp * self.mask

    def sequence_kl(self):
        return (kl_per_token(self.logp, self.ref_logp) * self.mask).sum(-1)


def _autocast(enabled: bool):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def heldout(policy, ref, tokenizer, prompts, scorer, s: PPOSettings, seed: int) -> dict:
    """Mean reward and mean sequence KL to the reference of sampled held-out completions."""
    import torch

    if not prompts:
        return {}
    torch.manual_seed(seed)
    rewards, kls = [], []
    for i in range(0, len(prompts), 64):
        r = Rollouts(policy, ref, tokenizer, prompts[i : i + 64], s)
        rewards += scorer(r.prompts, r.texts)
        kls += r.sequence_kl().tolist()
    return {"reward": sum(rewards) / len(rewards), "kl": sum(kls) / len(kls)}


def ppo_step(policy, optimizer, scheduler, r: Rollouts, advantages, returns, s: PPOSettings):
    """``num_ppo_epochs`` passes of minibatch updates on one rollout batch; mean statistics."""
    import torch

    n = len(r.prompts)
    size = n // s.num_mini_batches
    stats = {"pg_loss": 0.0, "vf_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
    updates = 0
    for _ in range(s.num_ppo_epochs):
        for idx in torch.randperm(n).split(size):
            with _autocast(s.bf16):
                logits, values = policy(r.input_ids[idx], r.attention_mask[idx])
            w = r.prompt_len
            logp = token_logprobs(logits[:, w - 1 : -1], r.tokens[idx], s.temperature)
            mask = r.mask[idx]
            pg, clipfrac, approx_kl = policy_loss(
                logp, r.logp[idx], advantages[idx], mask, s.cliprange
            )
            vf = value_loss(
                values[:, w - 1 : -1].float(),
                r.values[idx],
                returns[idx],
                mask,
                s.cliprange_value,
            )
            loss = pg + s.vf_coef * vf
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), s.max_grad_norm)
            optimizer.step()
            for k, v in zip(stats, (pg, vf, clipfrac, approx_kl)):
                stats[k] += v.item()
            updates += 1
    scheduler.step()
    return {k: v / updates for k, v in stats.items()}


def run(inputs: list[Checkpoint], settings: PPOSettings, out: Path) -> Checkpoint | None:
    import torch
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from polm.loading import load_model

    s = settings
    policy_ckpt, reward_ckpt = policy_and_reward(inputs, STAGE)
    if s.reward == "model" and reward_ckpt is None:
        raise PolmError(f"{STAGE}: reward: model needs a reward model as the second input.")
    if reward_ckpt is None and s.task is None:
        raise PolmError(
            f"{STAGE}: prompts from a dataset have no verifier; give a reward model as the "
            "second input (from: [policy, reward_model])."
        )

    random.seed(s.seed)
    torch.manual_seed(s.seed)
    train_prompts = load_prompts(s.task, s.dataset, "train", s.n_train)
    eval_prompts = load_prompts(s.task, s.dataset, "test", s.eval_prompts or None)[: s.eval_prompts]
    lm, tokenizer = load_model(policy_ckpt)
    ref = copy.deepcopy(lm).eval().requires_grad_(False)
    policy = _value_model(lm)
    scorer = Scorer(s, reward_ckpt)
    steps = s.max_steps
    if steps <= 0:
        steps = math.ceil(s.num_train_epochs * len(train_prompts) / s.per_device_train_batch_size)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=s.learning_rate, weight_decay=s.weight_decay, eps=1e-5
    )
    warmup = int(s.warmup_steps * steps) if s.warmup_steps < 1 else int(s.warmup_steps)
    scheduler = get_scheduler(s.lr_scheduler_type, optimizer, warmup, steps)
    kl_ctl = KLController(s.kl_coef, s.kl_target if s.adap_kl_ctrl else None, s.kl_horizon)

    policy.eval()  # no dropout: the ratio compares the same function before and after a step
    start = heldout(policy, ref, tokenizer, eval_prompts, scorer, s, s.seed + 1)
    order = random.Random(s.seed)
    pool: list[Prompt] = []
    log_history: list[dict] = []
    t0 = time.perf_counter()
    bar = tqdm(range(1, steps + 1), desc=f"{STAGE} ({scorer.kind} reward)", unit="it")
    for step in bar:
        if len(pool) < s.per_device_train_batch_size:
            more = list(train_prompts)
            order.shuffle(more)
            pool += more
        batch, pool = pool[: s.per_device_train_batch_size], pool[s.per_device_train_batch_size :]
        r = Rollouts(policy, ref, tokenizer, batch, s)
        scores = torch.tensor(scorer(batch, r.texts), dtype=torch.float32)
        if s.missing_eos_penalty is not None:
            scores = scores - s.missing_eos_penalty * (~r.ended).float()
        rewards = token_rewards(scores, r.logp, r.ref_logp, r.mask, r.last, kl_ctl.coef)
        if s.whiten_rewards:
            rewards = masked_whiten(rewards, r.mask, shift_mean=False)
        advantages, returns = gae(rewards, r.values, r.mask, s.gamma, s.lam)
        advantages = masked_whiten(advantages, r.mask)
        with short_sequences_attend_in_math():
            stats = ppo_step(policy, optimizer, scheduler, r, advantages, returns, s)
        seq_kl = float(r.sequence_kl().mean())
        entry = {
            "step": step,
            "loss": stats["pg_loss"] + s.vf_coef * stats["vf_loss"],
            "reward": float(scores.mean()),
            "kl": seq_kl,
            "kl_coef": kl_ctl.coef,
            **stats,
            "learning_rate": scheduler.get_last_lr()[0],
        }
        kl_ctl.update(seq_kl, len(batch))
        if step == 1 or step % s.logging_steps == 0 or step == steps:
            log_history.append(entry)
            bar.set_postfix(reward=f"{entry['reward']:.3f}", kl=f"{seq_kl:.3f}")
        progress.report(f"PPO ({scorer.kind} reward)", step, steps, loss=entry["loss"])
    wall = time.perf_counter() - t0
    end = heldout(policy, ref, tokenizer, eval_prompts, scorer, s, s.seed + 1)

    metrics = {
        "train.steps": steps,
        "train.wall_s": round(wall, 2),
        "train.reward_source": scorer.kind,
        "train.first_loss": log_history[0]["loss"],
        "train.last_loss": log_history[-1]["loss"],
        "train.first_reward": log_history[0]["reward"],
        "train.last_reward": log_history[-1]["reward"],
        "train.first_kl": log_history[0]["kl"],
        "train.last_kl": log_history[-1]["kl"],
        "train.final_kl_coef": kl_ctl.coef,
        "train.kl_target": s.kl_target if s.adap_kl_ctrl else None,
        "train.trainable_params": sum(p.numel() for p in policy.parameters()),
    }
    if start:
        metrics |= {
            "train.heldout_reward_start": start["reward"],
            "train.heldout_reward": end["reward"],
            "train.heldout_kl": end["kl"],
            "train.heldout_n": len(eval_prompts),
        }
    with staging(out) as st:
        lm.save_pretrained(st.dir)
        tokenizer.save_pretrained(st.dir)
        (st.dir / TRAIN_LOG).write_text(json.dumps(log_history, indent=1) + "\n")
        parents = [policy_ckpt] + ([reward_ckpt] if reward_ckpt is not None else [])
        return st.commit(
            stage=STAGE,
            format="hf",
            settings=s,
            parents=parents,
            seed=s.seed,
            metrics=metrics,
        )
