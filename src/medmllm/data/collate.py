"""Records + modality tensors -> padded token batches for a causal LLM with modality placeholders.

Per sample (:meth:`MultimodalCollator.encode`):

1. each message's typed parts are flattened to one string: text parts (stripped) and one
   placeholder token per modality part (``<image>``...), joined with ``part_separator``;
2. the tokenizer's chat template renders and tokenizes the conversation (training: the
   whole conversation; generation: up to the last user turn + the generation prompt);
3. the placeholders found are checked against the record's modality parts (count per
   kind, then order) and each is expanded to ``num_tokens_fn(kind, tensor)`` copies of
   its id, where the model scatters that modality's features;
4. labels are the token ids on assistant turns (content + end-of-turn token, from the
   template's ``{% generation %}`` mask, or from prefix renderings when the template has
   none) and -100 elsewhere, always -100 on placeholders and padding;
5. a sample longer than ``max_length`` is never cut inside a modality span: it is dropped
   (``truncation="drop"``) or its longest user text part is shortened until it fits
   (``truncation="shorten_text"``; dropped when no user text is left to remove).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from medmllm.data.chat_templates import has_generation_markers
from medmllm.data.records import MODALITY_PARTS
from medmllm.data.tokenizers import MODALITY_TOKENS, modality_token_ids
from medmllm.errors import ConfigError, InputError, MedmllmError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TRUNCATIONS = ("drop", "shorten_text")


class SampleDropped(MedmllmError):
    """A sample cannot fit ``max_length`` (or has nothing to train on); the batch reports it."""

    def __init__(self, id: str, reason: str):
        self.id = id
        self.reason = reason
        super().__init__(f"{id}: {reason}")


@dataclass
class EncodedSample:
    """One tokenized sample before padding. Lists have the same length L (<= max_length)."""

    id: str
    input_ids: list[int]            # [L] placeholders already expanded
    labels: list[int]               # [L] IGNORE_INDEX outside assistant turns
    kinds: list[str] = field(default_factory=list)          # modality kinds, order of appearance
    tensors: list[torch.Tensor] = field(default_factory=list)  # one per kind entry
    num_tokens: list[int] = field(default_factory=list)     # placeholder copies per entry


# ----------------------------------------------------------------------------- flattening

def _parts(content: Any) -> list[dict]:
    """Typed parts of a message (plain-string content is one text part), text stripped."""
    raw = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    return [{"type": "text", "text": p["text"].strip()} if p["type"] == "text" else {"type": p["type"]}
            for p in raw]


def flatten_content(parts: Sequence[dict], sep: str = "\n") -> str:
    """Typed parts -> one string: stripped text parts and one placeholder per modality part.

    Empty text parts are skipped; pieces are joined with ``sep``, e.g.
    ``[image, text "Is there...?"]`` -> ``"<image>\\nIs there...?"``.
    """
    pieces = []
    for p in parts:
        if p["type"] == "text":
            if p["text"].strip():
                pieces.append(p["text"].strip())
        else:
            pieces.append(MODALITY_TOKENS[p["type"]])
    return sep.join(pieces)


def flatten_messages(messages: Sequence[dict], sep: str = "\n") -> list[dict]:
    """Record messages -> ``[{"role", "content": str}]`` as chat templates expect."""
    return [{"role": m["role"], "content": flatten_content(_parts(m["content"]), sep)} for m in messages]


def _kinds(messages: Sequence[dict]) -> list[str]:
    return [p["type"] for m in messages for p in _parts(m["content"]) if p["type"] != "text"]


# ----------------------------------------------------------------------------- collator

class MultimodalCollator:
    """Collate ``[{"record": dict, "modalities": [(kind, tensor), ...]}, ...]`` into a batch.

    ``modalities`` lists one ``(kind, tensor)`` per modality part of ``record["messages"]``,
    in order of appearance (tensors or numpy arrays, any shape). ``num_tokens_fn(kind,
    tensor) -> int >= 1`` is how many feature tokens the encoder+projector yields for it.

    ``train=True``: the whole conversation, labels on assistant turns; a sample without any
    assistant token is dropped. ``train=False`` (generation): trailing assistant messages
    are removed, the generation prompt is added, labels are all IGNORE_INDEX.
    ``padding_side``: "right" (default when training) or "left" (default for generation).
    ``stack_modalities``: stack (zero-padding differing shapes) each kind's tensors into one
    tensor, else keep lists.

    Only ``record["messages"]`` is used (SFT / generation); preference ``chosen``/``rejected``
    lists need their own collation.

    Raises InputError (record id as path) when placeholders and modality parts disagree,
    ConfigError for a bad setting or tokenizer. See :meth:`__call__` for the batch keys.
    """

    def __init__(self, tokenizer, max_length: int, num_tokens_fn: Callable[[str, torch.Tensor], int],
                 truncation: str = "drop", train: bool = True, padding_side: str | None = None,
                 stack_modalities: bool = True, part_separator: str = "\n",
                 pad_to_multiple_of: int | None = None):
        if truncation not in TRUNCATIONS:
            raise ConfigError(f"truncation: expected one of {TRUNCATIONS}, got {truncation!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ConfigError(f"max_length: expected an int >= 1, got {max_length!r}")
        padding_side = padding_side or ("right" if train else "left")
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
        if tokenizer.pad_token_id is None:
            raise ConfigError("tokenizer: expected a pad token, found none; call "
                              "medmllm.data.tokenizers.ensure_pad_token(tokenizer)")
        if not tokenizer.chat_template:
            raise ConfigError("tokenizer: expected a chat template, found none; call "
                              "medmllm.data.tokenizers.set_chat_template(tokenizer, family)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.num_tokens_fn = num_tokens_fn
        self.truncation = truncation
        self.train = train
        self.padding_side = padding_side
        self.stack_modalities = stack_modalities
        self.part_separator = part_separator
        self.pad_to_multiple_of = pad_to_multiple_of
        self.placeholder_ids: dict[str, int] = modality_token_ids(tokenizer)
        self._kind_of_id = {i: k for k, i in self.placeholder_ids.items()}
        self.uses_generation_markers = has_generation_markers(tokenizer.get_chat_template())
        self._warned = False

    # ------------------------------------------------------------------ batch

    def __call__(self, examples: Sequence[dict]) -> dict:
        """Encode, drop what cannot fit, pad. Returns a dict (B = kept samples, L = longest)::

            input_ids            LongTensor [B, L]   pad_token_id on padding
            attention_mask       LongTensor [B, L]   1 on tokens, 0 on padding
            labels               LongTensor [B, L]   -100 except assistant tokens
            modality_inputs      {kind: Tensor [N_kind, *S_max] | list[Tensor]}  batch order,
                                 then order of appearance; zero-padded to the largest shape
            modality_masks       {kind: BoolTensor [N_kind, *S_max] | None}  True on real values
            modality_batch_index {kind: LongTensor [N_kind]}  sample row of each item
            modality_order       list[list[str]]  per sample, kinds in placeholder order
            modality_num_tokens  list[list[int]]  per sample, placeholder copies per item
            ids                  list[str]  record ids of the B kept samples
            dropped              list[{"id", "reason"}]  samples left out of the batch
        """
        samples, dropped = [], []
        for ex in examples:
            try:
                samples.append(self.encode(ex))
            except SampleDropped as d:
                dropped.append({"id": d.id, "reason": d.reason})
        if dropped and not self._warned:
            self._warned = True
            logger.warning("MultimodalCollator drops samples it cannot fit (first: %s: %s); "
                           "every batch lists them under 'dropped' (this warning is shown once)",
                           dropped[0]["id"], dropped[0]["reason"])
        batch = self._pad_tokens(samples)
        batch.update(self._batch_modalities(samples))
        batch["ids"] = [s.id for s in samples]
        batch["dropped"] = dropped
        return batch

    def _pad_tokens(self, samples: list[EncodedSample]) -> dict:
        B = len(samples)
        L = max((len(s.input_ids) for s in samples), default=0)
        if self.pad_to_multiple_of and L % self.pad_to_multiple_of:
            L += self.pad_to_multiple_of - L % self.pad_to_multiple_of
        input_ids = torch.full((B, L), self.tokenizer.pad_token_id, dtype=torch.long)  # [B, L]
        attention = torch.zeros((B, L), dtype=torch.long)                             # [B, L]
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)                   # [B, L]
        for b, s in enumerate(samples):
            n = len(s.input_ids)
            sl = slice(0, n) if self.padding_side == "right" else slice(L - n, L)
            input_ids[b, sl] = torch.tensor(s.input_ids, dtype=torch.long)
            labels[b, sl] = torch.tensor(s.labels, dtype=torch.long)
            attention[b, sl] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def _batch_modalities(self, samples: list[EncodedSample]) -> dict:
        inputs, masks, index = {}, {}, {}
        for kind in MODALITY_PARTS:
            items = [(b, t) for b, s in enumerate(samples) for k, t in zip(s.kinds, s.tensors) if k == kind]
            if not items:
                continue
            index[kind] = torch.tensor([b for b, _ in items], dtype=torch.long)  # [N_kind]
            tensors = [t for _, t in items]
            inputs[kind], masks[kind] = _stack(tensors) if self.stack_modalities else (tensors, None)
        return {"modality_inputs": inputs, "modality_masks": masks, "modality_batch_index": index,
                "modality_order": [list(s.kinds) for s in samples],
                "modality_num_tokens": [list(s.num_tokens) for s in samples]}

    # ------------------------------------------------------------------ one sample

    def encode(self, example: dict) -> EncodedSample:
        """Tokenize one example (unpadded); raises SampleDropped when it cannot be kept."""
        rec = example["record"]
        rid = str(rec.get("id") or "<record>")
        if not isinstance(rec.get("messages"), list) or not rec["messages"]:
            raise InputError(rid, f"messages: expected a non-empty list, got {rec.get('messages')!r:.80}")
        messages = [{"role": m["role"], "parts": _parts(m["content"])} for m in rec["messages"]]
        all_kinds = [p["type"] for m in messages for p in m["parts"] if p["type"] != "text"]
        mods = _check_modalities(rid, example.get("modalities") or [], all_kinds)
        if not self.train:
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()
            if not messages:
                raise InputError(rid, "messages: expected a user message to prompt with, found only assistant ones")
        n_kept = sum(p["type"] != "text" for m in messages for p in m["parts"])
        mods = mods[:n_kept]  # generation: parts of removed assistant messages come last
        num_tokens = [self._num_tokens(k, t) for k, t in mods]
        sample = self._encode_messages(rid, messages, mods, num_tokens)
        if self.train and all(lab == IGNORE_INDEX for lab in sample.labels):
            raise SampleDropped(rid, "no assistant tokens to train on")
        if len(sample.input_ids) > self.max_length:
            if self.truncation == "drop":
                raise SampleDropped(rid, f"length {len(sample.input_ids)} > max_length {self.max_length} "
                                         "(truncation='drop')")
            sample = self._shorten(rid, messages, mods, num_tokens, sample)
        return sample

    def _num_tokens(self, kind: str, tensor: torch.Tensor) -> int:
        n = self.num_tokens_fn(kind, tensor)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"num_tokens_fn({kind!r}, tensor of shape {tuple(tensor.shape)}): "
                              f"expected an int >= 1, got {n!r}")
        return n

    def _encode_messages(self, rid: str, messages: list[dict], mods: list[tuple[str, torch.Tensor]],
                         num_tokens: list[int]) -> EncodedSample:
        chat = [{"role": m["role"], "content": flatten_content(m["parts"], self.part_separator)}
                for m in messages]
        ids, assistant = self._render(rid, chat)  # [T], [T] before expansion
        kinds = [k for k, _ in mods]
        self._check_placeholders(rid, ids, kinds)
        out_ids: list[int] = []
        labels: list[int] = []
        j = 0
        for tid, is_assistant in zip(ids, assistant):
            if tid in self._kind_of_id:
                out_ids.extend([tid] * num_tokens[j])
                labels.extend([IGNORE_INDEX] * num_tokens[j])
                j += 1
            else:
                out_ids.append(tid)
                labels.append(tid if is_assistant else IGNORE_INDEX)
        return EncodedSample(rid, out_ids, labels, kinds, [t for _, t in mods], list(num_tokens))

    def _check_placeholders(self, rid: str, ids: list[int], kinds: list[str]) -> None:
        found = [self._kind_of_id[i] for i in ids if i in self._kind_of_id]
        want, got = Counter(kinds), Counter(found)
        for kind in MODALITY_PARTS:
            if want[kind] != got[kind]:
                raise InputError(rid, f"expected {want[kind]} {kind} placeholders for {want[kind]} {kind} parts, "
                                      f"found {got[kind]}")
        if found != kinds:
            raise InputError(rid, f"expected modality placeholders in the order of the parts {kinds}, found {found}")

    # ------------------------------------------------------------------ rendering

    def _apply(self, rid: str, chat: list[dict], **kw):
        import jinja2

        try:
            return self.tokenizer.apply_chat_template(chat, **kw)
        except jinja2.TemplateError as exc:
            raise InputError(rid, f"the chat template rejected the conversation: {exc}") from None

    def _render(self, rid: str, chat: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids of the rendered chat and a 0/1 assistant mask of the same length."""
        if not self.train:
            ids = list(self._apply(rid, chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
            return ids, [0] * len(ids)
        if self.uses_generation_markers:
            out = self._apply(rid, chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            return list(out["input_ids"]), list(out["assistant_masks"])
        text = self._apply(rid, chat, tokenize=False)
        spans = self._assistant_char_spans(rid, chat, text)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [int(any(s < end and e > start for start, end in spans) and e > s)
                for s, e in enc["offset_mapping"]]
        return list(enc["input_ids"]), mask

    def _assistant_char_spans(self, rid: str, chat: list[dict], full: str) -> list[tuple[int, int]]:
        """Fallback for templates without generation markers: char spans of assistant turns.

        Turn i spans from the end of ``render(chat[:i], add_generation_prompt=True)`` to the
        end of ``render(chat[:i+1])`` minus trailing whitespace (so content + end-of-turn
        token, without the newline after it). Requires a prefix-stable template.
        """
        spans = []
        for i, m in enumerate(chat):
            if m["role"] != "assistant":
                continue
            if i == 0:
                raise InputError(rid, "messages[0].role: expected a system or user message before the "
                                      "first assistant message, got 'assistant'")
            prefix = self._apply(rid, chat[:i], add_generation_prompt=True, tokenize=False)
            upto = self._apply(rid, chat[: i + 1], tokenize=False)
            if not (upto.startswith(prefix) and full.startswith(upto)):
                raise ConfigError("chat template: it has no {% generation %} markers and is not prefix-stable "
                                  "(rendering the first messages is not a prefix of rendering more), so "
                                  "assistant turns cannot be located; use "
                                  "medmllm.data.tokenizers.set_chat_template(tokenizer, family)")
            spans.append((len(prefix), len(upto.rstrip())))
        return spans

    # ------------------------------------------------------------------ truncation

    def _shorten(self, rid: str, messages: list[dict], mods, num_tokens, sample: EncodedSample) -> EncodedSample:
        """Cut tokens off the end of the longest user text part until the sample fits.

        Placeholders and assistant turns are never touched; every round re-renders the
        whole conversation, so modality spans stay whole. SampleDropped when the user text
        runs out first.
        """
        messages = [{"role": m["role"], "parts": [dict(p) for p in m["parts"]]} for m in messages]
        original = len(sample.input_ids)
        while len(sample.input_ids) > self.max_length:
            cands = [(len(self._text_offsets(p["text"])), mi, pi)
                     for mi, m in enumerate(messages) if m["role"] == "user"
                     for pi, p in enumerate(m["parts"]) if p["type"] == "text" and p["text"]]
            if not cands:
                raise SampleDropped(rid, f"length {original} > max_length {self.max_length} and still "
                                         f"{len(sample.input_ids)} with all user text removed "
                                         "(truncation='shorten_text')")
            n, mi, pi = max(cands, key=lambda c: (c[0], -c[1], -c[2]))  # longest, first on ties
            part = messages[mi]["parts"][pi]
            part["text"] = self._cut_text(part["text"], n - (len(sample.input_ids) - self.max_length))
            sample = self._encode_messages(rid, messages, mods, num_tokens)
        return sample

    def _text_offsets(self, text: str) -> list[tuple[int, int]]:
        return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

    def _cut_text(self, text: str, keep: int) -> str:
        """The first ``keep`` tokens of ``text`` (as text, right-stripped); always shorter than ``text``."""
        offsets = self._text_offsets(text)
        keep = max(0, min(keep, len(offsets) - 1))
        while keep > 0 and offsets[keep - 1][1] >= len(text):
            keep -= 1
        return text[: offsets[keep - 1][1]].rstrip() if keep > 0 else ""


# ----------------------------------------------------------------------------- helpers

def _check_modalities(rid: str, mods: Sequence, kinds: list[str]) -> list[tuple[str, torch.Tensor]]:
    """``(kind, tensor)`` pairs matching the record's modality parts one to one, in order."""
    got = []
    for item in mods:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and item[0] in MODALITY_PARTS):
            raise InputError(rid, f"modalities: expected (kind, tensor) pairs with kind in {MODALITY_PARTS}, "
                                  f"got {item!r:.80}")
        got.append((item[0], torch.as_tensor(item[1])))
    if [k for k, _ in got] != kinds:
        raise InputError(rid, f"modalities: expected {len(kinds)} tensors of kinds {kinds} (the record's "
                              f"modality parts in order), got {len(got)} of kinds {[k for k, _ in got]}")
    return got


def _stack(tensors: list[torch.Tensor]) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | None]:
    """Stack to [N, *S_max], zero-padding smaller tensors at the end of each dim; bool mask of real values.

    Tensors of different ranks cannot be stacked: returned as a list with mask None.
    """
    if len({t.dim() for t in tensors}) > 1:
        return list(tensors), None
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    out = torch.zeros((len(tensors), *shape), dtype=dtype)       # [N, *S_max]
    mask = torch.zeros((len(tensors), *shape), dtype=torch.bool)  # [N, *S_max]
    for i, t in enumerate(tensors):
        region = (i, *(slice(0, n) for n in t.shape))
        out[region] = t.to(dtype)
        mask[region] = True
    return out, mask
