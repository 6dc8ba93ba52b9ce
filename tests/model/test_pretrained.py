"""Pretrained MLLMs as they are: tiny random llava / Qwen2-VL / Qwen2.5-VL / Gemma 3 checkpoints,
saved with save_pretrained and loaded back through load_pretrained (the path a hub id takes)."""

import json

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from medmllm.data.tokenizers import build_tokenizer
from medmllm.errors import ConfigError, InputError
from medmllm.model.pretrained import FAMILIES, PretrainedMLLM, load_pretrained

transformers = pytest.importorskip("transformers")

CT_SMALL = get_testdata_file("CT_small.dcm")
FAMILY_TOKENS = {
    "llava": ("llama3", []),  # "<image>" is one of medmllm's modality tokens already
    "qwen2_vl": ("qwen2", ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]),
    "qwen2_5_vl": ("qwen2", ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]),
    "gemma3": ("gemma", ["<start_of_image>", "<image_soft_token>", "<end_of_image>"]),
}
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            max_position_embeddings=512)
QWEN_MAX_PIXELS = 56 * 56  # images are resized to at most 56 x 56 (4 x 4 patches of 14)


# --------------------------------------------------------------------------- tiny checkpoints
def _tokenizer(family):
    template, extra = FAMILY_TOKENS[family]
    tok = build_tokenizer(template)
    if extra:
        tok.add_special_tokens({"extra_special_tokens": extra}, replace_extra_special_tokens=False)
    return tok


def _ids(tok):
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def _llava(tok):
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    cfg = LlavaConfig(vision_config=vision, text_config=dict(model_type="llama", **TEXT, **_ids(tok)),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaForConditionalGeneration(cfg), ip


def _qwen_ids(tok):
    return dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), video_token_id=tok.pad_token_id,
                vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))


def _qwen_text(tok):  # head_dim 16 -> 8 rotary frequencies split (t, h, w) = (2, 3, 3)
    return dict(**TEXT, **_ids(tok), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": [2, 3, 3]})


def _qwen_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=QWEN_MAX_PIXELS)


def _qwen2_vl(tok):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    cfg = Qwen2VLConfig(text_config=_qwen_text(tok), vision_config=vision, **_qwen_ids(tok))
    return Qwen2VLForConditionalGeneration(cfg), _qwen_processor()


def _qwen2_5_vl(tok):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=32, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(text_config=_qwen_text(tok), vision_config=vision, **_qwen_ids(tok))
    return Qwen2_5_VLForConditionalGeneration(cfg), _qwen_processor()


def _gemma3(tok):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    text = dict(TEXT, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=64, **_ids(tok))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56,
                  patch_size=14)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                       boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                       eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                       image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"))
    return Gemma3ForConditionalGeneration(cfg), Gemma3ImageProcessorPil(size={"height": 56, "width": 56})


BUILDERS = {"llava": _llava, "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "gemma3": _gemma3}


def save_tiny(family, folder, chat_template_json=None):
    """Build, save (model + tokenizer + image processor) and return the folder."""
    tok = _tokenizer(family)
    torch.manual_seed(0)
    model, ip = BUILDERS[family](tok)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ip.save_pretrained(folder)
    if chat_template_json is not None:
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": chat_template_json}))
    return folder


@pytest.fixture(scope="module", params=FAMILIES)
def mllm(request, tmp_path_factory):
    folder = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    return load_pretrained(folder)


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)  # H=40, W=60
    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray(rgb).save(path)
    return str(path)


def _ask(image_part, question="Describe the image."):
    return [{"role": "user", "content": [image_part, {"type": "text", "text": question}]}]


def _dicom_msgs():
    return _ask({"type": "image", "path": CT_SMALL, "options": {"window": "lung"}}, "Is there a nodule?")


