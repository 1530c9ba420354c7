"""The pieces of align.ppo against hand-computed values: GAE, the clipped losses, the KL term
and its controller."""

import math

import pytest
import torch

from align.ppo import (
    KLController,
    gae,
    kl_per_token,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3]])
    mask = torch.ones(1, 3)
    # gamma 1, lambda 0.5: deltas 0.7, -0.1, -0.1 from the end;
    # A2 = 0.7, A1 = -0.1 + 0.5 * 0.7 = 0.25, A0 = -0.1 + 0.5 * 0.25 = 0.025
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.025, 0.25, 0.7])
    assert ret.tolist()[0] == pytest.approx([0.525, 0.65, 1.0])
    # gamma 0.9, lambda 1: A_t is the discounted return minus V_t (0.81 - 0.5, 0.9 - 0.4, 1 - 0.3)
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([0.31, 0.5, 0.7])


def test_gae_ends_the_episode_at_the_mask():
    """Tokens after the end of a completion carry no advantage and no bootstrapped value."""
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 9.0]])  # 9.0 sits past the end and must be ignored
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.2, 0.6, 0.0])  # A1 = 1 - 0.4; A0 = -0.1 + 0.3
    assert ret.tolist()[0] == pytest.approx([0.7, 1.0, 0.0])


def test_clipped_policy_loss_values_and_gradients():
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    old = torch.zeros(1, 4)
    logp = ratios.log().requires_grad_(True)
    loss, clipfrac, _ = policy_loss(logp, old, advantages, torch.ones(1, 4), cliprange=0.2)
    # per token: max(-A r, -A clip(r, 0.8, 1.2)) = -1.2 (clipped), -0.5, 1.5, 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert clipfrac.item() == pytest.approx(0.5)
    loss.backward()
    grad = logp.grad[0]
    assert grad[0] == 0 and grad[3] == 0  # clipped tokens get no gradient
    # unclipped: d(-A r)/dlogp = -A r / 4
    assert grad[1].item() == pytest.approx(-0.5 / 4) and grad[2].item() == pytest.approx(1.5 / 4)


def test_policy_loss_ignores_masked_tokens():
    logp = torch.tensor([[0.1, 5.0]])
    old, adv = torch.zeros(1, 2), torch.ones(1, 2)
    loss, _, _ = policy_loss(logp, old, adv, torch.tensor([[1.0, 0.0]]), cliprange=0.2)
    assert loss.item() == pytest.approx(-math.exp(0.1))


def test_clipped_value_loss():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 1.0]])
    loss = value_loss(new, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: max((1-1)^2, (0.2-1)^2) = 0.64; token 1: max(0.81, 0.81) = 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)


def test_kl_estimate_is_unbiased_and_penalises_every_token():
    torch.manual_seed(0)
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.4, 0.4, 0.2])
    exact = float((p * (p / q).log()).sum())
    samples = torch.multinomial(p, 200_000, replacement=True)
    estimate = kl_per_token(p.log()[samples], q.log()[samples]).mean().item()
    assert estimate == pytest.approx(exact, abs=5e-3)

    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    r = token_rewards(torch.tensor([2.0]), logp, ref, mask, torch.tensor([1]), kl_coef=0.1)
    # -0.1 * (0.5, -1.0, masked) and the score on the last real token
    assert r.tolist()[0] == pytest.approx([-0.05, 0.1 + 2.0, 0.0])


def test_kl_controller():
    fixed = KLController(0.1)
    fixed.update(100.0, 32)
    assert fixed.coef == 0.1

    ctl = KLController(0.1, target=2.0, horizon=100)
    ctl.update(3.0, 10)  # 50% over target, clipped to 20%: coef *= 1 + 0.2 * 10 / 100
    assert ctl.coef == pytest.approx(0.1 * 1.02)
    ctl.update(1.0, 10)  # 50% under, clipped to -20%
    assert ctl.coef == pytest.approx(0.1 * 1.02 * 0.98)
    ctl.update(2.2, 50)  # 10% over
    assert ctl.coef == pytest.approx(0.1 * 1.02 * 0.98 * 1.05)


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    assert w[0, :3].mean().item() == pytest.approx(0, abs=1e-6)
    assert (w[0, :3] ** 2).mean().item() == pytest.approx(1, abs=1e-4)
    assert w[0, 3] == 0
