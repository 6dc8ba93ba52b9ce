"""export_hf_llava: a composed model (tiny SigLIP / CLIP tower + tiny Llama / Qwen2 / Gemma 3 LLM, built
with builders.from_hub from locally saved parts) exported to the Llava layout, loaded with plain
transformers: the same logits (atol 1e-5), the same greedy tokens, and LlavaProcessor built from the
exported folder prepares the same prompt ids and pixels; unsupported compositions are ConfigErrors.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from medmllm.data.collate import MultimodalCollator
from medmllm.data.records import make_record, media
from medmllm.errors import ConfigError
from medmllm.model.builders import build_llm_for, from_hub, llm_config, tiny
from medmllm.model.export import export_hf_llava
from medmllm.model.generate import generate_ids

META = {"dataset": "toy", "split": "test"}
SIZE, PATCH = 32, 8                     # 4 x 4 = 16 patches (+1 CLS for CLIP)
QUESTIONS = ["Is there a pleural effusion?", "Describe the image."]
CASES = [("siglip", "llama", "mlp"), ("clip", "qwen2", "mlp"), ("siglip", "gemma", "linear")]


def _tower(kind: str):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=SIZE,
              patch_size=PATCH)
    return SiglipVisionModel(SiglipVisionConfig(**kw)) if kind == "siglip" else CLIPVisionModel(CLIPVisionConfig(**kw))


def _compose(tmp_path, tower: str, family: str, projector: str):
    """Save a tiny tower, LLM and tokenizer, then compose them with from_hub (local files only)."""
    from medmllm.data.tokenizers import build_tokenizer

    template = {"llama": "llama3", "qwen2": "qwen2", "gemma": "gemma"}[family]
    torch.manual_seed(0)
    tok = build_tokenizer(template)
    _tower(tower).save_pretrained(tmp_path / "vision")
    llm = build_llm_for(family, llm_config(family, tok, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64))
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    model, tok = from_hub(vision=str(tmp_path / "vision"), llm=str(tmp_path / "llm"), projector=projector,
                          local_files_only=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():      # a wider spread than the init, so greedy answers vary with the input
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2, generator=g)
    return model.eval(), tok


def _batch(model, tok, seed=0):
    """Two left-padded rows of different lengths, one 3 x SIZE x SIZE image each."""
    g = torch.Generator().manual_seed(seed)
    exs = [{"record": make_record(f"r{i}", [media("image", "x"), q], None, META),
            "modalities": [("image", torch.rand(3, SIZE, SIZE, generator=g))]} for i, q in enumerate(QUESTIONS)]
    return MultimodalCollator(tok, 512, model.num_tokens, train=False)(exs)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; two OpenMP threads on shared, busy cores spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def exported(request, tmp_path_factory):
    from transformers import LlavaForConditionalGeneration

    tmp = tmp_path_factory.mktemp("export")
    model, tok = _compose(tmp, *request.param)
    out = export_hf_llava(model, tok, tmp / "llava")
    llava, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    return request.param, model, tok, out, llava.eval(), info


def test_folder_loads_with_every_weight_and_the_mapped_config(exported):
    (tower, family, projector), model, tok, out, llava, info = exported
    assert all(not v for v in info.values()), info                    # nothing missing / unexpected
    cfg = json.loads((out / "config.json").read_text())
    enc = model.encoders["image"]
    assert cfg["model_type"] == "llava" and cfg["image_token_index"] == tok.convert_tokens_to_ids("<image>")
    # serving engines pick the model class from `architectures` (vLLM 0.32 served a pooling model without it)
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["vision_feature_layer"] == enc.feature_layer == -2
    # CLIP has a CLS token that medmllm drops -> Llava's "default"; SigLIP has none -> "full"
    assert cfg["vision_feature_select_strategy"] == ("default" if tower == "clip" else "full")
    assert cfg["projector_hidden_act"] == ("gelu" if projector == "mlp" else "linear")
    assert cfg["image_seq_length"] == (SIZE // PATCH) ** 2 == model.num_tokens("image", (3, SIZE, SIZE))
    assert cfg["text_config"]["model_type"] == model.llm.config.model_type
    # the vision tower's weights are the composed model's, not a fresh init
    for k, v in enc.vision_model.state_dict().items():
        assert torch.equal(llava.model.vision_tower.state_dict()[k], v), k
    if family == "qwen2":                                              # tied embeddings stay tied
        assert llava.lm_head.weight.data_ptr() == llava.get_input_embeddings().weight.data_ptr()


def test_logits_equal_medmllm(exported):
    _, model, tok, _, llava, _ = exported
    batch = _batch(model, tok)
    assert (batch["attention_mask"][:, 0] == 0).any()                  # left padding is exercised
    with torch.no_grad():
        ours = model(**batch).logits                                   # [B, L, V]
        _, _, positions = model.embed_inputs(**batch)
        theirs = llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                       pixel_values=batch["modality_inputs"]["image"]).logits
    real = batch["attention_mask"].bool()
    assert ours.shape == theirs.shape
    torch.testing.assert_close(theirs[real], ours[real], atol=1e-5, rtol=0)
    assert ours[real].std() > 1e3 * 1e-5                               # logits spread far beyond the tolerance


def test_greedy_generation_equals_medmllm(exported):
    _, model, tok, _, llava, _ = exported
    batch = _batch(model, tok, seed=1)
    ours = generate_ids(model, batch, tok, max_new_tokens=8)
    with torch.no_grad():
        seq = llava.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=batch["modality_inputs"]["image"], max_new_tokens=8, do_sample=False)
    eos = set(llava.generation_config.eos_token_id if isinstance(llava.generation_config.eos_token_id, list)
              else [llava.generation_config.eos_token_id])
    theirs = []
    for row in seq[:, batch["input_ids"].shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        theirs.append(row[:cut])
    assert theirs == ours
    assert sum(map(len, ours)) >= 8 and ours[0] != ours[1]              # real, input-dependent answers


def test_llava_processor_from_the_folder_prepares_the_same_inputs(exported):
    import numpy as np
    from transformers import AutoImageProcessor, LlavaProcessor

    _, model, tok, out, _, _ = exported
    proc = LlavaProcessor.from_pretrained(out)
    assert type(AutoImageProcessor.from_pretrained(out)) is type(proc.image_processor)   # preprocessor_config.json
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    typed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}]
    text = proc.apply_chat_template(typed, add_generation_prompt=True)
    enc = proc(images=[img], text=[text], return_tensors="pt")
    image_id = tok.convert_tokens_to_ids("<image>")
    assert int((enc["input_ids"] == image_id).sum()) == model.num_tokens("image", (3, SIZE, SIZE))
    # the token-count helper vLLM calls for models it runs through transformers (it reads crop_size)
    counted = proc._get_num_multimodal_tokens(image_sizes=[[SIZE, SIZE], [3 * SIZE, 2 * SIZE]])
    assert counted["num_image_tokens"] == [model.num_tokens("image", (3, SIZE, SIZE))] * 2
    # same pixels as medmllm's [0, 1] tensor of that image, and the same prompt ids as the collator
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)   # [3, S, S]
    torch.testing.assert_close(enc["pixel_values"][0], pixels, atol=1e-6, rtol=0)
    rec = make_record("r", [media("image", "x"), QUESTIONS[0]], None, META)
    collate = MultimodalCollator(tok, 512, model.num_tokens, train=False)
    ref = collate([{"record": rec, "modalities": [("image", pixels)]}])
    assert torch.equal(enc["input_ids"], ref["input_ids"])


def test_typed_template_renders_strings_as_before(exported):
    from transformers import AutoTokenizer

    _, model, tok, out, _, _ = exported
    exported_tok = AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nDescribe."},
            {"role": "assistant", "content": "Normal."}]
    assert exported_tok.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)


# ----------------------------------------------------------------------------- what cannot be exported

@pytest.mark.parametrize("kinds,match", [(["image"], "CNNImageEncoder"), (["image", "ehr"], "modalities")])
def test_unsupported_compositions_are_config_errors(tmp_path, kinds, match):
    model, tok = tiny("llama", modalities=kinds)
    with pytest.raises(ConfigError, match=match) as err:
        export_hf_llava(model, tok, tmp_path / "out")
    assert "exportable to hf-llava" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_resampler_projector_is_refused(tmp_path):
    from medmllm.data.tokenizers import build_tokenizer

    tok = build_tokenizer("llama3")
    _tower("siglip").save_pretrained(tmp_path / "vision")
    build_llm_for("llama", llm_config("llama", tok, 32, 1, 4, 2, 64)).save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    model, tok = from_hub(vision=str(tmp_path / "vision"), llm=str(tmp_path / "llm"), projector="resampler",
                          projector_kwargs={"num_queries": 4, "heads": 4}, local_files_only=True)
    with pytest.raises(ConfigError, match="ResamplerProjector"):
        export_hf_llava(model, tok, tmp_path / "out")


def test_existing_folder_is_kept_unless_overwrite(exported, tmp_path):
    _, model, tok, _, _, _ = exported
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        export_hf_llava(model, tok, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").exists()
    export_hf_llava(model, tok, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]                       # no temporary left behind


def test_cli_export(exported, tmp_path):
    from typer.testing import CliRunner
    from transformers import LlavaForConditionalGeneration

    from medmllm.cli import app

    (_, family, _), model, tok, _, llava, _ = exported
    if family != "llama":
        pytest.skip("one CLI round trip is enough")
    model.save_pretrained(tmp_path / "medmllm")
    tok.save_pretrained(tmp_path / "medmllm")
    res = CliRunner().invoke(app, ["export", str(tmp_path / "medmllm"), "--to", "hf-llava", "--out",
                                   str(tmp_path / "llava")])
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "llava") in res.output
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava")
    for k, v in llava.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    bad = CliRunner().invoke(app, ["export", str(tmp_path / "medmllm"), "--to", "onnx", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "hf-llava" in bad.output
