"""Pure loss functions of the preference (DPO) and RL (GRPO) stages. No state, no modules.

Shapes: ``B`` sequences (for GRPO ``B*G``: ``B`` prompts x ``G`` completions each, grouped
contiguously: rows ``[i*G, (i+1)*G)`` belong to prompt ``i``), ``L`` tokens, ``V`` vocabulary.

* :func:`token_logprobs` / :func:`sequence_logprobs` — log-probabilities of label tokens under a
  causal LM's logits (the shift is done here: ``logits[:, t-1]`` predicts ``labels[:, t]``).
* :func:`group_advantages` — GRPO's group-normalised advantages ``(r - mean_group) / (std_group + eps)``.
* :func:`grpo_loss` — clipped surrogate per token + k3 KL estimator to the reference policy,
  averaged per sequence then over the batch (DeepSeekMath, Shao et al. 2024, eq. 3).
* :func:`dpo_loss` — sigmoid DPO (Rafailov et al. 2023, eq. 7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medmllm.errors import ConfigError

IGNORE_INDEX = -100


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``out[b, t] = log p(labels[b, t] | tokens < t)`` for ``t >= 1``; 0 at ``t = 0`` and where
    ``labels == ignore_index``.

    logits ``[B, L, V]`` (any float dtype; computed in float32), labels ``[B, L]`` aligned with the
    input ids (as the collator's labels) -> ``[B, L]`` float32.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ConfigError(f"token_logprobs: expected logits [B, L, V] and labels [B, L], got "
                          f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    target = labels[:, 1:]                                                   # [B, L-1]
    valid = target != ignore_index                                           # [B, L-1]
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)                     # [B, L-1, V]
    picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # [B, L-1]
    picked = picked.masked_fill(~valid, 0.0)
    return F.pad(picked, (1, 0))                                             # [B, L]


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Summed log-probability of each sequence's label tokens -> ``[B]`` float32.

    logits ``[B, L, V]``, labels ``[B, L]`` (``ignore_index`` off the response), ``mask`` ``[B, L]``
    (optional, aligned with labels): only positions with ``mask`` true and a label are summed.
    """
    per_token = token_logprobs(logits, labels, ignore_index)                 # [B, L]
    if mask is not None:
        if mask.shape != labels.shape:
            raise ConfigError(f"sequence_logprobs: mask {tuple(mask.shape)} must match labels {tuple(labels.shape)}")
        per_token = per_token * mask.to(per_token.dtype)
    return per_token.sum(-1)                                                 # [B]


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, over its group's std plus ``eps``.

    rewards ``[B*G]`` (groups contiguous) -> ``[B*G]`` float32. The std is the unbiased sample std
    (``torch.std``, divisor ``G - 1``, as TRL's GRPOTrainer), so ``group_size`` must be >= 2. A group
    whose rewards are all equal gets advantages 0 (it carries no learning signal).
    """
    if not isinstance(group_size, int) or group_size < 2:
        raise ConfigError(f"group_size: expected an int >= 2, got {group_size!r}")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ConfigError(f"rewards: expected a 1-D tensor whose length is a multiple of group_size={group_size}, "
                          f"got shape {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)                                 # [B, G]
    mean = r.mean(dim=1, keepdim=True)                                       # [B, 1]
    std = r.std(dim=1, keepdim=True)                                         # [B, 1] unbiased
    return ((r - mean) / (std + eps)).reshape(-1)                            # [B*G]


def grpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2,
              kl_beta: float = 0.04) -> dict[str, torch.Tensor]:
    """GRPO objective as a loss to minimise (DeepSeekMath eq. 3, per-sequence normalisation).

    Inputs: ``logp_new`` ``[N, T]`` per-token log-probs of the sampled tokens under the policy being
    trained (with grad); ``logp_old`` ``[N, T]`` the same under the sampling-time policy; ``logp_ref``
    ``[N, T]`` under the frozen reference (None or ``kl_beta == 0``: no KL term); ``advantages`` ``[N]``;
    ``mask`` ``[N, T]`` 1 on completion tokens. Per token::

        ratio = exp(logp_new - logp_old)
        surrogate = min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A)
        kl = exp(logp_ref - logp_new) - (logp_ref - logp_new) - 1        # k3, unbiased, >= 0
        per_token = -(surrogate - kl_beta * kl)

    loss = mean over sequences of (sum over the sequence's completion tokens / its token count) —
    DeepSeekMath's ``1/G sum_i 1/|o_i| sum_t``; sequences without completion tokens are left out
    (loss 0 when none has any). Returns ``{"loss", "kl", "clip_fraction", "ratio"}`` where ``kl``,
    ``clip_fraction`` (share of tokens whose ratio was clipped in the direction that matters) and
    ``ratio`` are detached means over the same (sequence, then batch) weighting.
    """
    if not (logp_new.shape == logp_old.shape == mask.shape) or logp_new.ndim != 2:
        raise ConfigError(f"grpo_loss: expected logp_new, logp_old and mask of one shape [N, T], got "
                          f"{tuple(logp_new.shape)}, {tuple(logp_old.shape)}, {tuple(mask.shape)}")
    if advantages.shape != logp_new.shape[:1]:
        raise ConfigError(f"grpo_loss: expected advantages [N={logp_new.shape[0]}], got {tuple(advantages.shape)}")
    m = mask.to(logp_new.dtype)                                              # [N, T]
    adv = advantages.to(logp_new.dtype)[:, None]                             # [N, 1]
    ratio = torch.exp(logp_new - logp_old)                                   # [N, T]
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)             # [N, T]
    surrogate = torch.min(ratio * adv, clipped * adv)                        # [N, T]
    per_token = -surrogate
    if logp_ref is not None and kl_beta != 0:
        if logp_ref.shape != logp_new.shape:
            raise ConfigError(f"grpo_loss: logp_ref {tuple(logp_ref.shape)} must match logp_new "
                              f"{tuple(logp_new.shape)}")
        delta = logp_ref - logp_new                                          # [N, T]
        kl = torch.exp(delta) - delta - 1.0                                  # [N, T]
        per_token = per_token + kl_beta * kl
    else:
        kl = torch.zeros_like(per_token)
    was_clipped = ((ratio * adv) > (clipped * adv)).to(m.dtype)              # min took the clipped term

    counts = m.sum(-1)                                                       # [N]
    has = counts > 0                                                         # [N]
    n_seq = has.sum().clamp_min(1).to(m.dtype)

    def seq_mean(x: torch.Tensor) -> torch.Tensor:                           # [N, T] -> scalar
        per_seq = (x * m).sum(-1) / counts.clamp_min(1)                      # [N]
        return (per_seq * has.to(m.dtype)).sum() / n_seq

    return {"loss": seq_mean(per_token), "kl": seq_mean(kl).detach(),
            "clip_fraction": seq_mean(was_clipped).detach(), "ratio": seq_mean(ratio).detach()}


def dpo_loss(policy_chosen_logp: torch.Tensor, policy_rejected_logp: torch.Tensor,
             ref_chosen_logp: torch.Tensor, ref_rejected_logp: torch.Tensor,
             beta: float = 0.1) -> dict[str, torch.Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023): ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))``.

    All inputs ``[B]`` summed response log-probs (policy with grad, reference without). Returns
    ``{"loss": mean over B, "losses": [B], "chosen_rewards": [B] = beta * (pc - rc),
    "rejected_rewards": [B] = beta * (pr - rr)}`` (rewards detached).
    """
    shapes = {tuple(t.shape) for t in (policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ConfigError(f"dpo_loss: expected four [B] tensors of one shape, got {sorted(shapes)}")
    if not beta > 0:
        raise ConfigError(f"dpo_loss: beta must be > 0, got {beta!r}")
    chosen = policy_chosen_logp - ref_chosen_logp.to(policy_chosen_logp.dtype)          # [B]
    rejected = policy_rejected_logp - ref_rejected_logp.to(policy_rejected_logp.dtype)  # [B]
    losses = -F.logsigmoid(beta * (chosen - rejected))                                   # [B]
    return {"loss": losses.mean(), "losses": losses, "chosen_rewards": (beta * chosen).detach(),
            "rejected_rewards": (beta * rejected).detach()}


__all__ = ["dpo_loss", "group_advantages", "grpo_loss", "sequence_logprobs", "token_logprobs"]
