"""GRPO advantages/loss and DPO loss against values worked out by hand (arithmetic in the comments)."""

import math
import random

import pytest
import torch

from medmllm.errors import ConfigError
from medmllm.train.rl_losses import dpo_loss, group_advantages, grpo_loss, sequence_logprobs, token_logprobs

E = math.exp


# ----------------------------------------------------------------------------- log-probs
def test_token_and_sequence_logprobs_shift_and_mask():
    # vocabulary of 2; position t's logits predict the token at t + 1
    logits = torch.tensor([[[0.0, 0.0],                 # p = (1/2, 1/2)
                            [math.log(3.0), 0.0],       # p = (3/4, 1/4)
                            [5.0, -5.0]]])              # last position predicts nothing
    labels = torch.tensor([[-100, 1, 0]])               # the response is tokens 1 and 0
    per_token = token_logprobs(logits, labels)
    # t=0: nothing predicts it -> 0; t=1: log p(1 | logits[0]) = log 1/2; t=2: log p(0 | logits[1]) = log 3/4
    assert torch.allclose(per_token, torch.tensor([[0.0, math.log(0.5), math.log(0.75)]]))
    assert sequence_logprobs(logits, labels).item() == pytest.approx(math.log(0.5) + math.log(0.75))
    assert sequence_logprobs(logits, labels, torch.tensor([[1, 1, 0]])).item() == pytest.approx(math.log(0.5))
    assert sequence_logprobs(logits, torch.tensor([[-100, -100, -100]])).item() == 0.0


# ----------------------------------------------------------------------------- advantages
def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0,    # group 0: mean 1/2
                            2.0, 2.0, 2.0, 2.0])   # group 1: all equal -> no signal
    adv = group_advantages(rewards, group_size=4, eps=1e-4)
    # group 0: deviations +-1/2; unbiased std = sqrt((4 * 1/4) / (4 - 1)) = sqrt(1/3) = 0.5773503
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)            # = 0.8658756
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]), atol=1e-6)
    # a group of 3: rewards 3, 0, 0: mean 1, deviations 2, -1, -1; std = sqrt((4 + 1 + 1) / 2) = sqrt(3)
    adv3 = group_advantages(torch.tensor([3.0, 0.0, 0.0]), group_size=3, eps=0.0)
    assert torch.allclose(adv3, torch.tensor([2.0, -1.0, -1.0]) / math.sqrt(3.0))


def test_group_advantages_checks_its_input():
    with pytest.raises(ConfigError, match="group_size"):
        group_advantages(torch.zeros(4), group_size=1)
    with pytest.raises(ConfigError, match="multiple"):
        group_advantages(torch.zeros(5), group_size=2)


# ----------------------------------------------------------------------------- GRPO loss
def _batch():
    logp_old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    logp_new = torch.tensor([[-1.0, -0.5, -1.5], [-2.0, -2.5, 0.0]], requires_grad=True)
    logp_ref = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])     # sequence 1 has two completion tokens
    return logp_new, logp_old, logp_ref, adv, mask


def test_grpo_loss_by_hand():
    logp_new, logp_old, logp_ref, adv, mask = _batch()
    out = grpo_loss(logp_new, logp_old, logp_ref, adv, mask, clip_eps=0.2, kl_beta=0.1)
    # sequence 0, A = +1, ratios exp(new - old) = 1, e^0.5 = 1.648721, e^-0.5 = 0.606531
    #   surrogate min(r A, clip(r, 0.8, 1.2) A) = 1, 1.2 (clipped), 0.606531
    #   k3 kl, d = ref - new = 0, -0.5, 0.5 -> e^d - d - 1 = 0, 0.106531, 0.148721
    #   per token -(surr) + 0.1 kl = -1, -1.189347, -0.591659 -> mean over 3 tokens = -0.927002
    s0 = (-1 + (-1.2 + 0.1 * (E(-0.5) + 0.5 - 1)) + (-E(-0.5) + 0.1 * (E(0.5) - 0.5 - 1))) / 3
    # sequence 1, A = -2, tokens 0 and 1 (token 2 is masked even though its ratio is e^2)
    #   ratios 1, e^-0.5 = 0.606531; surrogate min(-2, -2) = -2; min(-1.213061, 0.8 * -2 = -1.6) = -1.6 (clipped)
    #   kl 0, (d = 0.5) 0.148721 -> per token 2, 1.614872 -> mean over 2 tokens = 1.807436
    s1 = (2 + (1.6 + 0.1 * (E(0.5) - 0.5 - 1))) / 2
    assert s0 == pytest.approx(-0.9270019, abs=1e-6) and s1 == pytest.approx(1.8074361, abs=1e-6)
    assert out["loss"].item() == pytest.approx((s0 + s1) / 2, abs=1e-6)          # = 0.4402171
    kl0 = (0 + (E(-0.5) + 0.5 - 1) + (E(0.5) - 0.5 - 1)) / 3
    kl1 = (0 + (E(0.5) - 0.5 - 1)) / 2
    assert out["kl"].item() == pytest.approx((kl0 + kl1) / 2, abs=1e-6)          # = 0.0797223
    assert out["clip_fraction"].item() == pytest.approx((1 / 3 + 1 / 2) / 2)      # one clipped token each
    # gradients: a clipped token only feels the KL term, 0.1 * (1 - e^d), scaled by 1/3 (its sequence) * 1/2 (batch)
    out["loss"].backward()
    g = logp_new.grad
    assert g[0, 1].item() == pytest.approx(0.1 * (1 - E(-0.5)) / 6, abs=1e-6)
    # an unclipped token: d(-r A)/d new = -r A = -0.606531, plus 0.1 * (1 - e^0.5), over 6
    assert g[0, 2].item() == pytest.approx((-E(-0.5) + 0.1 * (1 - E(0.5))) / 6, abs=1e-6)
    assert g[1, 2].item() == 0.0                                                 # masked


