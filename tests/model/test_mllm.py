"""MedMLLM: forward/backward/generate across kinds x projectors x families, placeholder scatter and
its errors, assistant-only loss, save/load through the Auto classes, trainable groups and LRs.

Expected values come from running the parts on their own (encoder, projector, embedding table,
cross-entropy) or from the encoders' documented token formulas, never from the composed model.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from medmllm.data.collate import IGNORE_INDEX, MultimodalCollator
from medmllm.data.records import make_record, media
from medmllm.errors import ConfigError, InputError
from medmllm.model.builders import example_input, tiny
from medmllm.model.mllm import MedMLLM, MedMLLMConfig

META = {"dataset": "toy", "split": "train"}
KINDS = ("image", "volume", "signal", "ehr")
PROJECTORS = ("linear", "mlp", "resampler", "pool")
FAMILIES = ("llama", "qwen2", "gemma")
# tokens per input, from the encoder docs: image grid 2 -> 4 + 1 global; volume [1, 3, 16, 16] -> 3 slices
# x k=2 + 1; signal 100 samples -> ceil(ceil(100/5)/5); ehr -> one per feature (12)
ENCODER_TOKENS = {"image": 5, "volume": 7, "signal": 4, "ehr": 12}
PROJECTED = {"linear": lambda n: n, "mlp": lambda n: n, "resampler": lambda n: 4, "pool": lambda n: math.ceil(n / 2)}


def record(i: int, kinds, answer="There is no pneumothorax.", question="Is there a pneumothorax?"):
    return make_record(f"rec-{i}", [media(k, f"{k}.bin") for k in kinds] + [question], answer, META)


def examples(spec, seed=0):
    """spec: list of kind lists, one per sample -> collator examples with random inputs."""
    g = torch.Generator().manual_seed(seed)
    return [{"record": record(i, kinds, answer=["Yes.", "No, it is normal."][i % 2]),
             "modalities": [(k, example_input(k, g)) for k in kinds]} for i, kinds in enumerate(spec)]


def collate(model, tok, spec, train=True, seed=0, **kw):
    return MultimodalCollator(tok, 1024, model.num_tokens, train=train, **kw)(examples(spec, seed))


# ----------------------------------------------------------------------------- the cross product

DEFAULT_CASES = ([("llama", k, p) for k, p in itertools.product(KINDS, PROJECTORS)]
                 + [(f, k, p) for f in ("qwen2", "gemma") for k, p in zip(KINDS, PROJECTORS)])
SLOW_CASES = [(f, k, p) for f in ("qwen2", "gemma") for k, p in itertools.product(KINDS, PROJECTORS)
              if (f, k, p) not in DEFAULT_CASES]


def _check_forward_backward_generate(family, kind, projector):
    model, tok = tiny(family, modalities=(kind,), projector=projector)
    assert model.num_tokens(kind, example_input(kind)) == PROJECTED[projector](ENCODER_TOKENS[kind])
    batch = collate(model, tok, [[kind], [kind, kind]])
    model.train()
    out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, len(tok))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.encoders[kind].parameters())
    texts = model.generate(collate(model, tok, [[kind], [kind, kind]], train=False), tok, max_new_tokens=3)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


@pytest.mark.parametrize("family,kind,projector", DEFAULT_CASES)
def test_forward_backward_generate(family, kind, projector):
    _check_forward_backward_generate(family, kind, projector)


@pytest.mark.slow
@pytest.mark.parametrize("family,kind,projector", SLOW_CASES)
def test_forward_backward_generate_full_cross_product(family, kind, projector):
    _check_forward_backward_generate(family, kind, projector)


# ----------------------------------------------------------------------------- scatter

@pytest.mark.parametrize("family", FAMILIES)
def test_features_land_on_their_placeholders_in_order(family):
    model, tok = tiny(family)
    spec = [["image", "ehr", "image"], ["signal", "volume"], ["ehr"]]
    batch = collate(model, tok, spec)
    embeds, attention, positions = model.embed_inputs(**batch)
    table = model.llm.get_input_embeddings()
    ids = batch["input_ids"]
    expected = table(ids).clone()
    inputs = iter(examples(spec))
    for b, ex in enumerate(inputs):                         # each item alone through encoder + projector
        for kind, x in ex["modalities"]:
            enc = model.encoders[kind]
            xb = x.unsqueeze(0)
            out = enc(xb[..., 0], missing=xb[..., 1] > 0.5) if kind == "ehr" else enc(xb)
            tokens, _ = model.projectors[kind](out.features, out.mask)      # [1, M, H]
            row = (ids[b] == model.config.placeholder_token_ids[kind]).nonzero().flatten()
            taken = (expected[b, row] != table(ids[b, row])).any(-1)         # positions already filled
            start = int((~taken).nonzero()[0])
            expected[b, row[start: start + tokens.shape[1]]] = tokens[0]
    torch.testing.assert_close(embeds, expected)
    assert torch.equal(attention, batch["attention_mask"])                 # all projector masks True
    assert torch.equal(positions[batch["attention_mask"].bool()],
                       torch.cat([torch.arange(int(n)) for n in batch["attention_mask"].sum(1)]))


def test_tokens_encoded_ahead_item_by_item_give_the_same_embeddings():
    """encode_item per item, passed back as modality_tokens, equals encoding the collated batch; a kind
    given ahead is not encoded again (its modality_inputs are ignored)."""
    model, tok = tiny("llama")
    model.eval()
    spec = [["image", "ehr", "image"], ["signal", "volume"], ["ehr"]]
    batch = collate(model, tok, spec, train=False)
    with torch.no_grad():
        ref = model.embed_inputs(**batch)
        ahead: dict = {}
        for ex in examples(spec):
            for kind, x in ex["modalities"]:
                tokens, mask = model.encode_item(kind, x)
                assert tokens.shape == (model.num_tokens(kind, x), model.llm.config.hidden_size)
                assert mask.shape == tokens.shape[:1] and mask.dtype == torch.bool
                ahead.setdefault(kind, []).append((tokens, mask))
        broken = {k: torch.full_like(v, float("nan")) for k, v in batch["modality_inputs"].items()}
        got = model.embed_inputs(**{**batch, "modality_inputs": broken, "modality_tokens": ahead})
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    with pytest.raises(InputError, match="expected 5 <image> placeholder tokens .* found 10"):  # one missing
        model.embed_inputs(**{**batch, "modality_tokens": {**ahead, "image": ahead["image"][:1]}})
    with pytest.raises(InputError, match="kind"):
        model.encode_item("audio", torch.zeros(3))


def test_masked_projector_tokens_get_no_attention(mask_first_token):
    model, tok = tiny("llama", modalities=("image",))
    mask_first_token(model, "image")
    batch = collate(model, tok, [["image", "image"]])
    _, attention, _ = model.embed_inputs(**batch)
    pid = model.config.placeholder_token_ids["image"]
    where = (batch["input_ids"][0] == pid).nonzero().flatten().tolist()
    first_of_each = {where[0], where[5]}                   # two images x 5 tokens
    assert [int(attention[0, i]) for i in where] == [0 if i in first_of_each else 1 for i in where]
    others = [i for i in range(attention.shape[1]) if i not in first_of_each]
    assert torch.equal(attention[0, others], batch["attention_mask"][0, others])


def test_list_inputs_allow_different_shapes_per_item():
    model, tok = tiny("qwen2", modalities=("signal",))
    g = torch.Generator().manual_seed(1)
    sig = [torch.randn(12, 100, generator=g), torch.randn(12, 150, generator=g)]   # 4 and 6 tokens
    exs = [{"record": record(i, ["signal"]), "modalities": [("signal", s)]} for i, s in enumerate(sig)]
    listed = MultimodalCollator(tok, 512, model.num_tokens, stack_modalities=False)(exs)
    assert listed["modality_num_tokens"] == [[4], [6]]
    embeds, _, _ = model.embed_inputs(**listed)
    pid = model.config.placeholder_token_ids["signal"]
    for b, s in enumerate(sig):
        out = model.encoders["signal"](s[None])
        want, _ = model.projectors["signal"](out.features, out.mask)
        torch.testing.assert_close(embeds[b, listed["input_ids"][b] == pid], want[0])
    stacked = MultimodalCollator(tok, 512, model.num_tokens)(exs)       # zero-padded to 150 samples: 2 x 6
    with pytest.raises(InputError, match=r"expected 12 <signal> placeholder tokens for 2 signal inputs x 6 "
                                         r"tokens, found 10"):
        model(**stacked)


def test_question_embeds_reach_a_question_guided_volume_encoder():
    from medmllm.data.tokenizers import build_tokenizer
    from medmllm.model.builders import assemble, build_llm_for, llm_config, tiny_encoder_specs

    tok = build_tokenizer("llama3")
    spec = tiny_encoder_specs()["volume"]
    spec["kwargs"]["query_dim"] = 8
    torch.manual_seed(0)
    llm = build_llm_for("llama", llm_config("llama", tok, hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64))
    model = assemble(llm, tok, {"volume": spec}, {"volume": {"name": "linear", "kwargs": {"in_dim": 32, "out_dim": 32}}})
    batch = collate(model, tok, [["volume"], ["volume", "volume"]])
    question = torch.randn(2, 8)                                        # one per sample
    with_q, _, _ = model.embed_inputs(**batch, question_embeds=question)
    without, _, _ = model.embed_inputs(**batch)
    where = batch["input_ids"] == model.config.placeholder_token_ids["volume"]
    x, index = batch["modality_inputs"]["volume"], batch["modality_batch_index"]["volume"]
    assert index.tolist() == [0, 1, 1]
    out = model.encoders["volume"](x, question=question[index])       # each volume gets its sample's question
    tokens, _ = model.projectors["volume"](out.features, out.mask)     # [3, 7, 32]
    torch.testing.assert_close(with_q[where], tokens.reshape(-1, 32))
    assert not torch.allclose(with_q[where], without[where])
    assert torch.isfinite(model(**batch, question_embeds=question).loss)


# ----------------------------------------------------------------------------- errors

def test_placeholder_feature_mismatch_is_input_error():
    model, tok = tiny("llama", modalities=("image", "ehr"))
    batch = collate(model, tok, [["image"], ["image", "ehr"]])
    pid = model.config.placeholder_token_ids["image"]
    ids = batch["input_ids"].clone()
    first = (ids == pid).nonzero()[0]
    ids[first[0], first[1]] = tok.pad_token_id                            # one placeholder fewer
    with pytest.raises(InputError) as ei:
        model(**{**batch, "input_ids": ids})
    assert ei.value.path == "input_ids"
    assert ei.value.reason == "expected 10 <image> placeholder tokens for 2 image inputs x 5 tokens, found 9"

    no_ehr = {**batch, "modality_inputs": {"image": batch["modality_inputs"]["image"]}}
    with pytest.raises(InputError, match=r"expected 0 <ehr> placeholder tokens \(no ehr inputs given\), found 12"):
        model(**no_ehr)
    swapped = {**batch, "modality_batch_index": {**batch["modality_batch_index"], "image": torch.tensor([1, 1])}}
    with pytest.raises(InputError, match=r"expected \[0, 10\] <image> placeholder tokens per row"):
        model(**swapped)
    with pytest.raises(InputError, match="modality_inputs"):
        model(**{**batch, "modality_inputs": {**batch["modality_inputs"], "volume": torch.zeros(1, 1, 3, 16, 16)}})
    with pytest.raises(ConfigError, match="no 'volume' encoder"):
        model.num_tokens("volume", (1, 3, 16, 16))


# ----------------------------------------------------------------------------- loss

@pytest.mark.parametrize("family", FAMILIES)
def test_loss_is_cross_entropy_on_assistant_tokens_only(family):
    model, tok = tiny(family, modalities=("image", "signal"))
    batch = collate(model, tok, [["image"], ["signal", "image"]])
    labels = batch["labels"]
    for kind, pid in model.config.placeholder_token_ids.items():
        assert (labels[batch["input_ids"] == pid] == IGNORE_INDEX).all()
    # the labelled tokens decode to each answer + end of turn
    eot = tok.eos_token
    assert [tok.decode(r[r != IGNORE_INDEX]) for r in labels] == [f"Yes.{eot}", f"No, it is normal.{eot}"]
    with torch.no_grad():
        out = model(**batch)
    logits, targets = out.logits[:, :-1], labels[:, 1:]                 # token t predicts t + 1
    keep = targets != IGNORE_INDEX
    manual = F.cross_entropy(logits[keep].float(), targets[keep])
    torch.testing.assert_close(out.loss, manual)
    # labelling every position instead (what a collator without assistant masks would do) changes it
    with torch.no_grad():
        everywhere = model(**{**batch, "labels": torch.where(batch["attention_mask"].bool(), batch["input_ids"],
                                                             IGNORE_INDEX)})
    assert not torch.allclose(everywhere.loss, manual)


# ----------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_auto_from_pretrained_identical_logits(family, tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    model, tok = tiny(family, projector="resampler")
    model.set_trainable("encoder", False)
    batch = collate(model, tok, [["image", "ehr"], ["volume", "signal"]])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    assert AutoConfig.from_pretrained(tmp_path).model_type == "medmllm"
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is MedMLLM and isinstance(loaded.config, MedMLLMConfig)
    assert type(loaded.llm) is type(model.llm)
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, loaded.eval()(**batch).logits)
    assert loaded.config.placeholder_token_ids == model.config.placeholder_token_ids
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == \
           {n: p.requires_grad for n, p in model.named_parameters()}
    if model.llm.config.tie_word_embeddings:
        assert loaded.llm.lm_head.weight is loaded.llm.get_input_embeddings().weight
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is MedMLLM


def test_every_tensor_is_saved_and_loaded(tmp_path):
    model, _ = tiny("llama")
    model.train()
    model.encoders["image"](torch.rand(2, 1, 16, 16))                     # moves BatchNorm statistics
    model.save_pretrained(tmp_path)
    loaded = MedMLLM.from_pretrained(tmp_path)
    want, got = model.state_dict(), loaded.state_dict()
    assert sorted(want) == sorted(got)
    assert all(torch.equal(want[k], got[k]) for k in want)


# ----------------------------------------------------------------------------- compose

def test_compose_records_specs_and_resizes_embeddings():
    from medmllm.model.builders import llm_config, build_llm_for, tiny_encoder_specs
    from medmllm.model.mllm import build_encoder_from_spec, build_projector_from_spec
    from medmllm.data.tokenizers import build_tokenizer

    tok = build_tokenizer("qwen2")
    cfg = llm_config("qwen2", tok, hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64)
    cfg.vocab_size = len(tok) - 10
    llm = build_llm_for("qwen2", cfg)
    enc_spec = tiny_encoder_specs()["image"]
    proj_spec = {"name": "pool", "kwargs": {"in_dim": 32, "out_dim": 32, "factor": 3}}
    enc, proj = build_encoder_from_spec(enc_spec), build_projector_from_spec(proj_spec)
    model = MedMLLM.compose(llm, {"image": enc}, {"image": proj}, tok,
                            encoder_specs={"image": enc_spec}, projector_specs={"image": proj_spec})
    assert model.llm.get_input_embeddings().num_embeddings == len(tok)
    assert model.config.llm_config["vocab_size"] == len(tok)
    assert model.config.encoders["image"] == enc_spec and model.config.projectors["image"] == proj_spec
    assert model.encoders["image"] is enc and model.projectors["image"] is proj
    assert model.num_tokens("image", (1, 16, 16)) == 2                   # ceil(5 / 3)
    with pytest.raises(ConfigError, match="pass its spec"):
        MedMLLM.compose(llm, {"image": enc}, {"image": proj}, tok, encoder_specs={"image": enc_spec})
    wrong = {"name": "pool", "kwargs": {"in_dim": 32, "out_dim": 32, "hidden": 8}}
    with pytest.raises(ConfigError, match="does not rebuild"):
        MedMLLM.compose(llm, {"image": enc}, {"image": proj}, tok, encoder_specs={"image": enc_spec},
                        projector_specs={"image": wrong})
    with pytest.raises(ConfigError, match="out_dim"):
        bad = build_projector_from_spec({"name": "mlp", "kwargs": {"in_dim": 32, "out_dim": 16}})
        MedMLLM.compose(llm, {"image": enc}, {"image": bad}, tok)


# ----------------------------------------------------------------------------- groups

def test_set_trainable_freezes_groups_and_param_groups_carry_lrs():
    model, tok = tiny("gemma", modalities=("image", "signal"))
    assert list(model.groups()) == ["llm", "encoder.image", "encoder.signal", "projector.image",
                                    "projector.signal"]
    assert model.set_trainable("llm", False) == ["llm"]
    assert model.set_trainable("encoder", False) == ["encoder.image", "encoder.signal"]
    assert model.set_trainable("encoder.signal", True) == ["encoder.signal"]
    batch = collate(model, tok, [["image", "signal"]])
    model.train()
    model(**batch).loss.backward()
    for group, module in model.groups().items():
        frozen = group in ("llm", "encoder.image")
        for p in module.parameters():
            assert p.requires_grad is not frozen and (p.grad is None) is frozen, group
    groups = model.param_groups({"projector": 1e-3, "projector.signal": 5e-4, "encoder.*": 1e-5}, default_lr=2e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("encoder.signal", 1e-5), ("projector.image", 1e-3),
                                                      ("projector.signal", 5e-4)]
    for g in groups:
        assert [id(p) for p in g["params"]] == [id(p) for p in model.groups()[g["name"]].parameters()]
    assert [g["lr"] for g in model.param_groups(default_lr=3e-4)] == [3e-4] * 3
    opt = torch.optim.AdamW(groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p) is (not p.requires_grad), n
    assert model.config.trainable == {"llm": False, "encoder.image": False, "encoder.signal": True}
    with pytest.raises(ConfigError, match="no module group matches 'decoder'"):
        model.set_trainable("decoder", False)
    with pytest.raises(ConfigError):
        model.param_groups({"encoder.volume": 1e-4})


def test_frozen_groups_stay_in_eval_mode_so_batchnorm_stats_do_not_move():
    import torch

    from medmllm.model.builders import example_input, tiny

    model, _ = tiny(modalities=("image",))
    model.set_trainable("encoder.*", False)
    model.train()
    assert not model.encoders["image"].training and model.projectors["image"].training and model.llm.training
    stats = {k: v.clone() for k, v in model.encoders["image"].state_dict().items() if "running" in k}
    assert stats
    model.encoders["image"](example_input("image", torch.Generator().manual_seed(0))[None])
    after = model.encoders["image"].state_dict()
    assert all(torch.equal(v, after[k]) for k, v in stats.items())
    model.set_trainable("encoder.*", True)
    model.train()
    assert model.encoders["image"].training
