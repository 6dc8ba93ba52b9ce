"""Existing pretrained medical MLLMs "as they are", behind one ``generate(messages)`` call.

Supported Hugging Face families (``config.model_type``): ``llava`` (LLaVA-1.5 and the
``-hf`` conversions of LLaVA-Med), ``qwen2_vl`` / ``qwen2_5_vl`` (Qwen2-VL, Qwen2.5-VL
and their medical fine-tunes) and ``gemma3`` (Gemma 3, MedGemma). Each checkpoint is
used with its own tokenizer, chat template and image processor (the PIL backend, so
torchvision is never needed); medmllm's DICOM / NIfTI loading
(:mod:`medmllm.data.loading`) sits in front.

>>> mllm = load_pretrained("google/medgemma-4b-it", dtype="bfloat16")   # doctest: +SKIP
>>> mllm.generate([{"role": "user", "content": [
...     {"type": "image", "path": "ct.dcm", "options": {"window": "lung"}},
...     {"type": "text", "text": "Describe the findings."}]}])            # doctest: +SKIP

How the inputs are built (the same steps the families' HF processors take, done here
so no processor class, and hence no torchvision, is required):

1. **Prompt.** Messages in medmllm's typed-part format are rendered with the
   checkpoint's chat template: the processor's (``chat_template.json`` or
   ``processor_config.json``) if it has one, else the tokenizer's, else a documented
   fallback (:data:`FALLBACK_TEMPLATES`). A template that reads typed content (it
   mentions ``type``) gets HF's ``[{"type": "image"}, {"type": "text", "text": ...}]``
   content; any other gets one string per message: stripped text parts and one image
   placeholder per image, joined by ``"\\n"`` (as :func:`medmllm.data.collate.flatten_content`).
   Placeholders: llava ``<image>``; Qwen ``<|vision_start|><|image_pad|><|vision_end|>``;
   Gemma 3 ``<start_of_image>`` (token strings read from the config's token ids).
2. **Images.** Every ``image`` part goes through :func:`~medmllm.data.loading.load_part_images`
   (a volume becomes ``n_slices`` axial slices, i.e. that many images) and then the
   checkpoint's image processor.
3. **Expansion.** Each placeholder is replaced by as many image tokens as the vision
   tower yields for that image: llava ``(H // patch) * (W // patch)`` of the processed
   image, ``+ num_additional_image_tokens`` (1 for CLIP's CLS token) ``- 1`` under
   ``vision_feature_select_strategy="default"``; Qwen ``t * h * w // merge_size**2``
   from ``image_grid_thw``; Gemma 3 ``"\\n\\n<start_of_image>" + <image_soft_token> *
   mm_tokens_per_image + "<end_of_image>\\n\\n"``.
4. **Tensors.** Left-padded ``input_ids`` / ``attention_mask``, ``pixel_values`` in the
   model's dtype, plus ``image_grid_thw`` and ``mm_token_type_ids`` (Qwen, for M-RoPE)
   or ``token_type_ids`` (Gemma 3, bidirectional attention over image tokens).
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from medmllm.data.loading import DEFAULT_VOLUME_SLICES, load_part_images
from medmllm.errors import ConfigError, InputError

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "gemma3")

_MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
}

# LLaVA-1.5 conversation style ("USER: <image>\n... ASSISTANT:"), used by the llava-hf
# checkpoints when no chat template is shipped.
LLAVA_FALLBACK_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + message['content'] + ' ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)


def _medmllm_template(family: str) -> str:
    from medmllm.data.chat_templates import get_chat_template

    return get_chat_template(family).template


# Used only when neither the processor nor the tokenizer ships a chat template:
# llava -> LLaVA-1.5 style; Qwen -> ChatML with Qwen's default system prompt; Gemma 3 ->
# Gemma turns (system folded into the first user turn). All take string content.
FALLBACK_TEMPLATES = {
    "llava": lambda: LLAVA_FALLBACK_TEMPLATE,
    "qwen2_vl": lambda: _medmllm_template("qwen2"),
    "qwen2_5_vl": lambda: _medmllm_template("qwen2"),
    "gemma3": lambda: _medmllm_template("gemma"),
}

_TYPED_CONTENT_RE = re.compile(r"""['"]type['"]|\.type\b""")
_PART_TYPES = ("text", "image", "volume")
_ROLES = ("system", "user", "assistant")