def _expected_tokens(m, height, width):
    """Image tokens per image, derived from the config and the processor settings by hand."""
    cfg = m.model.config
    if m.family == "llava":  # CLIP 28 px / 14 px patches -> 2 x 2 patches; "default" drops CLS
        return (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    if m.family == "gemma3":
        return cfg.mm_tokens_per_image
    # Qwen smart resize: each side to a multiple of 28 (patch 14 x merge 2), area <= 56*56:
    # 40 x 60 -> 28 x 56 (grid 1 x 2 x 4 -> 8 patches -> 2 tokens); 128 x 128 -> 56 x 56 (16 -> 4)
    return {(40, 60): 2, (128, 128): 4}[(height, width)]


def _windowed_lung_ct():
    """CT_small in the lung window (c=-600, w=1500), DICOM LINEAR function, as an 8-bit RGB image."""
    ds = pydicom.dcmread(CT_SMALL)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    y = np.clip((hu - (-600 - 0.5)) / (1500 - 1) + 0.5, 0.0, 1.0)
    gray = np.rint(y * 255).astype(np.uint8)
    return Image.fromarray(np.stack([gray] * 3, axis=-1))


def _spy(monkeypatch, m):
    """Record the keyword arguments model.generate receives."""
    calls = []
    real = m.model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(m.model, "generate", spy)
    return calls


# --------------------------------------------------------------------------- tests
def test_family_detected_and_tokenizer_template_used(mllm):
    assert mllm.family == mllm.model.config.model_type
    assert mllm.template_source == "tokenizer"
    assert type(mllm.image_processor).__name__.endswith("Pil")


@pytest.mark.parametrize("which", ["png", "dicom"])
def test_generate_is_a_deterministic_string(mllm, png, which):
    msgs = _ask({"type": "image", "path": png}) if which == "png" else _dicom_msgs()
    first = mllm.generate(msgs, max_new_tokens=6)
    assert isinstance(first, str)
    assert mllm.generate(msgs, max_new_tokens=6) == first


@pytest.mark.parametrize("which", ["png", "dicom"])
def test_image_token_count_matches_the_model(mllm, png, which):
    msgs = _ask({"type": "image", "path": png}) if which == "png" else _dicom_msgs()
    shape = (40, 60) if which == "png" else (128, 128)
    inputs, counts = mllm.prepare_inputs(msgs, return_counts=True)
    expected = _expected_tokens(mllm, *shape)
    assert counts == [expected]
    assert int((inputs["input_ids"] == mllm.model.config.image_token_id).sum()) == expected
    with torch.no_grad():  # the model checks image tokens against image features itself
        logits = mllm.model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape


def test_dicom_pixel_values_equal_the_processor_on_the_windowed_image(mllm, monkeypatch):
    calls = _spy(monkeypatch, mllm)
    mllm.generate(_dicom_msgs(), max_new_tokens=2)
    expected = mllm.image_processor(images=[_windowed_lung_ct()], return_tensors="pt")
    torch.testing.assert_close(calls[0]["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-6)
    if "image_grid_thw" in expected:
        assert torch.equal(calls[0]["image_grid_thw"], expected["image_grid_thw"])


def test_batch_equals_one_at_a_time(mllm, png):
    convs = [_ask({"type": "image", "path": png}), _dicom_msgs(),
             [{"role": "user", "content": "Hello, what can you do for this patient today?"}]]
    singles = [mllm.generate(c, max_new_tokens=6) for c in convs]
    assert mllm.generate(convs, max_new_tokens=6) == singles


def test_volume_part_becomes_n_slice_images(mllm, tmp_path):
    nib = pytest.importorskip("nibabel")
    data = np.random.default_rng(0).normal(0, 100, (30, 30, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "v.nii.gz")
    part = {"type": "volume", "path": "v.nii.gz", "options": {"slices": 3}}
    inputs, counts = mllm.prepare_inputs(_ask(part), base_dir=tmp_path, return_counts=True)
    assert len(counts) == 3
    assert int((inputs["input_ids"] == mllm.model.config.image_token_id).sum()) == sum(counts)
    assert isinstance(mllm.generate(_ask(part), max_new_tokens=2, base_dir=tmp_path), str)


def test_reserved_token_in_text_and_non_image_parts_are_refused(mllm):
    token = mllm.spec.image_token
    with pytest.raises(InputError, match="reserved image token"):
        mllm.generate([{"role": "user", "content": f"look {token}"}], max_new_tokens=1)
    with pytest.raises(InputError, match="signal"):
        mllm.generate(_ask({"type": "signal", "path": "ecg.hea"}), max_new_tokens=1)


# --------------------------------------------------------------------------- against the HF processors
@pytest.fixture(scope="module")
def llava_path(tmp_path_factory):
    return save_tiny("llava", tmp_path_factory.mktemp("llava_ref"))


def test_llava_inputs_equal_llava_processor(llava_path, png):
    from transformers import LlavaProcessor

    m = load_pretrained(llava_path)
    msgs = _ask({"type": "image", "path": png})
    inputs = m.prepare_inputs(msgs)
    text = m.render(m._load(msgs, "messages", ".").turns, 1)
    ref = LlavaProcessor(image_processor=m.image_processor, tokenizer=m.tokenizer, patch_size=14,
                         vision_feature_select_strategy="default", num_additional_image_tokens=1)
    out = ref(images=[Image.open(png).convert("RGB")], text=[text], add_special_tokens=False, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], out["input_ids"])
    torch.testing.assert_close(inputs["pixel_values"], out["pixel_values"], rtol=0, atol=0)


def test_gemma3_inputs_equal_gemma3_processor(tmp_path, png):
    from transformers import AutoTokenizer, Gemma3Processor

    m = load_pretrained(save_tiny("gemma3", tmp_path))
    msgs = _ask({"type": "image", "path": png})
    inputs = m.prepare_inputs(msgs)
    text = m.render(m._load(msgs, "messages", ".").turns, 1)
    named = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    tok = AutoTokenizer.from_pretrained(tmp_path, extra_special_tokens=named)
    ref = Gemma3Processor(image_processor=m.image_processor, tokenizer=tok, image_seq_length=4)
    out = ref(images=[Image.open(png).convert("RGB")], text=[text], add_special_tokens=False, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], out["input_ids"])
    assert torch.equal(inputs["token_type_ids"], out["token_type_ids"])
    torch.testing.assert_close(inputs["pixel_values"], out["pixel_values"], rtol=0, atol=0)


# --------------------------------------------------------------------------- templates
# A Qwen2-VL-style processor template that reads typed content (as the hub's chat_template.json does).
TYPED_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}Picture: <|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_processor_typed_template_is_preferred(tmp_path, png):
    m = load_pretrained(save_tiny("qwen2_vl", tmp_path, chat_template_json=TYPED_QWEN_TEMPLATE))
    assert m.template_source == "processor"
    inputs = m.prepare_inputs(_ask({"type": "image", "path": png}, "Why?"))
    text = m.tokenizer.decode(inputs["input_ids"][0])
    expected = ("<|im_start|>user\nPicture: <|vision_start|>" + "<|image_pad|>" * 2 + "<|vision_end|>Why?"
                "<|im_end|>\n<|im_start|>assistant\n")
    assert text == expected
    assert isinstance(m.generate(_ask({"type": "image", "path": png}), max_new_tokens=2), str)


def test_fallback_template_without_any_template(llava_path, png):
    m = load_pretrained(llava_path)
    bare = PretrainedMLLM(m.model, m.tokenizer, m.image_processor, "llava", chat_template=None)
    assert bare.template_source == "fallback"
    inputs = bare.prepare_inputs(_ask({"type": "image", "path": png}, "  What is shown?  "))
    text = bare.tokenizer.decode(inputs["input_ids"][0])
    assert text == "USER: " + "<image>" * 4 + "\nWhat is shown? ASSISTANT:"


def test_stop_strings_cut_the_answer(llava_path):
    m = load_pretrained(llava_path)
    msgs = [{"role": "user", "content": "Describe the image."}]
    full = m.generate(msgs, max_new_tokens=12)
    stop = next((full[i:i + 2] for i in range(2, len(full) - 1) if full[i:i + 2].isprintable()), None)
    if stop is None:
        pytest.skip("the random model produced no printable two-character piece to stop on")
    assert m.generate(msgs, max_new_tokens=12, stop_strings=[stop]) == full[:full.find(stop)]


# --------------------------------------------------------------------------- errors
def test_unknown_model_type_lists_the_supported_ones(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(**TEXT, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'.*llava.*qwen2_vl.*qwen2_5_vl.*gemma3"):
        load_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="unknown family"):
        load_pretrained(tmp_path, family="blip2")


def test_missing_checkpoint_is_an_input_error(tmp_path):
    with pytest.raises(InputError):
        load_pretrained(tmp_path / "nothing-here", local_files_only=True)


def test_bad_generation_arguments(llava_path):
    m = load_pretrained(llava_path)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ConfigError, match="max_new_tokens"):
        m.generate(msgs, max_new_tokens=0)
    with pytest.raises(ConfigError, match="top_p"):
        m.generate(msgs, do_sample=True, top_p=0)
    with pytest.raises(InputError, match="role"):
        m.generate([{"role": "doctor", "content": "hi"}])
