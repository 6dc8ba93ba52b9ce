"""Export a composed :class:`~medmllm.model.mllm.MedMLLM` to the Hugging Face Llava layout.

What vLLM / SGLang / plain ``transformers`` serve as ``LlavaForConditionalGeneration``: a vision
tower, a 2-layer projector and a causal LM, with the image token expanded in the prompt. A MedMLLM
maps onto it exactly when

- its only modality is ``image``, encoded by an :class:`~medmllm.model.encoders.image.HFImageEncoder`
  around a SigLIP or CLIP vision tower (Llava rebuilds the tower with ``AutoModel.from_config``, and
  its select strategy can drop exactly one CLS token, or nothing);
- the projector is ``"mlp"`` (Linear -> GELU -> Linear, hidden width = LLM width; Llava's
  ``linear_1``/``linear_2`` with ``projector_hidden_act="gelu"``) or ``"linear"`` (one Linear, exported
  as ``linear_1`` = it, ``projector_hidden_act="linear"`` (identity), ``linear_2`` = identity matrix,
  zero bias: the same numbers, exactly);
- the LLM is a Llama / Mistral / Qwen2 / Qwen3 / Gemma / Gemma 3 text decoder ``XForCausalLM`` whose
  ``.model`` is what ``AutoModel.from_config(text_config)`` builds and whose logits are just
  ``lm_head(hidden)`` (no final soft-capping).

Weights (file layout = the llava-hf hub checkpoints, e.g. ``llava-hf/llava-1.5-7b-hf``, which every
transformers version and the serving engines load; transformers maps them to its in-memory names
``model.vision_tower.*`` etc. on load)::

    encoders.image.vision_model.<k>      -> vision_tower.vision_model.<k>
    projectors.image.mlp.0 / mlp.2       -> multi_modal_projector.linear_1 / linear_2
    projectors.image.proj                -> multi_modal_projector.linear_1 (+ identity linear_2)
    llm.model.<k>                        -> language_model.model.<k>
    llm.lm_head.weight                   -> language_model.lm_head.weight   (left out when tied)

Config: ``vision_config`` / ``text_config`` (the modules' own configs), ``image_token_index`` = the
``<image>`` id, ``vision_feature_layer`` = the encoder's ``feature_layer``,
``vision_feature_select_strategy`` = ``"default"`` when the encoder drops the CLS token (CLIP) else
``"full"``, ``image_seq_length`` = tokens of one ``image_size`` image.

Next to it: the tokenizer, whose chat template also accepts typed content
(``[{"type": "image"}, {"type": "text", "text": ...}]`` renders as medmllm's collator flattens it,
``"<image>\\n..."``); an image processor (PIL backend) and ``processor_config.json`` so
``LlavaProcessor.from_pretrained(out_dir)`` expands ``<image>`` to the right number of tokens.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from medmllm.errors import ConfigError

# Vision towers Llava rebuilds as the same class (AutoModel.from_config), with their image processor.
VISION_TOWERS = {"siglip_vision_model": "SiglipImageProcessorPil", "clip_vision_model": "CLIPImageProcessorPil"}
# Text decoders whose CausalLM is `model` + `lm_head` and nothing else (Llava's language_model + lm_head).
TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text")

WHAT_EXPORTS = ("exportable to hf-llava: one 'image' modality with an hf_image encoder (SigLIP or CLIP "
                "tower), an 'mlp' (hidden width = LLM width) or 'linear' projector, and a "
                f"{'/'.join(TEXT_MODEL_TYPES)} LLM")

# Prepended to the chat template: typed content parts -> one string per message, as
# medmllm.data.collate.flatten_content does (stripped text parts, one <image> per image part,
# joined by "\n"); string content passes through unchanged.
TYPED_CONTENT_PREFIX = (
    "{%- set _medmllm = namespace(messages=[]) -%}"
    "{%- for _m in messages -%}"
    "{%- if _m['content'] is string -%}"
    "{%- set _medmllm.messages = _medmllm.messages + [_m] -%}"
    "{%- else -%}"
    "{%- set _parts = namespace(pieces=[]) -%}"
    "{%- for _p in _m['content'] -%}"
    "{%- if _p['type'] == 'text' and _p['text'] | trim -%}"
    "{%- set _parts.pieces = _parts.pieces + [_p['text'] | trim] -%}"
    "{%- elif _p['type'] in ('image', 'image_url') -%}"
    "{%- set _parts.pieces = _parts.pieces + ['<image>'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set _medmllm.messages = _medmllm.messages + [{'role': _m['role'], "
    "'content': _parts.pieces | join('\\n')}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = _medmllm.messages -%}"
)


@dataclass(frozen=True)
class LlavaPlan:
    """What an exportable model maps to (see the module doc)."""

    encoder: torch.nn.Module        # the HFImageEncoder
    projector_kind: str             # "mlp" or "linear"
    strategy: str                   # "default" (CLS dropped) or "full"
    image_token_id: int
    tied: bool                      # lm_head shares the input embeddings


def plan_llava_export(model) -> LlavaPlan:
    """Check that ``model`` maps onto Llava exactly; ConfigError saying what does not (and why)."""
    from medmllm.model.encoders.image import HFImageEncoder
    from medmllm.model.projectors import LinearProjector, MLPProjector

    kinds = list(model.encoders)
    if kinds != ["image"]:
        raise ConfigError(f"cannot export modalities {kinds}: Llava takes images only; {WHAT_EXPORTS}")
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise ConfigError("the model holds LoRA layers: merge them (medmllm.model.lora.merge) before exporting")
    enc, proj = model.encoders["image"], model.projectors["image"]
    if not isinstance(enc, HFImageEncoder):
        raise ConfigError(f"cannot export the image encoder {type(enc).__name__}: Llava's vision tower is a "
                          f"transformers vision model; {WHAT_EXPORTS}")
    tower_type = getattr(enc.vision_model.config, "model_type", None)
    if tower_type not in VISION_TOWERS:
        raise ConfigError(f"cannot export vision tower {tower_type!r}: expected one of {sorted(VISION_TOWERS)} "
                          f"(towers Llava rebuilds and processes as medmllm does); {WHAT_EXPORTS}")
    if enc.in_channels != 3:
        raise ConfigError(f"cannot export a {enc.in_channels}-channel tower: HF image processors give RGB (3)")
    if enc.num_dropped not in (0, 1) or enc.num_prefix > 1:
        raise ConfigError(f"cannot export a tower with {enc.num_prefix} prefix tokens ({enc.num_dropped} "
                          "dropped): Llava's 'default' strategy drops exactly one CLS token")
    projector_kind = _projector_kind(proj, model.llm, LinearProjector, MLPProjector)
    _check_llm(model.llm)
    tied = _is_tied(model.llm)
    return LlavaPlan(enc, projector_kind, "default" if enc.num_dropped == 1 else "full",
                     int(model.config.placeholder_token_ids["image"]), tied)


def _projector_kind(proj, llm, linear_cls, mlp_cls) -> str:
    hidden = llm.get_input_embeddings().weight.shape[1]
    if isinstance(proj, mlp_cls):
        first, act, second = proj.mlp
        if first.out_features != hidden or type(act) is not torch.nn.GELU or act.approximate != "none":
            raise ConfigError(f"cannot export this mlp projector: Llava's linear_1 maps to the LLM width "
                              f"{hidden} then exact GELU, got hidden {first.out_features}, {act}")
        return "mlp"
    if isinstance(proj, linear_cls):
        return "linear"
    raise ConfigError(f"cannot export projector {type(proj).__name__}: Llava's projector is Linear -> act -> "
                      f"Linear per token (resampler/pool change the token count); {WHAT_EXPORTS}")


def _check_llm(llm) -> None:
    from transformers import AutoModel

    model_type = getattr(llm.config, "model_type", None)
    if model_type not in TEXT_MODEL_TYPES:
        raise ConfigError(f"cannot export LLM model_type {model_type!r}: expected one of {TEXT_MODEL_TYPES}; "
                          f"{WHAT_EXPORTS}")
    if getattr(llm.config, "final_logit_softcapping", None) is not None:
        raise ConfigError("cannot export an LLM with final_logit_softcapping: Llava's logits are lm_head(hidden)")
    base = getattr(llm, "model", None)
    with torch.device("meta"):
        rebuilt = AutoModel.from_config(llm.config)
    if base is None or type(rebuilt) is not type(base) or getattr(llm, "lm_head", None) is None:
        raise ConfigError(f"cannot export {type(llm).__name__}: expected .model = {type(rebuilt).__name__} "
                          "and .lm_head (Llava's language_model and lm_head)")


def _is_tied(llm) -> bool:
    return llm.get_output_embeddings().weight is llm.get_input_embeddings().weight


# ----------------------------------------------------------------------------- config and weights

def llava_config(model, plan: LlavaPlan | None = None, image_size: int | None = None):
    """The ``LlavaConfig`` of an exportable ``model`` (see the module doc)."""
    from transformers import LlavaConfig

    plan = plan or plan_llava_export(model)
    enc, llm = plan.encoder, model.llm
    vision = enc.vision_model.config
    size = int(image_size or vision.image_size)
    text = llm.config.to_dict()
    text["vocab_size"] = llm.get_input_embeddings().num_embeddings
    text["architectures"] = [type(llm).__name__]     # serving engines pick the text model class by it
    config = LlavaConfig(
        vision_config=vision.to_dict(), text_config=text, image_token_index=plan.image_token_id,
        vision_feature_layer=enc.feature_layer, vision_feature_select_strategy=plan.strategy,
        projector_hidden_act="gelu" if plan.projector_kind == "mlp" else "linear",
        multimodal_projector_bias=True, image_seq_length=model.num_tokens("image", (3, size, size)),
        tie_word_embeddings=plan.tied)
    config.architectures = ["LlavaForConditionalGeneration"]   # without it vLLM 0.32 guesses a pooling model
    config.dtype = next(llm.parameters()).dtype
    return config


def llava_state_dict(model, plan: LlavaPlan | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under llava-hf checkpoint names (see the module doc); tensors are shared."""
    plan = plan or plan_llava_export(model)
    out: dict[str, torch.Tensor] = {}
    for k, v in plan.encoder.vision_model.state_dict().items():   # flat names (transformers 5) or vision_model.*
        out["vision_tower.vision_model." + k.removeprefix("vision_model.")] = v
    proj = model.projectors["image"]
    p = "multi_modal_projector."
    if plan.projector_kind == "mlp":
        first, _, second = proj.mlp
        out.update({p + "linear_1.weight": first.weight, p + "linear_1.bias": first.bias,
                    p + "linear_2.weight": second.weight, p + "linear_2.bias": second.bias})
    else:
        w = proj.proj.weight                                                # [H, D]
        out.update({p + "linear_1.weight": w, p + "linear_1.bias": proj.proj.bias,
                    p + "linear_2.weight": torch.eye(w.shape[0], dtype=w.dtype, device=w.device),
                    p + "linear_2.bias": torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)})
    for k, v in model.llm.model.state_dict().items():
        out[f"language_model.model.{k}"] = v
    if not plan.tied:
        out["language_model.lm_head.weight"] = model.llm.lm_head.weight
    return {k: v.detach() for k, v in out.items()}