# ============================================================================ families

def _token_str(tokenizer, token_id: int | None, what: str) -> str:
    """The token string of ``token_id`` (a config id); ConfigError if the tokenizer lacks it."""
    if token_id is None:
        raise ConfigError(f"model config: {what} token id is not set")
    tok = tokenizer.convert_ids_to_tokens(int(token_id))
    if tok is None or tokenizer.convert_tokens_to_ids(tok) != int(token_id):
        raise ConfigError(f"tokenizer: the config's {what} token id {token_id} is not in the vocabulary "
                          f"(size {len(tokenizer)}); tokenizer and model do not match")
    enc = tokenizer(tok, add_special_tokens=False)["input_ids"]
    if list(enc) != [int(token_id)]:
        raise ConfigError(f"tokenizer: {what} token {tok!r} encodes to {list(enc)}, expected the single id "
                          f"{token_id}; it must be a special (never split) token")
    return tok


class _Family:
    """Family-specific pieces: placeholder, image processing, expansion, extra inputs.

    ``marker``: the token whose occurrences in the rendered prompt mark the images, one
    per image; ``placeholder``: what string-content prompts get per image;
    ``image_token_id``: the id the model replaces with image features.
    """

    name = ""
    marker = placeholder = image_token = ""
    image_token_id = -1
    reserved: tuple[str, ...] = ()
    tight = False  # string content: no "\n" around placeholders (the expansion adds its own)

    def __init__(self, config, tokenizer, image_processor, processor_config: Mapping[str, Any]):
        self.config, self.tokenizer, self.image_processor = config, tokenizer, image_processor
        self.processor_config = dict(processor_config)

    def process_images(self, images: list) -> tuple[dict, list[int]]:
        """PIL images -> (model tensors, image tokens per image)."""
        raise NotImplementedError

    def expansion(self, n_tokens: int) -> str:
        """What one ``marker`` becomes for an image of ``n_tokens`` tokens."""
        return self.image_token * n_tokens

    def extra_inputs(self, input_ids) -> dict:
        return {}


