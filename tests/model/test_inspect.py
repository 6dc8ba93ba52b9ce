"""inspect_flow on a tiny all-modality model: shapes, token counts and norms against the encoders and
projectors run directly, placeholder spans, attention shares against one uncached eager forward pass,
the PNG, ModalityShapes derived from the model, and the `medmllm inspect` command on saved files.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from medmllm.data.collate import MultimodalCollator
from medmllm.data.records import make_record, media
from medmllm.errors import ConfigError
from medmllm.model.builders import example_input, tiny
from medmllm.model.generate import generate_ids
from medmllm.model.inspect import format_flow, inspect_flow, modality_shapes_for, plot_flow

META = {"dataset": "toy", "split": "test"}
KINDS = ("image", "volume", "signal", "ehr")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; two OpenMP threads on shared, busy cores spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def _model():
    model, tok = tiny("llama")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():            # a wider spread than the init: attention far from uniform
        for name, p in model.llm.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3, generator=g)
    return model, tok


def _examples(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"record": make_record("all", [media(k, "x") for k in KINDS] + ["What is shown?"], None, META),
             "modalities": [(k, example_input(k, g)) for k in KINDS]},
            {"record": make_record("two", [media("image", "x"), "Is the heart enlarged? Answer in one word.",
                                           media("image", "y")], None, META),
             "modalities": [("image", example_input("image", g)), ("image", example_input("image", g))]}]


@pytest.fixture(scope="module")
def flow_and_batch():
    model, tok = _model()
    batch = MultimodalCollator(tok, 512, model.num_tokens, train=False)(_examples())
    return inspect_flow(model, batch, tok, max_new_tokens=6), batch


def _direct(kind, x):
    """Encoder then projector, called directly: (features, mask, tokens, mask)."""
    model, _ = _model()
    enc = model.encoders[kind]
    out = enc(x[..., 0], missing=x[..., 1] > 0.5) if kind == "ehr" else enc(x)
    tokens, mask = model.projectors[kind](out.features, out.mask)
    return out.features, out.mask, tokens, mask


def _norm_stats(x, mask):
    n = x.norm(dim=-1)[mask].numpy().astype(np.float64)
    return n.mean(), n.std()


def test_shapes_tokens_and_norms_match_the_modules(flow_and_batch):
    flow, batch = flow_and_batch
    model, _ = _model()
    assert list(flow["modalities"]) == list(KINDS)
    for kind in KINDS:
        x = batch["modality_inputs"][kind]
        m = flow["modalities"][kind]
        want = [model.num_tokens(kind, item) for item in x]
        assert m["input_shapes"] == [list(item.shape) for item in x]
        assert m["encoder"]["tokens_per_item"] == m["projector"]["tokens_per_item"] == want
        with torch.no_grad():
            feats, fmask, toks, tmask = _direct(kind, x)
        assert m["encoder"]["shapes"] == [list(feats.shape)] and m["projector"]["shapes"] == [list(toks.shape)]
        assert feats.shape[-1] == 32 and toks.shape[-1] == flow["batch"]["hidden"] == 32
        for entry, (mean, std) in ((m["encoder"], _norm_stats(feats, fmask)),
                                   (m["projector"], _norm_stats(toks, tmask))):
            assert entry["norm_mean"] == pytest.approx(mean, rel=1e-5)
            assert entry["norm_std"] == pytest.approx(std, rel=1e-4, abs=1e-7)
    assert len(flow["modalities"]["image"]["input_shapes"]) == 3            # 1 + 2 images over two rows


def test_spans_cover_exactly_the_placeholders(flow_and_batch):
    flow, batch = flow_and_batch
    model, _ = _model()
    ids = batch["input_ids"]
    for kind in KINDS:
        m = flow["modalities"][kind]
        covered = {(s["row"], c) for s in m["spans"] for c in range(s["start"], s["end"])}
        placeholders = {tuple(p) for p in (ids == model.config.placeholder_token_ids[kind]).nonzero().tolist()}
        assert covered == placeholders
        assert [s["end"] - s["start"] for s in m["spans"]] == m["projector"]["tokens_per_item"]
    rows = [s["row"] for s in flow["modalities"]["image"]["spans"]]
    assert rows == batch["modality_batch_index"]["image"].tolist() == [0, 1, 1]


def test_text_embedding_norms(flow_and_batch):
    flow, batch = flow_and_batch
    model, _ = _model()
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    text = real.clone()
    for token_id in model.config.placeholder_token_ids.values():
        text &= ids != token_id
    with torch.no_grad():
        mean, std = _norm_stats(model.llm.get_input_embeddings()(ids), text)
    assert flow["text"]["tokens"] == int(text.sum())
    assert flow["text"]["norm_mean"] == pytest.approx(mean, rel=1e-5)
    assert flow["text"]["norm_std"] == pytest.approx(std, rel=1e-4)


def test_generation_equals_generate_and_shares_are_distributions(flow_and_batch):
    flow, batch = flow_and_batch
    model, tok = _model()
    g = flow["generation"]
    assert g["tokens"] == generate_ids(model, batch, tok, max_new_tokens=6)
    assert g["sources"] == [*KINDS, "text", "generated"]
    share = np.asarray(g["attention_share"])
    assert share.shape == (model.llm.config.num_hidden_layers, len(g["sources"]))
    assert np.all(share >= 0) and np.all(share <= 1)
    np.testing.assert_allclose(share.sum(axis=1), 1.0, atol=1e-5)
    assert model.llm.config._attn_implementation == "sdpa"                  # switched back after


def test_shares_equal_one_uncached_forward_pass():
    """One row: the cached decoding's shares == attention rows of a single eager pass over prompt + answer."""
    model, tok = _model()
    batch = MultimodalCollator(tok, 512, model.num_tokens, train=False)(_examples(seed=3)[:1])
    flow = inspect_flow(model, batch, tok, max_new_tokens=5)
    gen = flow["generation"]
    steps = gen["queries"]                                     # one row: one query per step
    answer = torch.tensor([gen["tokens"][0][: steps - 1]])                  # [1, steps - 1]
    ids = batch["input_ids"]
    length = ids.shape[1]
    with torch.no_grad():
        prompt, _, _ = model.embed_inputs(**{k: batch[k] for k in ("input_ids", "attention_mask", "modality_inputs")})
        seq = torch.cat([prompt, model.llm.get_input_embeddings()(answer)], dim=1)   # [1, L + steps - 1, H]
        model.llm.set_attn_implementation("eager")
        try:
            att = model.llm(inputs_embeds=seq, output_attentions=True).attentions
        finally:
            model.llm.set_attn_implementation("sdpa")
    source = [next((k for k in KINDS if int(ids[0, j]) == model.config.placeholder_token_ids[k]), "text")
              for j in range(length)] + ["generated"] * (steps - 1)
    for layer, a in enumerate(att):
        rows = a[0].mean(0)[length - 1 : length - 1 + steps]               # [steps, K] (mean over heads)
        want = [float(sum(rows[:, j].sum() for j in range(len(source)) if source[j] == s)) / steps
                for s in gen["sources"]]
        np.testing.assert_allclose(gen["attention_share"][layer], want, atol=1e-5)


