"""Recipe of the `grpo` stage (RL with verifiable rewards): setup -> train -> save -> cleanup.

Group Relative Policy Optimization (DeepSeekMath, Shao et al. 2024) on any record with a
verifiable ``meta.answer`` (closed, open, choice, or numeric with ``meta.extra.tolerance``), for
every modality the model takes. Per group of ``grad_accum`` micro-batches of ``train.batch_size``
prompts:

1. **rollout** — each prompt (its trailing assistant turn removed, ``grpo.prompt_format`` appended
   to the last user turn unless already there) is sampled ``grpo.group_size`` times with the
   current policy (temperature / top-p sampling from a ``torch.Generator`` seeded by
   ``(train.seed, epoch, group, micro-batch, process)``, so no global RNG is drawn);
2. **score** — the rewards of ``grpo.rewards`` (names of :data:`medmllm.train.rewards.REWARDS` with
   weights) score each completion; advantages are normalised within each prompt's group
   (:func:`~medmllm.train.rl_losses.group_advantages`); with ``grpo.drop_uniform_groups`` the groups
   whose completions all scored the same (advantage 0) are left out of the update;
3. the per-token log-probs of the sampled tokens under the sampling-time policy (``old``) and a
   frozen copy of the starting model (``ref``, only when ``grpo.kl_beta > 0``) are stored;
4. **update** — ``grpo.iterations`` optimizer steps on the same rollouts, each a pass over the
   group's micro-batches with the clipped surrogate + k3 KL loss (:func:`~medmllm.train.rl_losses.grpo_loss`).

One optimizer step of the engine's :class:`~medmllm.train.engine.TrainLoop` is one pass, so
``train.max_steps`` counts updates (``iterations`` per rollout). Exact resume: the loop's checkpoint
holds weights, optimizer, scheduler, RNG states and the data position; rollouts are a function of
the weights and ``(seed, epoch, group)``; a checkpoint taken between the updates of one rollout
resumes from that rollout as saved in ``run_dir/rollouts/`` (files no checkpoint needs are
deleted). Dropout is turned off (``grpo.disable_dropout``) so the sampling-time and update-time
log-probs agree. Logged per step: ``reward`` (mean combined reward), ``accuracy``, ``format_rate``
(share of completions following the think/answer format), ``kl`` (to the reference),
``clip_fraction``, ``completion_tokens``, ``mixed_groups`` (share of completions whose group's rewards
differ: the ones that carry a learning signal); each reward component as ``reward_<name>``.

Config: see :class:`GRPOConfig` and ``recipes/grpo.yaml``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch

from medmllm.data.phantoms.reasoning import COT_INSTRUCTION
from medmllm.errors import ConfigError, InputError
from medmllm.model.generate import eos_ids
from medmllm.train.engine import zero_loss
from medmllm.train.rl_losses import IGNORE_INDEX, group_advantages, grpo_loss, token_logprobs
from medmllm.train.sft import DataConfig, LoraConfig, ModelConfig, OptimConfig, SFTTrain, save_final_model

log = logging.getLogger(__name__)

ROLLOUT_DIR = "rollouts"
_FORWARD_KEYS = ("input_ids", "attention_mask", "modality_inputs", "modality_batch_index")
_ROLLOUT_RE = re.compile(r"^rank(\d+)_e(\d+)_g(\d+)\.pt$")


@dataclasses.dataclass
class GRPOSettings:
    group_size: int = 4               # completions sampled per prompt (G)
    iterations: int = 2               # optimizer steps per rollout (mu)
    clip_eps: float = 0.2
    kl_beta: float = 0.04             # 0: no reference model, no KL term
    adv_eps: float = 1e-4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    stop_strings: list = dataclasses.field(default_factory=lambda: ["</answer>"])
    rewards: dict = dataclasses.field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5})
    length_soft_chars: Optional[int] = None   # set both to parameterise the `length_penalty` reward
    length_hard_chars: Optional[int] = None
    prompt_format: str = COT_INSTRUCTION      # appended to the last user turn ("" = none)
    answer_types: list = dataclasses.field(default_factory=lambda: ["closed", "open", "choice"])
    disable_dropout: bool = True
    # leave groups whose completions all got the same reward out of the update (DAPO's dynamic sampling,
    # without resampling): their advantages are 0, so they would only add the KL term and dilute the batch
    drop_uniform_groups: bool = False

    def __post_init__(self) -> None:
        for name, low in (("group_size", 2), ("iterations", 1), ("max_new_tokens", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"grpo.{name}: expected an int >= {low}, got {v!r}")
        for name, ok in (("clip_eps", lambda x: 0 < x < 1), ("kl_beta", lambda x: x >= 0), ("adv_eps", lambda x: x > 0),
                         ("temperature", lambda x: x > 0), ("top_p", lambda x: 0 < x <= 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
                raise ConfigError(f"grpo.{name}: out of range, got {v!r}")
        if not isinstance(self.rewards, dict) or not self.rewards:
            raise ConfigError(f"grpo.rewards: expected a mapping of reward name -> weight, got {self.rewards!r}")
        if (self.length_soft_chars is None) != (self.length_hard_chars is None):
            raise ConfigError("grpo.length_soft_chars and grpo.length_hard_chars: set both or neither")


@dataclasses.dataclass
class GRPOConfig:
    stage: Literal["grpo"]
    run_dir: str
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-5, projector_lr=1e-5,
                                                                                warmup_steps=0, schedule="constant"))
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    train: SFTTrain = dataclasses.field(default_factory=lambda: SFTTrain(batch_size=4, mixed_precision="no"))
    grpo: GRPOSettings = dataclasses.field(default_factory=GRPOSettings)
    resume: bool = True


# ----------------------------------------------------------------------------- prompts and rewards

def make_reward(s: GRPOSettings):
    """The :class:`~medmllm.train.rewards.CombinedReward` of ``grpo.rewards`` (length limits applied)."""
    from medmllm.train.rewards import combined, make_length_penalty

    names: list[Any] = []
    for name in s.rewards:
        if name == "length_penalty" and s.length_soft_chars is not None:
            names.append(make_length_penalty(s.length_soft_chars, s.length_hard_chars))
        else:
            names.append(name)
    return combined(names, list(s.rewards.values()))


def verifiable(rec: dict, answer_types: list[str]) -> bool:
    """Whether the accuracy reward can score ``rec`` (a gold answer and a scorable answer type)."""
    meta = rec["meta"]
    if meta.get("answer") in (None, ""):
        return False
    if (meta.get("extra") or {}).get("tolerance") is not None:
        return True
    return meta.get("answer_type", "open") in answer_types


def rl_prompt(rec: dict, prompt_format: str) -> dict:
    """A copy of ``rec`` without trailing assistant turns, ``prompt_format`` appended to its last user
    turn (unless that turn already holds it)."""
    out = copy.deepcopy(rec)
    msgs = out["messages"]
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    if not msgs or msgs[-1]["role"] != "user":
        raise InputError(rec["id"], "expected the prompt to end with a user turn")
    if prompt_format:
        last = msgs[-1]
        content = [{"type": "text", "text": last["content"]}] if isinstance(last["content"], str) else last["content"]
        if not any(p["type"] == "text" and prompt_format in p["text"] for p in content):
            content = list(content) + [{"type": "text", "text": prompt_format}]
        last["content"] = content
    out.pop("chosen", None)
    out.pop("rejected", None)
    return out


def load_prompts(cfg: GRPOConfig) -> tuple[list[dict], list[Path], str]:
    """Verifiable records of ``data.train`` turned into RL prompts, their folders and a data hash."""
    from medmllm.train.sft import load_records

    records, bases, data_hash = load_records(cfg.data)
    keep = [i for i, r in enumerate(records) if verifiable(r, cfg.grpo.answer_types)]
    if len(keep) < len(records):
        log.warning("grpo: %d record(s) without a verifiable answer of types %s left out", len(records) - len(keep),
                    cfg.grpo.answer_types)
    if not keep:
        raise ConfigError(f"data.train: expected records with a verifiable meta.answer (answer types "
                          f"{cfg.grpo.answer_types} or meta.extra.tolerance) in {cfg.data.train}, found none")
    return [rl_prompt(records[i], cfg.grpo.prompt_format) for i in keep], [bases[i] for i in keep], data_hash


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every ``nn.Dropout`` probability (and the LLM config's ``attention_dropout``) to 0; returns the count."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p:
            m.p, n = 0.0, n + 1
    for cfg in (getattr(getattr(model, "llm", None), "config", None), getattr(model, "config", None)):
        if cfg is not None and getattr(cfg, "attention_dropout", 0):
            cfg.attention_dropout, n = 0.0, n + 1
    return n


# ----------------------------------------------------------------------------- rollouts

def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def _forward_logps(model, batch: dict) -> torch.Tensor:
    """Per-token log-probs ``[N, L]`` of ``batch["labels"]`` under ``model``."""
    logits = model(**{k: batch[k] for k in _FORWARD_KEYS if k in batch}).logits        # [N, L, V]
    return token_logprobs(logits, batch["labels"])                                      # [N, L]


@torch.no_grad()
def sample_completions(model, batch: dict, tokenizer, *, max_new_tokens: int, temperature: float = 1.0,
                       top_p: float = 1.0, stop_strings: list[str] | None = None, seed: int = 0,
                       banned_ids: list[int] | None = None) -> list[list[int]]:
    """Sample one completion per row of a left-padded ``batch`` (collator keys) with a KV cache.

    Temperature / nucleus sampling from a ``torch.Generator`` seeded with ``seed`` (the global RNG is
    not touched); ``banned_ids`` (e.g. the modality placeholders, which would make the sequence
    unreadable to the model) get probability 0. A row ends at an end-of-turn token (kept as the
    row's last id: it is part of the sampled action), at the first stop string (ids up to the one
    completing it) or after ``max_new_tokens``. The model runs in eval mode (its mode is restored).
    Returns each row's new token ids.
    """
    stop_strings = [x for x in (stop_strings or []) if x]
    keys = ("input_ids", "attention_mask", "modality_inputs", "modality_batch_index")
    inputs = {k: batch[k] for k in keys if batch.get(k) is not None}
    attention = inputs["attention_mask"]
    if bool((attention[:, -1] == 0).any()):
        raise InputError("attention_mask", "expected left padding (every row ends with a real token)")
    was_training = model.training
    model.eval()
    try:
        embeds, attention, positions = model.embed_inputs(**inputs)                  # [B, L, H], [B, L], [B, L]
        b, dev = embeds.shape[0], embeds.device
        gen = torch.Generator(device=dev).manual_seed(int(seed))
        eos = torch.tensor(eos_ids(model, tokenizer), device=dev)
        banned = torch.tensor(sorted(set(banned_ids or [])), dtype=torch.long, device=dev)
        out = model.llm(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, use_cache=True,
                        logits_to_keep=1)
        next_pos = positions[:, -1:] + 1                                              # [B, 1]
        finished = torch.zeros(b, dtype=torch.bool, device=dev)                       # [B]
        rows: list[list[int]] = [[] for _ in range(b)]
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1].float() / temperature                          # [B, V]
            if banned.numel():
                logits[:, banned] = float("-inf")
            probs = torch.softmax(logits, dim=-1)                                     # [B, V]
            if top_p < 1.0:
                sorted_p, order = probs.sort(dim=-1, descending=True)
                sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p, 0.0)
                probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            tok = torch.multinomial(probs, 1, generator=gen).squeeze(-1)              # [B]
            hit_eos = torch.isin(tok, eos)
            for i in (~finished).nonzero().flatten().tolist():
                rows[i].append(int(tok[i]))
                if bool(hit_eos[i]) or (stop_strings and any(x in tokenizer.decode(rows[i], skip_special_tokens=True)
                                                            for x in stop_strings)):
                    finished[i] = True
            if bool(finished.all()):
                break
            attention = torch.cat([attention, attention.new_ones(b, 1)], dim=1)      # [B, L + t]
            out = model.llm(input_ids=tok[:, None], attention_mask=attention, position_ids=next_pos,
                            past_key_values=out.past_key_values, use_cache=True)
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    return rows


def banned_ids(tokenizer) -> list[int]:
    """Token ids a rollout must never sample: the modality placeholders (which would make the sequence
    unreadable to the model) and pad when it is not eos."""
    from medmllm.data.tokenizers import modality_token_ids

    banned = sorted(set(modality_token_ids(tokenizer).values()))
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        banned.append(int(tokenizer.pad_token_id))
    return banned


def completion_text(tokenizer, ids: list[int], stop_strings: list[str]) -> str:
    """The reward text of one sampled row: special tokens left out, cut right after the first stop string."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [(text.find(x), x) for x in stop_strings if x and x in text]
    if hits:
        at, stop = min(hits)
        text = text[: at + len(stop)]
    return text


