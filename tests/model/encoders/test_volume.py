"""Volume encoders: the 3D patch ViT and the slice-wise encoder with question-guided slice scores."""

import pytest
import torch

from medmllm.errors import ConfigError, InputError
from medmllm.model.encoders import (CNNImageEncoder, CNNVolumeEncoder, SliceEncoder3D, VolumePatchViT,
                                    build_encoder, tiny_cnn_image_encoder)


def _volume(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _weighted_loss(features):
    g = torch.Generator().manual_seed(123)
    return (features * torch.randn(features.shape, generator=g)).sum()


def _check_finite_grads(module, loss, skip=()):
    loss.backward()
    for name, p in module.named_parameters():
        if p.requires_grad and not name.startswith(skip):
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in module.parameters() if p.grad is not None)


def _vit(**kw):
    cfg = dict(patch=(4, 8, 8), dim=16, depth=2, heads=2, grid=(4, 4, 4), max_tokens=256)
    cfg.update(kw)
    return VolumePatchViT(**cfg)


# ----------------------------------------------------------------------------- VolumePatchViT

@pytest.mark.parametrize("batch", [1, 3])
def test_vit_shapes_and_token_count(batch):
    torch.manual_seed(0)
    enc = _vit()
    out = enc(_volume((batch, 1, 16, 32, 32)))
    assert enc.modality == "volume" and enc.out_dim == 16
    assert out.features.shape == (batch, 4 * 4 * 4, 16)
    assert out.mask.shape == (batch, 64) and out.mask.dtype == torch.bool and bool(out.mask.all())
    assert enc.num_tokens((1, 16, 32, 32)) == out.features.shape[1]


def test_vit_other_grid_interpolates_positions_and_floors_edges():
    torch.manual_seed(0)
    enc = _vit()
    x = _volume((2, 1, 10, 17, 30))                           # grid (2, 2, 3): edges dropped
    out = enc(x)
    assert out.features.shape == (2, 2 * 2 * 3, 16) == (2, enc.num_tokens(x.shape), 16)
    # the dropped edges do not matter
    torch.testing.assert_close(enc(x[:, :, :8, :16, :24]).features, out.features)


def test_vit_rejects_too_many_tokens_and_too_small_input():
    enc = _vit(max_tokens=32)
    with pytest.raises(InputError, match="max_tokens"):
        enc(_volume((1, 1, 16, 32, 32)))                      # 64 patches > 32
    with pytest.raises(InputError):
        enc(_volume((1, 1, 2, 32, 32)))                       # D < patch depth
    with pytest.raises(InputError):
        enc(_volume((1, 2, 16, 32, 32)))                      # 2 channels, model has 1
    with pytest.raises(ConfigError):
        _vit(dim=16, heads=3)


def test_vit_grads_finite():
    torch.manual_seed(0)
    enc = _vit()
    _check_finite_grads(enc, _weighted_loss(enc(_volume((2, 1, 16, 32, 32))).features))


def test_vit_deterministic_with_seed():
    x = _volume((2, 1, 16, 32, 32), seed=3)

    def run(seed):
        torch.manual_seed(seed)
        return _vit()(x).features

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


# ----------------------------------------------------------------------------- SliceEncoder3D

def _slice_enc(k=2, query_dim=8, seed=0):
    torch.manual_seed(seed)
    image = tiny_cnn_image_encoder(width=4, depth=2, out_dim=16, grid=2)   # 5 tokens per slice
    return SliceEncoder3D(image, k=k, query_dim=query_dim)


@pytest.mark.parametrize("batch", [1, 3])
def test_slice_shapes_and_token_count(batch):
    enc = _slice_enc(k=2)
    x = _volume((batch, 1, 5, 16, 16))
    out = enc(x, question=_volume((batch, 8), seed=1))
    assert enc.modality == "volume" and enc.out_dim == 16
    assert out.features.shape == (batch, 5 * 2 + 1, 16)
    assert out.mask.shape == (batch, 11) and bool(out.mask.all())
    assert enc.num_tokens((1, 5, 16, 16)) == out.features.shape[1]
    scores = out.aux["slice_scores"]
    assert scores.shape == (batch, 5)
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(batch))