def test_grpo_loss_leaves_out_empty_sequences_and_can_drop_the_kl():
    logp_new, logp_old, logp_ref, adv, mask = _batch()
    base = grpo_loss(logp_new, logp_old, logp_ref, adv, mask, 0.2, 0.1)["loss"]
    pad = lambda t, v: torch.cat([t, torch.full((1, 3), v, dtype=t.dtype)])  # noqa: E731
    more = grpo_loss(pad(logp_new.detach(), -3.0), pad(logp_old, -1.0), pad(logp_ref, -1.0),
                     torch.cat([adv, torch.tensor([5.0])]), pad(mask, 0), 0.2, 0.1)["loss"]
    assert more.item() == pytest.approx(base.item(), abs=1e-7)    # a sequence without completion tokens
    no_kl = grpo_loss(logp_new, logp_old, None, adv, mask, 0.2, 0.1)
    # the surrogate terms alone: sequence 0 -(1 + 1.2 + e^-0.5) / 3, sequence 1 (2 + 1.6) / 2
    assert no_kl["loss"].item() == pytest.approx((-(1 + 1.2 + E(-0.5)) / 3 + 3.6 / 2) / 2, abs=1e-6)
    assert no_kl["kl"].item() == 0.0
    with pytest.raises(ConfigError, match="advantages"):
        grpo_loss(logp_new, logp_old, logp_ref, adv[:1], mask)


def test_grpo_loss_on_policy_is_minus_the_mean_advantage():
    # ratio 1 everywhere (new == old == ref): loss = -mean over sequences of A, KL = 0
    lp = torch.full((3, 4), -0.7)
    out = grpo_loss(lp, lp, lp, torch.tensor([0.5, -1.0, 2.0]), torch.ones(3, 4), 0.2, 0.04)
    assert out["loss"].item() == pytest.approx(-(0.5 - 1.0 + 2.0) / 3)
    assert out["kl"].item() == 0.0 and out["clip_fraction"].item() == 0.0


# ----------------------------------------------------------------------------- DPO loss
def _dpo_reference(pc, pr, rc, rr, beta):
    """-log sigmoid(beta * ((pc - rc) - (pr - rr))) on plain floats, = log(1 + exp(-z))."""
    z = beta * ((pc - rc) - (pr - rr))
    return math.log1p(math.exp(-z))


def test_dpo_loss_matches_the_reference_formula():
    # one pair by hand: z = 0.1 * ((-5 + 6) - (-7 + 6.5)) = 0.1 * 1.5 = 0.15, loss = log(1 + e^-0.15) = 0.6198
    out = dpo_loss(torch.tensor([-5.0]), torch.tensor([-7.0]), torch.tensor([-6.0]), torch.tensor([-6.5]), beta=0.1)
    assert out["loss"].item() == pytest.approx(math.log1p(math.exp(-0.15)), abs=1e-6)
    assert out["chosen_rewards"].item() == pytest.approx(0.1)     # 0.1 * (-5 + 6)
    assert out["rejected_rewards"].item() == pytest.approx(-0.05)  # 0.1 * (-7 + 6.5)
    rnd = random.Random(0)
    vals = [[rnd.uniform(-40, -1) for _ in range(8)] for _ in range(4)]
    for beta in (0.05, 0.5, 2.0):
        got = dpo_loss(*(torch.tensor(v, dtype=torch.float64) for v in vals), beta=beta)
        want = [_dpo_reference(*(v[i] for v in vals), beta) for i in range(8)]
        assert got["losses"].tolist() == pytest.approx(want, abs=1e-9)
        assert got["loss"].item() == pytest.approx(sum(want) / 8, abs=1e-9)


def test_dpo_loss_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = torch.tensor([-3.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    out = dpo_loss(pc, pr, torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.5)
    assert out["loss"].item() == pytest.approx(math.log(2.0))     # policy == reference: log 2
    out["loss"].backward()
    # d/dpc -log sigmoid(beta (pc - pr)) = -beta * sigmoid(-z) = -0.5 * 0.5 at z = 0
    assert pc.grad.item() == pytest.approx(-0.25) and pr.grad.item() == pytest.approx(0.25)
    with pytest.raises(ConfigError):
        dpo_loss(pc, pr, torch.zeros(2), torch.zeros(1))