class Roller:
    """Makes one rollout micro-batch: sample, score, advantages, old/ref log-probs (see the module doc).

    ``roller(items, seed)`` takes dataset items (prompts with their modality tensors; None = unreadable,
    left out) and returns the micro-batch: ``advantages [N]``, ``input_ids / attention_mask / labels
    [N, Lp + Lc]`` (prompt left-padded, completion right-padded, labels on completion tokens only),
    ``modality_inputs``, ``modality_batch_index``, ``old_logps`` and ``ref_logps`` ``[N, Lp + Lc]``,
    and ``stats`` (per-completion rewards, accuracy, format, completion length), ``N = prompts x G``.
    Modality placeholder tokens (and pad, when it is not eos) are never sampled.
    """

    def __init__(self, cfg: GRPOConfig, tokenizer, collator, reward, accelerator, reference=None):
        self.s, self.tokenizer, self.collator, self.reward = cfg.grpo, tokenizer, collator, reward
        self.acc, self.reference = accelerator, reference
        self.banned = banned_ids(tokenizer)
        self.policy = None  # set to the (unwrapped) model being trained before the first rollout

    def completion(self, ids: list[int]) -> str:
        """The reward text of one sampled row (:func:`completion_text`)."""
        return completion_text(self.tokenizer, ids, self.s.stop_strings)

    @torch.no_grad()
    def __call__(self, items: list, seed: int) -> dict:
        from accelerate.utils import send_to_device

        from medmllm.train.rewards import accuracy, format_ok

        g = self.s.group_size
        examples = [it for it in items if it is not None for _ in range(g)]
        gen = self.collator(examples)                       # left-padded prompts; a dropped prompt drops its group
        kept = set(gen["ids"])
        examples = [ex for ex in examples if ex["record"]["id"] in kept]             # one per batch row
        records = [ex["record"] for ex in examples]
        n = len(records)
        if n == 0:
            return _empty_rollout(self.reward.names)
        gen = send_to_device(gen, self.acc.device)
        with self.acc.autocast():
            tokens = sample_completions(self.policy, gen, self.tokenizer, max_new_tokens=self.s.max_new_tokens,
                                        temperature=self.s.temperature, top_p=self.s.top_p,
                                        stop_strings=self.s.stop_strings, seed=seed, banned_ids=self.banned)
        texts = [self.completion(r) for r in tokens]
        comps = [self.reward.components(t, r) for t, r in zip(texts, records)]
        rewards = torch.tensor([self.reward.total(c) for c in comps], dtype=torch.float32)          # [N]
        grouped = rewards.view(-1, g)                                                               # [N/G, G]
        mixed = (grouped.amax(1) > grouped.amin(1)).repeat_interleave(g)                            # [N]
        stats = {"rewards": rewards, "accuracy": torch.tensor([accuracy(t, r) for t, r in zip(texts, records)]),
                 "format": torch.tensor([float(format_ok(t)) for t in texts]),
                 "completion_tokens": torch.tensor([float(len(t)) for t in tokens]), "mixed_groups": mixed.float()}
        stats.update({f"reward_{k}": torch.tensor([c[k] for c in comps]) for k in self.reward.names})
        advantages = group_advantages(rewards, g, self.s.adv_eps)                                   # [N]
        if self.s.drop_uniform_groups and not bool(mixed.all()):
            rows = mixed.nonzero().flatten().tolist()
            if not rows:
                return _empty_rollout(self.reward.names, stats)
            gen = send_to_device(self.collator([examples[i] for i in rows]), self.acc.device)
            tokens, advantages = [tokens[i] for i in rows], advantages[rows]
        batch = self._sequences(gen, tokens)
        batch["advantages"] = advantages.to(self.acc.device)                                        # [N']
        with self.acc.autocast():
            batch["old_logps"] = _forward_logps(self.policy, batch).float()                         # [N', L]
            if self.reference is not None:
                batch["ref_logps"] = _forward_logps(self.reference, batch).float()                  # [N', L]
        out = {"advantages": batch.pop("advantages").cpu()}
        out.update({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        out["stats"] = stats
        return out

    def _sequences(self, gen: dict, tokens: list[list[int]]) -> dict:
        """Prompt rows (left-padded) + completions (right-padded) -> input_ids, attention, labels [N, Lp + Lc]."""
        dev = gen["input_ids"].device
        n, lc = len(tokens), max(1, max(len(t) for t in tokens))
        comp = torch.full((n, lc), int(self.tokenizer.pad_token_id), dtype=torch.long, device=dev)   # [N, Lc]
        mask = torch.zeros((n, lc), dtype=torch.long, device=dev)                                    # [N, Lc]
        for i, t in enumerate(tokens):
            if t:
                comp[i, : len(t)] = torch.tensor(t, dtype=torch.long, device=dev)
                mask[i, : len(t)] = 1
        prompt_labels = torch.full_like(gen["input_ids"], IGNORE_INDEX)                              # [N, Lp]
        return {"input_ids": torch.cat([gen["input_ids"], comp], 1),
                "attention_mask": torch.cat([gen["attention_mask"], mask], 1),
                "labels": torch.cat([prompt_labels, comp.masked_fill(mask == 0, IGNORE_INDEX)], 1),
                "modality_inputs": gen["modality_inputs"], "modality_batch_index": gen["modality_batch_index"]}


def _empty_rollout(names: list[str], stats: dict | None = None) -> dict:
    """A micro-batch with no sequences to update on; ``stats`` (of completions left out) are kept for logging."""
    z = torch.zeros(0)
    if stats is None:
        stats = {k: z for k in ("rewards", "accuracy", "format", "completion_tokens", "mixed_groups")}
        stats.update({f"reward_{k}": z for k in names})
    return {"advantages": z, "input_ids": torch.zeros((0, 1), dtype=torch.long),
            "attention_mask": torch.zeros((0, 1), dtype=torch.long),
            "labels": torch.full((0, 1), IGNORE_INDEX, dtype=torch.long), "old_logps": torch.zeros((0, 1)),
            "modality_inputs": {}, "modality_batch_index": {}, "stats": stats}


class RolloutLoader:
    """``factory(epoch, start_batch)`` for the TrainLoop: per group, ``grad_accum`` rollout micro-batches
    (from consecutive sampler batches), each yielded once per pass, ``iterations`` passes.

    A start inside a group (a checkpoint between its updates) reloads that group's saved rollouts;
    a start on a group boundary samples anew (same weights and seed as the uninterrupted run).
    """

    def __init__(self, dataset, sampler, roller: Roller, *, run_dir: Path, iterations: int, grad_accum: int,
                 seed: int, rank: int = 0):
        self.dataset, self.sampler, self.roller = dataset, sampler, roller
        self.run_dir, self.iterations, self.grad_accum = Path(run_dir), iterations, grad_accum
        self.seed, self.rank = seed, rank

    @property
    def per_group(self) -> int:
        return self.iterations * self.grad_accum

    def groups_per_epoch(self, epoch: int) -> int:
        return self.sampler.batches_per_epoch(epoch) // self.grad_accum

    def __call__(self, epoch: int, start_batch: int):
        return self._iterate(epoch, start_batch)

    def _iterate(self, epoch: int, start_batch: int):
        self.sampler.set_epoch(epoch, 0)
        batches = list(self.sampler)  # this process's index lists of the epoch
        k0, offset = divmod(start_batch, self.per_group)
        for k in range(k0, len(batches) // self.grad_accum):
            if k == k0 and offset:
                chunks = self._load(epoch, k)
            else:
                chunks = [self._rollout(batches[k * self.grad_accum + c], epoch, k, c) for c in range(self.grad_accum)]
                self._save(epoch, k, chunks)
            for m in range(offset if k == k0 else 0, self.per_group):
                yield chunks[m % self.grad_accum]

    def _rollout(self, indices: list[int], epoch: int, k: int, c: int) -> dict:
        items = [self.dataset[i] for i in indices]
        return self.roller(items, _seed(self.seed, epoch, k, c, self.rank))

    # -- saved rollouts (for a resume between the updates of one rollout) -------------------------
    def path(self, epoch: int, k: int) -> Path:
        return self.run_dir / ROLLOUT_DIR / f"rank{self.rank}_e{epoch:05d}_g{k:06d}.pt"

    def _load(self, epoch: int, k: int) -> list[dict]:
        p = self.path(epoch, k)
        if not p.is_file():
            raise InputError(p, f"resuming between the updates of rollout (epoch {epoch}, group {k}) needs its saved "
                                "rollouts, which are missing; resume from an earlier checkpoint or start afresh")
        return torch.load(p, map_location="cpu", weights_only=True)

    def _save(self, epoch: int, k: int, chunks: list[dict]) -> None:
        from medmllm.io import atomic_open

        self._prune()
        p = self.path(epoch, k)
        with atomic_open(p, "wb") as fh:
            torch.save(chunks, fh)

    def _needed(self) -> set[tuple[int, int]]:
        """(epoch, group) of every rollout some complete checkpoint stopped inside."""
        from medmllm.train import checkpoint as ckpt

        need = set()
        for c in ckpt.list_checkpoints(self.run_dir):
            try:
                data = json.loads((c / ckpt.META_FILE).read_text(encoding="utf-8")).get("data", {})
            except (OSError, ValueError):
                continue
            k, offset = divmod(int(data.get("batch", 0)), self.per_group)
            if offset:
                need.add((int(data.get("epoch", 0)), k))
        return need

    def _prune(self) -> None:
        folder = self.run_dir / ROLLOUT_DIR
        if not folder.is_dir():
            return
        need = self._needed()
        for p in folder.iterdir():
            m = _ROLLOUT_RE.match(p.name)
            if m and int(m.group(1)) == self.rank and (int(m.group(2)), int(m.group(3))) not in need:
                p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- loss

def make_loss_fn(s: GRPOSettings, reward_names: list[str]):
    """``loss_fn(model, batch)`` of the engine: the GRPO loss + rollout statistics."""
    stat_keys = ["rewards", "accuracy", "format", "completion_tokens", "mixed_groups"] + \
        [f"reward_{k}" for k in reward_names]
    shown = {"rewards": "reward", "format": "format_rate"}

    def loss_fn(model, batch: dict) -> dict:
        stats = batch["stats"]
        if batch["input_ids"].shape[0] == 0:
            zero = zero_loss(model)
            out = {"loss": zero, "kl": zero.detach(), "clip_fraction": zero.detach()}
        else:
            logp = _forward_logps(model, batch)                                        # [N, L]
            mask = batch["labels"] != IGNORE_INDEX                                     # [N, L]
            out = grpo_loss(logp, batch["old_logps"], batch.get("ref_logps"), batch["advantages"], mask,
                            s.clip_eps, s.kl_beta)
            out.pop("ratio")
        for k in stat_keys:
            v = stats[k]
            out[shown.get(k, k)] = v.float().mean() if v.numel() else torch.zeros((), device=out["loss"].device)
        return out

    return loss_fn


# ----------------------------------------------------------------------------- the recipe

def run(cfg: GRPOConfig, progress: bool = True) -> dict:
    """Train the GRPO stage; the model and tokenizer end up in ``run_dir/model``. Returns a summary."""
    from medmllm.data.collate import MultimodalCollator
    from medmllm.data.dataset import PartLoader
    from medmllm.train.dpo import MultiBaseRecords
    from medmllm.train.engine import RandomBatchSampler, TrainLoop, make_accelerator, seed_everything
    from medmllm.train.sft import load_model, make_scheduler, set_stage_trainable

    # setup ------------------------------------------------------------------
    s, t = cfg.grpo, cfg.train
    run_dir = Path(cfg.run_dir)
    seed_everything(t.seed)
    reward = make_reward(s)                                        # unknown reward names fail here
    prompts, bases, data_hash = load_prompts(cfg)                  # bad data fails before any training
    model, tokenizer = load_model(cfg.model)
    acc = make_accelerator(t.mixed_precision, t.grad_accum)
    if s.disable_dropout:
        disable_dropout(model)
    model.to(acc.device)
    reference = None
    if s.kl_beta > 0:
        reference = copy.deepcopy(model).eval()
        reference.requires_grad_(False)
    lrs = set_stage_trainable(model, "instruction", cfg.optim)
    if cfg.lora.enabled:
        from medmllm.model.lora import apply_lora

        apply_lora(model, targets={"llm": dict(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout)})
        if s.disable_dropout:
            disable_dropout(model)
    groups = model.param_groups(lrs, default_lr=cfg.optim.lr)
    optimizer = torch.optim.AdamW([{"params": g["params"], "lr": g["lr"]} for g in groups],
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.optim, t.max_steps)
    from medmllm.train.sft import data_shapes

    shapes = data_shapes(model, cfg.data)
    dataset = MultiBaseRecords(prompts, bases, PartLoader(shapes, cache_items=20000))
    collator = MultimodalCollator(tokenizer, max_length=cfg.data.max_length, num_tokens_fn=model.num_tokens,
                                  truncation=cfg.data.truncation, train=False)
    sampler = RandomBatchSampler(len(prompts), t.batch_size, seed=t.seed, num_replicas=acc.num_processes,
                                 rank=acc.process_index)
    if sampler.batches_per_epoch(0) < t.grad_accum:
        raise ConfigError(f"data: {len(prompts)} prompts make {sampler.batches_per_epoch(0)} batches of "
                          f"{t.batch_size} per epoch, fewer than train.grad_accum={t.grad_accum}")
    roller = Roller(cfg, tokenizer, collator, reward, acc, reference)
    loader = RolloutLoader(dataset, sampler, roller, run_dir=run_dir, iterations=s.iterations,
                           grad_accum=t.grad_accum, seed=t.seed, rank=acc.process_index)
    loop = TrainLoop(model, optimizer, scheduler, loader, make_loss_fn(s, reward.names), run_dir=run_dir,
                     max_steps=t.max_steps, grad_accum=t.grad_accum, log_every=t.log_every, ckpt_every=t.ckpt_every,
                     keep_last=t.keep_last, mixed_precision=t.mixed_precision, grad_clip=t.grad_clip, seed=t.seed,
                     gradient_checkpointing=t.gradient_checkpointing, tensorboard=t.tensorboard, accelerator=acc,
                     config=cfg, manifest_hash=data_hash, progress=progress)
    roller.policy = acc.unwrap_model(loop.model)
    if cfg.resume:
        loop.resume("latest")
    log.info("grpo: %d prompts, G=%d, %d update(s) per rollout, rewards %r, trainable groups %s", len(prompts),
             s.group_size, s.iterations, reward, [g["name"] for g in groups])
    # train ------------------------------------------------------------------
    result = loop.run()
    # save -------------------------------------------------------------------
    out = save_final_model(acc, loop, tokenizer, run_dir, lora=cfg.lora.enabled)
    # cleanup ----------------------------------------------------------------
    del reference
    errors = dataset.errors()
    if errors:
        log.warning("%d prompt(s) skipped for unreadable files (first: %s)", len(errors), errors[0])
    loss = result["loss"]
    return {"stage": "grpo", "steps": result["step"], "loss": None if loss is None or math.isnan(loss) else loss,
            "model": str(out), "prompts": len(prompts), "metrics": dict(loop.last_metrics), "run_dir": str(run_dir)}


__all__ = ["GRPOConfig", "GRPOSettings", "Roller", "RolloutLoader", "banned_ids", "completion_text", "disable_dropout",
           "load_prompts", "make_loss_fn", "make_reward", "rl_prompt", "run", "verifiable"]