def test_report_and_png(flow_and_batch, tmp_path):
    flow, _ = flow_and_batch
    text = format_flow(flow)
    for kind in KINDS:
        assert kind in text
    assert "generated" in text and "layer" in text
    path = plot_flow(flow, tmp_path / "flow.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 500


def test_modality_shapes_for_the_tiny_model():
    from medmllm.data.dataset import DEFAULT_EHR_FEATURES

    model, _ = _model()
    shapes = modality_shapes_for(model, image_size=48, volume_shape=[4, 16, 16])
    assert shapes.image_channels == 1 and shapes.image_size == 48 and shapes.volume_shape == (4, 16, 16)
    assert len(shapes.signal_leads) == 12 and shapes.ehr_features == DEFAULT_EHR_FEATURES
    with pytest.raises(ConfigError, match="image_channels"):
        modality_shapes_for(model, image_channels=3)
    with pytest.raises(ConfigError, match="ehr_features"):
        modality_shapes_for(model, ehr_features=("heart_rate",))
    with pytest.raises(ConfigError, match="unknown"):
        modality_shapes_for(model, image_sise=3)


def test_a_three_channel_volume_encoder_gets_three_windows():
    from medmllm.model.builders import small

    model, _ = small(modalities=("volume",))
    assert modality_shapes_for(model).volume_window == "multi"         # small's slice encoder takes 3 channels
    assert modality_shapes_for(model, volume_window="lung").volume_window == "lung"   # an explicit choice wins
    tiny_model, _ = _model()
    assert modality_shapes_for(tiny_model).volume_window == "abdomen"  # 1 channel: the single default window


@pytest.mark.parametrize("which", ["png", "dicom"])
def test_cli_inspect_prints_the_flow(tmp_path, which):
    from typer.testing import CliRunner

    from medmllm.cli import app

    model, tok = tiny("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    if which == "png":
        path = tmp_path / "cxr.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8)).save(path)
    else:
        from pydicom.data import get_testdata_file

        path = get_testdata_file("CT_small.dcm")
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "model"), "--image", str(path), "--question",
                                   "What is shown?", "--plot", str(tmp_path / "flow.png"), "--image-size", "32",
                                   "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    assert "image    1x32x32" in res.output                  # loaded at the requested size, 1 channel
    assert "generated" in res.output and (tmp_path / "flow.png").stat().st_size > 0
    bad = CliRunner().invoke(app, ["inspect", str(tmp_path / "model"), "--question", "?"])
    assert bad.exit_code == 2 and "--image" in bad.output
