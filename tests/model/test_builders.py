"""Builders: the registry, tiny (families, determinism), small (size, token counts), from_hub on
locally saved tiny SigLIP + Qwen2 checkpoints (weights loaded, tokens added, round trip)."""

from __future__ import annotations

import shutil

import pytest
import torch

from medmllm.data.collate import MultimodalCollator
from medmllm.data.records import make_record, media
from medmllm.errors import ConfigError
from medmllm.model.builders import BUILDERS, example_input, from_hub, small, tiny
from medmllm.model.encoders import HFImageEncoder

META = {"dataset": "toy", "split": "train"}


def test_registry_names():
    assert BUILDERS.names() == ["from_hub", "small", "tiny"]
    assert BUILDERS.get("tiny") is tiny and BUILDERS.get("small") is small and BUILDERS.get("from_hub") is from_hub


@pytest.mark.parametrize("family,cls_name,eot", [("llama", "LlamaForCausalLM", "<|eot_id|>"),
                                                 ("qwen2", "Qwen2ForCausalLM", "<|im_end|>"),
                                                 ("gemma", "Gemma3ForCausalLM", "<end_of_turn>")])
def test_tiny_families(family, cls_name, eot):
    model, tok = tiny(family, modalities=("image", "ehr"))
    assert type(model.llm).__name__ == cls_name
    cfg = model.llm.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (32, 2, len(tok))
    assert tok.eos_token == eot and cfg.eos_token_id == tok.eos_token_id
    assert list(model.encoders) == ["image", "ehr"] and not model.training
    assert model.config.placeholder_token_ids == {"image": tok.convert_tokens_to_ids("<image>"),
                                                  "ehr": tok.convert_tokens_to_ids("<ehr>")}


def test_tiny_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, _ = tiny("llama", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = tiny("llama", seed=0)
    c, _ = tiny("llama", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["llm.model.layers.0.mlp.up_proj.weight"], sc["llm.model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(sa["projectors.image.mlp.0.weight"], sc["projectors.image.mlp.0.weight"])


def test_bad_arguments():
    with pytest.raises(ConfigError, match="family"):
        tiny("mistral")
    with pytest.raises(ConfigError, match="modalities"):
        tiny("llama", modalities=("image", "video"))
    with pytest.raises(ConfigError, match="unknown projector"):
        tiny("llama", projector="qformer")


def test_small_size_and_tokens():
    model, tok = small()
    n = sum(p.numel() for p in model.parameters())
    assert 3_000_000 < n < 6_000_000
    cfg = model.llm.config
    assert type(model.llm).__name__ == "LlamaForCausalLM"
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (256, 4)
    # token counts from the encoder docs (MLP projector keeps them): 4x4 grid + global; 4x2x2 cells + global;
    # 2500 samples / (5 * 5 * 2) + mean and max summary tokens; one per EHR feature
    assert model.num_tokens("image", (1, 128, 128)) == 17
    assert model.num_tokens("volume", (3, 32, 64, 64)) == 17
    assert model.num_tokens("signal", (12, 2500)) == 50 + 2
    assert model.num_tokens("ehr", (12, 2)) == 12 and model.num_tokens("ehr", (12,)) == 12
    g = torch.Generator().manual_seed(0)
    rec = make_record("r", [media("image", "x"), "What is shown?"], "A chest x-ray.", META)
    batch = MultimodalCollator(tok, 512, model.num_tokens)(
        [{"record": rec, "modalities": [("image", example_input("image", g, size=128))]}])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


# ----------------------------------------------------------------------------- from_hub (local files only)

def _save_tiny_checkpoints(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from medmllm.data.tokenizers import build_tokenizer

    torch.manual_seed(0)
    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                  num_attention_heads=4, image_size=32, patch_size=8))
    tok = build_tokenizer("qwen2")
    tok.chat_template = None                                     # from_hub installs medmllm's template
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok) - 8, hidden_size=48, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                                       eos_token_id=tok.eos_token_id))
    vision.save_pretrained(tmp_path / "vision")
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    return vision, llm, tok


def test_from_hub_loads_local_checkpoints_and_round_trips(tmp_path):
    from transformers import AutoModel

    vision, llm, tok0 = _save_tiny_checkpoints(tmp_path)
    model, tok = from_hub(vision=str(tmp_path / "vision"), llm=str(tmp_path / "llm"), projector="mlp",
                          local_files_only=True)
    enc = model.encoders["image"]
    assert isinstance(enc, HFImageEncoder) and type(enc.vision_model).__name__ == "SiglipVisionModel"
    for k, v in vision.state_dict().items():                      # pretrained weights, not fresh ones
        assert torch.equal(enc.vision_model.state_dict()[k], v), k
    old_vocab = llm.config.vocab_size
    emb = model.llm.get_input_embeddings().weight
    assert emb.shape == (len(tok), 48)                            # resized to the tokenizer
    assert torch.equal(emb[:old_vocab], llm.get_input_embeddings().weight)
    assert torch.equal(model.llm.model.layers[1].mlp.up_proj.weight, llm.model.layers[1].mlp.up_proj.weight)
    assert "{% generation %}" in tok.chat_template.replace("{%- generation %}", "{% generation %}")
    # SigLIP 32 px / patch 8 -> 16 patch tokens, no CLS; feature layer -2 of 3
    assert model.num_tokens("image", (3, 32, 32)) == 16 and enc.feature_layer == -2
    spec = model.config.encoders["image"]
    assert spec["name"] == "hf_image" and spec["kwargs"]["vision_class"] == "SiglipVisionModel"

    g = torch.Generator().manual_seed(0)
    rec = make_record("r", [media("image", "x"), "Describe."], "Normal.", META)
    batch = MultimodalCollator(tok, 512, model.num_tokens)(
        [{"record": rec, "modalities": [("image", torch.rand(3, 32, 32, generator=g))]}])
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    model.save_pretrained(tmp_path / "composed")
    shutil.rmtree(tmp_path / "vision")                              # rebuilt from the config, not from paths
    shutil.rmtree(tmp_path / "llm")
    loaded = AutoModel.from_pretrained(tmp_path / "composed")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch).logits, logits)
    assert loaded.llm.lm_head.weight is loaded.llm.get_input_embeddings().weight


def test_from_hub_missing_checkpoint_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot load"):
        from_hub(vision=str(tmp_path / "nope"), llm=str(tmp_path / "nope"), local_files_only=True)