def test_slice_without_question_at_init_is_a_plain_average():
    # the learned query starts at zero -> uniform scores 1/D -> weights D * 1/D = 1
    enc = _slice_enc(k=1, query_dim=None).eval()
    x = _volume((2, 1, 4, 16, 16))
    with torch.no_grad():
        out = enc(x)
        per_slice = torch.stack([enc.image_encoder(x[:, :, d]).features.mean(dim=1) for d in range(4)], 1)
    torch.testing.assert_close(out.aux["slice_scores"], torch.full((2, 4), 0.25))
    torch.testing.assert_close(out.features[:, :4], per_slice, rtol=1e-5, atol=1e-6)     # [B, D, e]
    torch.testing.assert_close(out.features[:, 4], per_slice.mean(dim=1), rtol=1e-5, atol=1e-6)


def test_slice_permutation_moves_scores_and_tokens_with_the_slices():
    enc = _slice_enc(k=2).eval()
    x, q = _volume((2, 1, 5, 16, 16)), _volume((2, 8), seed=1)
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        a = enc(x, question=q)
        b = enc(x[:, :, perm], question=q)
    torch.testing.assert_close(b.aux["slice_scores"], a.aux["slice_scores"][:, perm])
    tokens_a = a.features[:, :10].reshape(2, 5, 2, 16)
    tokens_b = b.features[:, :10].reshape(2, 5, 2, 16)
    torch.testing.assert_close(tokens_b, tokens_a[:, perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.features[:, 10], a.features[:, 10], rtol=1e-5, atol=1e-6)  # global
    assert not torch.allclose(a.aux["slice_scores"], torch.full((2, 5), 0.2))      # not trivially uniform


def test_slice_question_changes_scores():
    enc = _slice_enc().eval()
    x = _volume((1, 1, 5, 16, 16))
    with torch.no_grad():
        s1 = enc(x, question=_volume((1, 8), seed=1)).aux["slice_scores"]
        s2 = enc(x, question=_volume((1, 8), seed=2)).aux["slice_scores"]
        s0 = enc(x).aux["slice_scores"]
    assert not torch.allclose(s1, s2)
    assert not torch.allclose(s1, s0)
    # a question scaled up sharpens the same preference: the argmax slice is kept
    with torch.no_grad():
        s1x = enc(x, question=3 * _volume((1, 8), seed=1)).aux["slice_scores"]
    assert s1.argmax() == s1x.argmax() and s1x.max() > s1.max()


def test_slice_mask_excludes_padded_slices():
    enc = _slice_enc(k=2).eval()
    x, q = _volume((1, 1, 3, 16, 16)), _volume((1, 8), seed=1)
    padded = torch.cat([x, torch.full((1, 1, 2, 16, 16), 7.0)], dim=2)       # 2 junk slices
    mask = torch.tensor([[True, True, True, False, False]])
    with torch.no_grad():
        a = enc(x, question=q)
        b = enc(padded, question=q, slice_mask=mask)
    torch.testing.assert_close(b.aux["slice_scores"][:, :3], a.aux["slice_scores"])
    assert torch.equal(b.aux["slice_scores"][:, 3:], torch.zeros(1, 2))
    assert b.mask.tolist() == [[True] * 6 + [False] * 4 + [True]]
    torch.testing.assert_close(b.features[:, :6], a.features[:, :6], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.features[:, -1], a.features[:, -1], rtol=1e-5, atol=1e-6)


def test_slice_grads_finite():
    enc = _slice_enc().train()
    out = enc(_volume((2, 1, 4, 16, 16)), question=_volume((2, 8), seed=1))
    _check_finite_grads(enc, _weighted_loss(out.features))
    enc.zero_grad(set_to_none=True)
    out = enc(_volume((2, 1, 4, 16, 16)))                    # learned query only
    _check_finite_grads(enc, _weighted_loss(out.features), skip=("question_proj",))


def test_slice_deterministic_with_seed():
    x, q = _volume((2, 1, 4, 16, 16)), _volume((2, 8), seed=1)
    run = lambda seed: _slice_enc(seed=seed)(x, question=q).features  # noqa: E731
    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_slice_gray_volume_through_rgb_encoder_and_builder_spec():
    enc = build_encoder("slice3d", image_encoder={"name": "cnn_image", "in_channels": 3, "width": 4,
                                                  "depth": 1, "out_dim": 8, "grid": 2}, k=1)
    out = enc(_volume((2, 1, 3, 8, 8)))
    assert isinstance(enc.image_encoder, CNNImageEncoder)
    assert out.features.shape == (2, 3 * 1 + 1, 8) == (2, enc.num_tokens((1, 3, 8, 8)), 8)


def test_slice_errors():
    enc = _slice_enc(query_dim=None)
    with pytest.raises(ConfigError):
        enc(_volume((1, 1, 3, 16, 16)), question=torch.randn(1, 8))
    enc = _slice_enc(query_dim=8)
    with pytest.raises(InputError):
        enc(_volume((1, 1, 3, 16, 16)), question=torch.randn(1, 4))
    with pytest.raises(InputError):
        enc(_volume((1, 1, 3, 16, 16)), slice_mask=torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(InputError):
        enc(_volume((1, 3, 16, 16)))
    with pytest.raises(ConfigError):
        build_encoder("slice3d", image_encoder={"width": 4})


# ----------------------------------------------------------------------------- CNNVolumeEncoder

def test_cnn_volume_tokens_and_registry():
    enc = build_encoder("cnn_volume", in_channels=3, width=4, depth=3, out_dim=16, grid=[4, 2, 2])
    assert isinstance(enc, CNNVolumeEncoder) and enc.num_tokens((3, 32, 64, 64)) == 4 * 2 * 2 + 1
    out = enc(_volume((2, 3, 32, 64, 64)))
    assert out.features.shape == (2, 17, 16) and bool(out.mask.all())
    assert enc(_volume((1, 3, 12, 40, 24))).features.shape == (1, 17, 16)    # any size: same N
    with pytest.raises(InputError, match="channels"):
        enc(_volume((1, 1, 32, 64, 64)))
    with pytest.raises(ConfigError):
        CNNVolumeEncoder(width=0)


def test_cnn_volume_a_small_lesion_reaches_only_its_cell_and_the_global_token():
    torch.manual_seed(0)
    enc = CNNVolumeEncoder(in_channels=1, width=2, depth=3, out_dim=8, grid=(2, 2, 2)).eval()
    base = torch.zeros(1, 1, 64, 64, 64)
    lesion = base.clone()
    # a 3-voxel cube at 13..15 on every axis: cell (0, 0, 0) covers 0..31, and the stem's receptive
    # field (21 voxels: 3, then +2 x 2 at stride 2, then +2 x 4 at stride 4) keeps it inside
    lesion[0, 0, 13:16, 13:16, 13:16] = 5.0
    a, b = enc(base).features[0], enc(lesion).features[0]    # [9, 8]
    changed = (a - b).abs().amax(dim=1) > 1e-6
    # cells are depth-major then row-major: cell (0, 0, 0) is token 0; the global token is the last
    assert changed[0] and changed[-1] and not changed[1:-1].any()


def test_cnn_volume_grads_finite():
    enc = CNNVolumeEncoder(in_channels=1, width=4, depth=2, out_dim=8, grid=(2, 2, 2))
    _check_finite_grads(enc, _weighted_loss(enc(_volume((2, 1, 8, 16, 16))).features))


def test_cnn_volume_decoder_gives_half_resolution_voxel_logits_read_by_the_tokens():
    torch.manual_seed(0)
    enc = CNNVolumeEncoder(in_channels=3, width=2, depth=4, out_dim=8, grid=(2, 2, 2), decoder=True).eval()
    x = _volume((2, 3, 16, 32, 32))
    out = enc(x)
    assert out.features.shape == (2, 9, 8) and enc.num_tokens((3, 16, 32, 32)) == 9
    assert out.aux["voxel_logits"].shape == (2, 1, 8, 16, 16)
    # the logits start at a ~1% lesion prior
    assert abs(torch.sigmoid(enc.voxel_head.bias).item() - 0.01) < 1e-6
    # the tokens read the voxel logits: shifting them shifts every token (each cell's max moves)
    with torch.no_grad():
        enc.voxel_head.bias += 3.0
    shifted = enc(x)
    assert torch.allclose(shifted.aux["voxel_logits"], out.aux["voxel_logits"] + 3.0, atol=1e-5)
    assert ((shifted.features - out.features).abs().amax(-1) > 1e-4).all()
    no_dec = CNNVolumeEncoder(in_channels=3, width=2, depth=4, out_dim=8, grid=(2, 2, 2))
    assert "voxel_logits" not in no_dec(x).aux and not hasattr(no_dec, "voxel_head")


def test_cnn_volume_add_merge_decoder_by_hand_and_cheaper_than_concat():
    torch.manual_seed(0)
    kw = dict(in_channels=1, width=2, depth=3, out_dim=8, grid=(2, 2, 2), decoder=True)
    add, cat = CNNVolumeEncoder(**kw, merge="add").eval(), CNNVolumeEncoder(**kw).eval()
    # the 3x3x3 conv reads the level's width (2 * 2 = 4 channels), not level + coarser (4 + 8)
    assert add.up[0][0].in_channels == 4 and cat.up[0][0].in_channels == 12
    assert add.lateral[0].in_channels == 8 and add.lateral[0].out_channels == 4 and not hasattr(cat, "lateral")
    assert sum(p.numel() for p in add.parameters()) < sum(p.numel() for p in cat.parameters())
    x = _volume((2, 1, 8, 16, 16))
    maps = []
    h = x
    for level in add.stem:
        h = level(h)
        maps.append(h)
    # by hand: 1x1x1 lateral conv on the coarsest map, trilinear up to level 1, add its map, conv-norm-relu
    up = torch.nn.functional.interpolate(add.lateral[0](maps[2]), size=maps[1].shape[2:], mode="trilinear",
                                         align_corners=False)
    want = add.voxel_head(add.up[0](up + maps[1]))
    out = add(x)
    assert torch.allclose(out.aux["voxel_logits"], want, atol=1e-6)
    assert out.aux["voxel_logits"].shape == (2, 1, 4, 8, 8) and out.features.shape == (2, 9, 8)
    _check_finite_grads(add, _weighted_loss(out.features) + out.aux["voxel_logits"].mean())
    with pytest.raises(ConfigError, match="merge"):
        CNNVolumeEncoder(merge="sum")


def test_cnn_volume_decoder_and_norm_config_errors_and_instance_norm():
    with pytest.raises(ConfigError, match="depth >= 2"):
        CNNVolumeEncoder(depth=1, decoder=True)
    with pytest.raises(ConfigError, match="norm"):
        CNNVolumeEncoder(norm="group")
    enc = CNNVolumeEncoder(in_channels=1, width=2, depth=3, out_dim=8, grid=(2, 2, 2), decoder=True, norm="instance")
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in enc.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in enc.modules())
    out = enc(_volume((2, 1, 8, 16, 16)))
    _check_finite_grads(enc, _weighted_loss(out.features) + out.aux["voxel_logits"].mean())
