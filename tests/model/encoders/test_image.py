"""Image encoders: HF vision towers (tiny configs saved and reloaded) and the full-resolution CNN."""

import pytest
import torch
from torch import nn

from medmllm.errors import ConfigError, InputError
from medmllm.model.encoders import (ENCODERS, CNNImageEncoder, HFImageEncoder, build_encoder,
                                    hf_image_encoder, tiny_cnn_image_encoder)

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=8)
# (config class, model class, has a CLS token)
TOWERS = {
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel", False),
    "clip": ("CLIPVisionConfig", "CLIPVisionModel", True),
    "dinov2": ("Dinov2Config", "Dinov2Model", True),
    "vit": ("ViTConfig", "ViTModel", True),
}
PATCHES = (32 // 8) ** 2


def _pixels(batch, seed=0, size=32, channels=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g)


def _weighted_loss(features):
    g = torch.Generator().manual_seed(123)
    return (features * torch.randn(features.shape, generator=g)).sum()


@pytest.fixture(scope="module")
def tower_dirs(tmp_path_factory):
    """Save each tiny tower once; return {kind: (path, model class)}."""
    out = {}
    for kind, (cfg_name, model_name, _) in TOWERS.items():
        torch.manual_seed(0)
        model_cls = getattr(transformers, model_name)
        model = model_cls(getattr(transformers, cfg_name)(**TINY))
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        out[kind] = (path, model_cls)
    return out


@pytest.fixture(scope="module")
def loaded(tower_dirs):
    """{kind: (encoder loaded by hf_image_encoder, the same tower loaded directly by its class)}."""
    return {kind: (hf_image_encoder(str(path)), model_cls.from_pretrained(path).eval())
            for kind, (path, model_cls) in tower_dirs.items()}


@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_hf_features_are_the_towers_hidden_state_without_cls(loaded, kind):
    enc, ref = loaded[kind]
    has_cls = TOWERS[kind][2]
    for batch in (1, 3):
        x = _pixels(batch)
        with torch.no_grad():
            out = enc(x)
            hidden = ref(pixel_values=x, output_hidden_states=True).hidden_states[-2]

        assert enc.modality == "image" and enc.out_dim == 32
        assert hidden.shape[1] == PATCHES + int(has_cls)      # the tower itself has (or not) a CLS
        assert out.features.shape == (batch, PATCHES, 32)
        assert out.mask.shape == (batch, PATCHES) and out.mask.dtype == torch.bool and bool(out.mask.all())
        assert enc.num_tokens((3, 32, 32)) == out.features.shape[1] == enc.num_tokens((batch, 3, 32, 32))
        torch.testing.assert_close(out.features, hidden[:, int(has_cls):], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_hf_keep_cls_and_other_feature_layer(loaded, kind):
    tower, ref = loaded[kind]
    has_cls = TOWERS[kind][2]
    enc = HFImageEncoder(tower.vision_model, feature_layer=1, drop_cls=False)
    x = _pixels(2)
    with torch.no_grad():
        out = enc(x)
        hidden = ref(pixel_values=x, output_hidden_states=True).hidden_states[1]
    assert out.features.shape[1] == PATCHES + int(has_cls) == enc.num_tokens((3, 32, 32))
    torch.testing.assert_close(out.features, hidden, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_hf_grads_match_the_tower_and_are_finite(loaded, kind):
    enc, ref = loaded[kind]
    has_cls = int(TOWERS[kind][2])
    enc.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    x = _pixels(2, seed=1)

    _weighted_loss(enc(x).features).backward()
    _weighted_loss(ref(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, has_cls:]).backward()

    got = dict(enc.vision_model.named_parameters())
    used = [n for n, p in ref.named_parameters() if p.grad is not None]
    assert any("embed" in n for n in used)                     # gradient reaches the patch embedding
    for name, p in ref.named_parameters():
        if p.grad is None:                                     # layers after feature_layer, pooler
            assert got[name].grad is None, name
            continue
        assert torch.isfinite(got[name].grad).all(), name
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-4, atol=1e-6)


def test_hf_full_clip_model_is_reduced_to_its_vision_tower(tmp_path):
    cfg = transformers.CLIPConfig(vision_config=TINY, projection_dim=16,
                                  text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=64))
    transformers.CLIPModel(cfg).save_pretrained(tmp_path)
    enc = hf_image_encoder(str(tmp_path))
    assert isinstance(enc.vision_model, transformers.CLIPVisionModel)
    assert enc(_pixels(1)).features.shape == (1, PATCHES, 32)


def test_hf_errors(loaded, tmp_path):
    with pytest.raises(ConfigError):
        hf_image_encoder(str(tmp_path))                        # an existing folder without a model
    enc = loaded["vit"][0]
    with pytest.raises(ConfigError):
        HFImageEncoder(enc.vision_model, feature_layer=3)      # 2 layers -> hidden_states has 3 entries
    assert HFImageEncoder(enc.vision_model, feature_layer=-3).feature_layer == -3
    with pytest.raises(InputError):
        enc(_pixels(1, channels=1))
    with pytest.raises(InputError):
        enc(torch.randn(3, 32, 32))

    class Unknown(nn.Module):
        config = transformers.PretrainedConfig(hidden_size=8, num_hidden_layers=1, patch_size=4)

    with pytest.raises(ConfigError):
        HFImageEncoder(Unknown())
    assert HFImageEncoder(Unknown(), num_prefix_tokens=2).num_tokens((3, 8, 8)) == 4


def test_hf_builder_is_registered(tower_dirs):
    path, _ = tower_dirs["siglip"]
    enc = build_encoder("hf_image", name_or_path=str(path))
    assert isinstance(enc, HFImageEncoder) and enc.num_tokens((3, 32, 32)) == PATCHES


# ----------------------------------------------------------------------------- CNN

def _check_finite_grads(module, loss):
    loss.backward()
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(64, 64), (50, 70)])
def test_cnn_shapes_and_token_count(batch, size):
    torch.manual_seed(0)
    enc = tiny_cnn_image_encoder()
    x = torch.randn(batch, 1, *size)
    out = enc(x)
    assert enc.modality == "image" and enc.out_dim == 64
    assert out.features.shape == (batch, 4 * 4 + 1, 64)
    assert out.mask.shape == (batch, 17) and bool(out.mask.all())
    assert enc.num_tokens((1, *size)) == out.features.shape[1]