class _Llava(_Family):
    name = "llava"

    def __init__(self, config, tokenizer, image_processor, processor_config):
        super().__init__(config, tokenizer, image_processor, processor_config)
        self.image_token_id = int(config.image_token_id)
        self.image_token = self.marker = self.placeholder = _token_str(tokenizer, self.image_token_id, "image")
        self.reserved = (self.image_token,)
        vision = config.vision_config
        self.patch = int(vision.patch_size)
        default_extra = 1 if "clip" in str(getattr(vision, "model_type", "")) else 0  # CLIP has a CLS token
        self.additional = int(self.processor_config.get("num_additional_image_tokens", default_extra))
        self.strategy = getattr(config, "vision_feature_select_strategy", "default")

    def process_images(self, images):
        out = self.image_processor(images=images, return_tensors="pt")
        h, w = out["pixel_values"].shape[-2:]  # (N, 3, H, W)
        n = (h // self.patch) * (w // self.patch) + self.additional - (1 if self.strategy == "default" else 0)
        return {"pixel_values": out["pixel_values"]}, [int(n)] * len(images)


class _Qwen2VL(_Family):
    name = "qwen2_vl"

    def __init__(self, config, tokenizer, image_processor, processor_config):
        super().__init__(config, tokenizer, image_processor, processor_config)
        self.image_token_id = int(config.image_token_id)
        self.image_token = self.marker = _token_str(tokenizer, self.image_token_id, "image")
        start = _token_str(tokenizer, config.vision_start_token_id, "vision start")
        end = _token_str(tokenizer, config.vision_end_token_id, "vision end")
        self.placeholder = start + self.image_token + end
        self.reserved = (self.image_token, start, end)
        self.merge = int(image_processor.merge_size)
        merge_cfg = int(config.vision_config.spatial_merge_size)
        if self.merge != merge_cfg:
            raise ConfigError(f"image processor merge_size {self.merge} differs from the model's "
                              f"vision_config.spatial_merge_size {merge_cfg}")

    def process_images(self, images):
        out = self.image_processor(images=images, return_tensors="pt")
        grid = out["image_grid_thw"]  # (N, 3): t, h, w in patches
        counts = [int(g.prod()) // self.merge ** 2 for g in grid]
        return {"pixel_values": out["pixel_values"], "image_grid_thw": grid}, counts

    def extra_inputs(self, input_ids):
        return {"mm_token_type_ids": (input_ids == self.image_token_id).int()}  # 1 = image (M-RoPE)


class _Qwen25VL(_Qwen2VL):
    name = "qwen2_5_vl"


class _Gemma3(_Family):
    name = "gemma3"
    tight = True

    def __init__(self, config, tokenizer, image_processor, processor_config):
        super().__init__(config, tokenizer, image_processor, processor_config)
        self.image_token_id = int(config.image_token_id)
        self.image_token = _token_str(tokenizer, self.image_token_id, "image")
        self.boi = self.marker = self.placeholder = _token_str(tokenizer, config.boi_token_id, "begin-of-image")
        self.eoi = _token_str(tokenizer, config.eoi_token_id, "end-of-image")
        self.reserved = (self.image_token, self.boi, self.eoi)
        self.n_tokens = int(config.mm_tokens_per_image)

    def process_images(self, images):
        out = self.image_processor(images=images, return_tensors="pt", do_pan_and_scan=False)
        return {"pixel_values": out["pixel_values"]}, [self.n_tokens] * len(images)

    def expansion(self, n_tokens):
        return f"\n\n{self.boi}{self.image_token * n_tokens}{self.eoi}\n\n"

    def extra_inputs(self, input_ids):
        return {"token_type_ids": (input_ids == self.image_token_id).long()}  # 1 = image


_FAMILY_CLASSES = {"llava": _Llava, "qwen2_vl": _Qwen2VL, "qwen2_5_vl": _Qwen25VL, "gemma3": _Gemma3}


# ============================================================================ messages

def _as_batch(messages: Any) -> tuple[list[list[dict]], bool]:
    """One conversation (list of messages) or a list of them -> (conversations, was_single)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages", f"expected a non-empty list of messages (or of conversations), "
                                     f"got {type(messages).__name__ if messages is not None else None}")
    if isinstance(messages[0], Mapping):
        return [list(messages)], True
    convs = []
    for i, conv in enumerate(messages):
        if not isinstance(conv, (list, tuple)) or not conv or not isinstance(conv[0], Mapping):
            raise InputError(f"messages[{i}]", "expected a non-empty list of message objects in a batch")
        convs.append(list(conv))
    return convs, False


def _parts(content: Any, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, (list, tuple)) or not content:
        raise InputError(where, f"expected a string or a non-empty list of parts, got {content!r:.80}")
    out = []
    for j, p in enumerate(content):
        if not isinstance(p, Mapping) or p.get("type") not in _PART_TYPES:
            got = p.get("type") if isinstance(p, Mapping) else type(p).__name__
            raise InputError(f"{where}[{j}]", f"expected a part of type {_PART_TYPES} "
                                              f"(image-text models take no signal/ehr parts), got {got!r}")
        if p["type"] == "text" and not isinstance(p.get("text"), str):
            raise InputError(f"{where}[{j}].text", f"expected a string, got {p.get('text')!r:.80}")
        out.append(dict(p))
    return out


def _check_conversation(conv: list, where: str) -> list[tuple[str, list[dict]]]:
    """Validate one conversation -> ``[(role, parts)]``."""
    out = []
    for i, m in enumerate(conv):
        if not isinstance(m, Mapping) or m.get("role") not in _ROLES:
            got = m.get("role") if isinstance(m, Mapping) else type(m).__name__
            raise InputError(f"{where}[{i}].role", f"expected one of {_ROLES}, got {got!r}")
        out.append((m["role"], _parts(m.get("content"), f"{where}[{i}].content")))
    return out


@dataclass
class _Prepared:
    """One conversation ready to render: messages with one marker per image, and the images."""

    turns: list[tuple[str, list[dict]]]
    images: list = field(default_factory=list)           # PIL images, in prompt order


# ============================================================================ the model

class PretrainedMLLM:
    """A loaded checkpoint: ``model``, ``tokenizer``, ``image_processor`` and its ``family``.

    ``chat_template`` is the template used (processor's, tokenizer's or the fallback);
    ``template_source`` says which. ``n_slices`` is how many slices a volume part
    becomes (2D models only see images).
    """

    def __init__(self, model, tokenizer, image_processor, family: str, *, chat_template: str | None = None,
                 template_source: str = "tokenizer", processor_config: Mapping[str, Any] | None = None,
                 n_slices: int = DEFAULT_VOLUME_SLICES):
        if family not in _FAMILY_CLASSES:
            raise ConfigError(f"unknown family {family!r}; supported: {', '.join(FAMILIES)}")
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.family = family
        self.spec: _Family = _FAMILY_CLASSES[family](model.config, tokenizer, image_processor, processor_config or {})
        if chat_template is None:
            chat_template, template_source = FALLBACK_TEMPLATES[family](), "fallback"
        self.chat_template, self.template_source = chat_template, template_source
        if isinstance(n_slices, bool) or not isinstance(n_slices, int) or n_slices < 1:
            raise ConfigError(f"n_slices must be a positive integer, got {n_slices!r}")
        self.n_slices = n_slices
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    # ----------------------------------------------------------------- prompt
    def _load(self, conv: list, where: str, base_dir) -> _Prepared:
        turns = _check_conversation(conv, where)
        prepared = _Prepared(turns=[])
        for i, (role, parts) in enumerate(turns):
            new_parts = []
            for j, p in enumerate(parts):
                if p["type"] == "text":
                    self._check_text(p["text"], f"{where}[{i}].content[{j}]")
                    new_parts.append(p)
                    continue
                images = load_part_images(p, base_dir, n_slices=self.n_slices)
                prepared.images.extend(images)
                new_parts.extend({"type": "image"} for _ in images)
            prepared.turns.append((role, new_parts))
        return prepared

    def _check_text(self, text: str, where: str) -> None:
        for tok in self.spec.reserved:
            if tok in text:
                raise InputError(where, f"text contains the reserved image token {tok!r}; put images in "
                                        "image parts, not in text")

    def _string_messages(self, turns) -> list[dict]:
        """String content: stripped texts and placeholders joined by ``"\\n"`` (no separator next to a
        placeholder whose expansion brings its own newlines, as Gemma 3's does)."""
        msgs = []
        for role, parts in turns:
            content, prev_image = "", None
            for p in parts:
                is_image = p["type"] != "text"
                piece = self.spec.placeholder if is_image else p["text"].strip()
                if not piece:
                    continue
                tight = self.spec.tight and (is_image or prev_image)
                content += ("" if prev_image is None or tight else "\n") + piece
                prev_image = is_image
            msgs.append({"role": role, "content": content})
        return msgs

    @staticmethod
    def _typed_messages(turns) -> list[dict]:
        return [{"role": role, "content": [{"type": "text", "text": p["text"]} if p["type"] == "text"
                                           else {"type": "image"} for p in parts]} for role, parts in turns]

    def _apply(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def render(self, turns, n_images: int, where: str = "messages") -> str:
        """Chat-template text with exactly one ``marker`` per image (not yet expanded)."""
        forms = ["typed", "string"] if _TYPED_CONTENT_RE.search(self.chat_template) else ["string"]
        problems = []
        for form in forms:
            msgs = self._typed_messages(turns) if form == "typed" else self._string_messages(turns)
            try:
                text = self._apply(msgs)
            except Exception as exc:  # noqa: BLE001 - a template may reject one content form
                problems.append(f"{form} content: {type(exc).__name__}: {exc}")
                continue
            found = text.count(self.spec.marker)
            if found == n_images and "{'type'" not in text:
                return text
            problems.append(f"{form} content: {found} {self.spec.marker!r} markers for {n_images} images")
        raise ConfigError(f"{where}: the {self.template_source} chat template did not place one image marker "
                          f"per image ({'; '.join(problems)})")

    @staticmethod
    def _expand(text: str, marker: str, expansions: list[str]) -> str:
        pieces = text.split(marker)
        out = [pieces[0]]
        for exp, rest in zip(expansions, pieces[1:]):
            out.extend([exp, rest])
        return "".join(out)

    # ----------------------------------------------------------------- inputs
    def prepare_inputs(self, messages: Any, base_dir: str | os.PathLike = ".", return_counts: bool = False):
        """Messages (one conversation or a batch) -> the tensors ``model.generate`` takes.

        Returns a dict with ``input_ids`` / ``attention_mask`` ``[B, L]`` (left-padded), and
        when there are images ``pixel_values`` (model dtype) plus the family's extras, on
        the model's device. ``return_counts=True`` returns ``(inputs, counts)`` where
        ``counts[i]`` is the number of image tokens of image ``i`` (batch order); their sum
        is the number of image tokens in ``input_ids`` (checked here).
        """
        import torch

        convs, _ = _as_batch(messages)
        prepared = [self._load(c, f"messages[{i}]" if len(convs) > 1 else "messages", base_dir)
                    for i, c in enumerate(convs)]
        images = [im for p in prepared for im in p.images]
        tensors, counts = self.spec.process_images(images) if images else ({}, [])
        texts, k = [], 0
        for i, p in enumerate(prepared):
            text = self.render(p.turns, len(p.images), f"messages[{i}]")
            n = len(p.images)
            texts.append(self._expand(text, self.spec.marker, [self.spec.expansion(c) for c in counts[k:k + n]]))
            k += n
        bos = self.tokenizer.bos_token
        add_special = not (bos and all(t.startswith(bos) for t in texts))
        enc = self.tokenizer(texts, add_special_tokens=add_special, padding=True, padding_side="left",
                             return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        found = int((inputs["input_ids"] == self.spec.image_token_id).sum())
        if found != sum(counts):
            raise InputError("messages", f"expected {sum(counts)} image tokens in the prompt, found {found} "
                                         "(a template or tokenizer split or dropped image tokens)")
        if images:
            inputs.update(self.spec.extra_inputs(inputs["input_ids"]))
            inputs.update(tensors)
        device, dtype = self.model.device, self.model.dtype
        out = {k: (v.to(device=device, dtype=dtype) if k == "pixel_values" else v.to(device))
               for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        return (out, counts) if return_counts else out

    # ----------------------------------------------------------------- generation
    def generate(self, messages: Any, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, stop_strings: str | Sequence[str] | None = None,
                 base_dir: str | os.PathLike = ".") -> str | list[str]:
        """Answer one conversation (-> ``str``) or a batch of them (-> ``list[str]``).

        Only the new tokens are decoded (special tokens skipped). ``do_sample=False`` is
        greedy and deterministic; ``temperature`` / ``top_p`` apply when sampling.
        ``stop_strings``: generation stops at the first one and the returned text is cut
        before it. Image paths are relative to ``base_dir``.
        """
        import torch

        _, single = _as_batch(messages)
        kwargs = _generation_kwargs(max_new_tokens, do_sample, temperature, top_p, stop_strings)
        stops = kwargs.get("stop_strings") or []
        inputs = self.prepare_inputs(messages, base_dir)
        if stops:
            kwargs["tokenizer"] = self.tokenizer
        eos = self._eos_ids()
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs, pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=eos or None)
        new = out[:, inputs["input_ids"].shape[1]:]
        texts = [_cut(t, stops) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return texts[0] if single else texts

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        for e in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])) + [self.tokenizer.eos_token_id]:
            if e is not None and int(e) < len(self.tokenizer) and int(e) not in ids:
                ids.append(int(e))
        return ids


def _cut(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def _generation_kwargs(max_new_tokens, do_sample, temperature, top_p, stop_strings) -> dict:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(do_sample, bool):
        raise ConfigError(f"do_sample must be a bool, got {do_sample!r}")
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    if do_sample:
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")
        kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=None)
    else:  # greedy: neutralise sampling settings a checkpoint's generation_config may carry
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if stop_strings is not None:
        stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not stops or not all(isinstance(s, str) and s for s in stops):
            raise ConfigError(f"stop_strings must be a non-empty string or list of them, got {stop_strings!r}")
        kwargs["stop_strings"] = stops
    return kwargs


# ============================================================================ loading

def _optional_json(name_or_path: str, filename: str, **hub_kwargs) -> dict:
    """A small JSON file of the checkpoint (local folder or hub cache), or ``{}`` if absent."""
    import json

    from transformers.utils import cached_file

    try:
        path = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **hub_kwargs)
    except OSError:
        return {}
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def _processor_template(name_or_path: str, processor_config: dict, **hub_kwargs) -> str | None:
    """The processor's own chat template (legacy ``chat_template.json`` or processor config)."""
    template = _optional_json(name_or_path, "chat_template.json", **hub_kwargs).get("chat_template")
    template = template or processor_config.get("chat_template")
    return template if isinstance(template, str) and template else None


def _resolve_dtype(dtype: Any):
    import torch

    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ConfigError(f"dtype must be None, 'auto', a torch.dtype or its name ('bfloat16', 'float32' ...), "
                      f"got {dtype!r}")


def detect_family(config) -> str:
    """The supported family of a transformers config (its ``model_type``), or ConfigError."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(f"unsupported model_type {model_type!r}; supported: {', '.join(FAMILIES)}")
    return model_type


def load_pretrained(name_or_path: str | os.PathLike, *, family: str | None = None, dtype: Any = None,
                    device: str = "cpu", trust_remote_code: bool = False, local_files_only: bool = False,
                    n_slices: int = DEFAULT_VOLUME_SLICES) -> PretrainedMLLM:
    """Load a hub id or a local ``save_pretrained`` folder as a :class:`PretrainedMLLM`.

    ``family`` defaults to ``config.model_type`` (one of :data:`FAMILIES`; anything else
    is a ConfigError listing them); giving it forces that family's model class.
    ``dtype``: ``None`` / ``"auto"`` keeps the checkpoint's, or a torch dtype (name).
    The image processor is loaded with the PIL backend. A missing folder or unreachable
    id raises InputError naming it.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    name = str(name_or_path)
    hub = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    try:
        config = AutoConfig.from_pretrained(name, **hub)
    except (OSError, ValueError) as exc:
        raise InputError(name, f"cannot load a model config: {exc}") from None
    fam = family if family is not None else detect_family(config)
    if fam not in FAMILIES:
        raise ConfigError(f"unknown family {fam!r}; supported: {', '.join(FAMILIES)}")
    torch_dtype = _resolve_dtype(dtype)
    model_cls = getattr(importlib.import_module("transformers"), _MODEL_CLASSES[fam])
    model = model_cls.from_pretrained(name, config=config, dtype=torch_dtype, **hub).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(name, **hub)
    image_processor = AutoImageProcessor.from_pretrained(name, backend="pil", **hub)
    processor_config = _optional_json(name, "processor_config.json", local_files_only=local_files_only)
    template = _processor_template(name, processor_config, local_files_only=local_files_only)
    source = "processor"
    if template is None:
        template, source = getattr(tokenizer, "chat_template", None), "tokenizer"
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
    if template is None:
        source = "fallback"
    return PretrainedMLLM(model, tokenizer, image_processor, fam, chat_template=template, template_source=source,
                          processor_config=processor_config, n_slices=n_slices)


__all__ = ["FALLBACK_TEMPLATES", "FAMILIES", "PretrainedMLLM", "detect_family", "load_pretrained"]