def _check_against_llava(config, state: dict[str, torch.Tensor]) -> None:
    """ConfigError unless ``state`` fills a Llava of ``config`` exactly (names and shapes)."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        skeleton = LlavaForConditionalGeneration(config)
    # in-memory names of the installed transformers <- checkpoint names
    renames = (("vision_tower.vision_model.", "model.vision_tower."), ("vision_tower.", "model.vision_tower."),
               ("multi_modal_projector.", "model.multi_modal_projector."),
               ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."))
    got = {}
    for k, v in state.items():
        for old, new in renames:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        got[k] = tuple(v.shape)
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        want.pop("lm_head.weight", None)
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:4]
        raise ConfigError(f"exported weights do not fill LlavaForConditionalGeneration (first differences in "
                          f"name/shape: {diff})")


# ----------------------------------------------------------------------------- processor

def default_image_processor(encoder, image_size: int | None = None):
    """The tower family's PIL image processor giving what medmllm's data pipeline gives the tower.

    RGB, resized to the tower's ``image_size`` (SigLIP: to a square; CLIP: shortest edge, then a
    centre crop), rescaled to [0, 1] and *not* mean/std-normalised: :class:`medmllm.data.dataset.PartLoader`
    feeds [0, 1] pixels, so that is what the composed model was trained on.
    """
    import transformers

    config = encoder.vision_model.config
    size = int(image_size or config.image_size)
    cls = getattr(transformers, VISION_TOWERS[config.model_type])
    common = dict(do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=False, do_convert_rgb=True)
    if config.model_type == "clip_vision_model":
        return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True,
                   **common)
    # SigLIP does not crop; crop_size = size is there for the token-count helper that reads it
    # (LlavaProcessor._get_num_multimodal_tokens, which vLLM calls for models it runs through transformers)
    return cls(size={"height": size, "width": size}, crop_size={"height": size, "width": size}, **common)


def typed_chat_template(template: str) -> str:
    """``template`` that also renders typed content parts (see :data:`TYPED_CONTENT_PREFIX`)."""
    return template if template.startswith(TYPED_CONTENT_PREFIX) else TYPED_CONTENT_PREFIX + template


def _generation_config(llm, tokenizer):
    from transformers import GenerationConfig

    eos = {tokenizer.eos_token_id}
    cfg_eos = llm.config.eos_token_id
    eos.update(cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos])
    eos = sorted(i for i in eos if i is not None)
    return GenerationConfig(bos_token_id=getattr(llm.config, "bos_token_id", None),
                            eos_token_id=eos if len(eos) != 1 else eos[0], pad_token_id=tokenizer.pad_token_id)


# ----------------------------------------------------------------------------- export

def export_hf_llava(model, tokenizer, out_dir: str | os.PathLike, image_processor=None,
                    overwrite: bool = False) -> Path:
    """Write ``model`` as a Hugging Face Llava folder; returns ``out_dir``.

    ``LlavaForConditionalGeneration.from_pretrained(out_dir)`` then gives the same logits as
    ``model`` on the same ``input_ids`` (image tokens expanded) and ``pixel_values``, and
    ``LlavaProcessor.from_pretrained(out_dir)`` (or ``AutoProcessor``, PIL backend) prepares inputs.
    ``tokenizer``: the model's (with ``<image>`` and a chat template). ``image_processor``: saved as
    given, default :func:`default_image_processor`. The folder is written to a temporary sibling and
    moved into place, so a failed export leaves nothing half-written; an existing non-empty
    ``out_dir`` is refused unless ``overwrite``. ConfigError when the model does not map onto Llava
    (see the module doc).
    """
    from huggingface_hub import save_torch_state_dict
    from transformers import LlavaProcessor

    plan = plan_llava_export(model)
    if not tokenizer.chat_template:
        raise ConfigError("tokenizer: expected a chat template; call medmllm.data.tokenizers.set_chat_template")
    if tokenizer.convert_tokens_to_ids("<image>") != plan.image_token_id:
        raise ConfigError(f"tokenizer: '<image>' is id {tokenizer.convert_tokens_to_ids('<image>')}, the model's "
                          f"image placeholder is {plan.image_token_id}; pass the model's own tokenizer")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out}: exists and is not empty; choose another folder or pass overwrite=True")
    config = llava_config(model, plan)
    state = llava_state_dict(model, plan)
    _check_against_llava(config, state)
    ip = image_processor if image_processor is not None else default_image_processor(plan.encoder)
    tok = copy.deepcopy(tokenizer)
    template = typed_chat_template(tokenizer.chat_template)
    tok.chat_template = template
    processor = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=plan.encoder.patch_size[0],
                               vision_feature_select_strategy=plan.strategy,
                               num_additional_image_tokens=plan.encoder.num_prefix, chat_template=template)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        config.save_pretrained(tmp)
        _generation_config(model.llm, tokenizer).save_pretrained(tmp)
        save_torch_state_dict({k: v.contiguous() for k, v in state.items()}, tmp, max_shard_size="5GB")
        processor.save_pretrained(tmp)           # tokenizer, chat template, processor_config.json
        ip.save_pretrained(tmp)                  # preprocessor_config.json, for loaders that read only it
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["LlavaPlan", "TEXT_MODEL_TYPES", "VISION_TOWERS", "default_image_processor", "export_hf_llava",
           "llava_config", "llava_state_dict", "plan_llava_export", "typed_chat_template"]