def test_cnn_grid_without_global_token():
    enc = CNNImageEncoder(in_channels=3, width=4, depth=2, out_dim=8, grid=3, global_token=False)
    out = enc(torch.randn(2, 3, 24, 24))
    assert out.features.shape == (2, 9, 8) == (2, enc.num_tokens((3, 24, 24)), enc.out_dim)


def test_cnn_grads_finite():
    torch.manual_seed(0)
    enc = tiny_cnn_image_encoder().train()
    _check_finite_grads(enc, _weighted_loss(enc(torch.randn(2, 1, 32, 32)).features))


def test_cnn_deterministic_with_seed():
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))

    def run(seed):
        torch.manual_seed(seed)
        return tiny_cnn_image_encoder()(x).features

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_cnn_small_finding_changes_its_own_cell_only():
    # receptive field of the tiny CNN: 47 px (hand-computed); cells are 32 px at 128 px / grid 4
    torch.manual_seed(0)
    enc = tiny_cnn_image_encoder().eval()
    x = torch.zeros(1, 1, 128, 128)
    spot = x.clone()
    spot[0, 0, 15:18, 15:18] = 5.0                            # a 3x3 px nodule in cell (0, 0)
    with torch.no_grad():
        a, b = enc(x).features[0], enc(spot).features[0]      # [17, 64]
    changed = (a - b).abs().amax(dim=1) > 1e-6                # [17]
    assert changed[0] and changed[16]                         # its cell and the global max token
    far = [4 * r + c for r in range(4) for c in range(4) if r >= 2 or c >= 2]
    assert not changed[far].any()


def test_cnn_wrong_input():
    enc = tiny_cnn_image_encoder()
    with pytest.raises(InputError):
        enc(torch.randn(1, 3, 32, 32))
    with pytest.raises(InputError):
        enc(torch.randint(0, 9, (1, 1, 32, 32)))


def test_encoder_registry_names():
    assert ENCODERS.names() == sorted(["hf_image", "cnn_image", "volume_vit", "slice3d", "cnn_volume", "ecg", "ehr"])
    enc = build_encoder("cnn_image", in_channels=1, width=4, depth=1, out_dim=8, grid=2)
    assert isinstance(enc, CNNImageEncoder) and enc.num_tokens((1, 16, 16)) == 5
    with pytest.raises(ConfigError):
        build_encoder("CNN_image")


@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_hf_layers_after_the_feature_layer_are_not_run(loaded, kind):
    import copy

    enc, ref = loaded[kind]
    from medmllm.model.encoders.image import _tower_layers

    layers = _tower_layers(enc.vision_model)
    assert len(layers) == TINY["num_hidden_layers"]
    calls = []
    hooks = [m.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, m in enumerate(layers)]
    try:
        with torch.no_grad():
            enc(_pixels(1))
    finally:
        for h in hooks:
            h.remove()
    assert calls == list(range(len(layers) - 1))              # feature_layer -2: the last layer never runs
    assert set(enc.state_dict()) == {f"vision_model.{k}" for k in enc.vision_model.state_dict()}
    twin = copy.deepcopy(enc)                                 # the copy stops at its own layer
    with torch.no_grad():
        torch.testing.assert_close(twin(_pixels(2)).features, enc(_pixels(2)).features, rtol=0, atol=0)
        ref_hidden = ref(pixel_values=_pixels(2), output_hidden_states=True).hidden_states[-2]
    assert torch.equal(enc(_pixels(2)).features, ref_hidden[:, int(TOWERS[kind][2]):])
