"""ECG encoder: token counts (ceil of T / total stride), padding masks, grads, determinism."""

import math

import pytest
import torch

from medmllm.errors import ConfigError, InputError
from medmllm.model.encoders import ECGEncoder, build_encoder
from medmllm.model.encoders.signal import sinusoidal_positions


def _ecg(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _enc(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_leads=12, dim=16, depth=2, heads=2, patch=(5, 5, 2))
    cfg.update(kw)
    return ECGEncoder(**cfg)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("t", [1000, 1003, 49, 1])
def test_shapes_and_token_count(batch, t):
    enc = _enc()
    out = enc(_ecg((batch, 12, t)))
    expected = math.ceil(t / 50)                              # ceil(ceil(a/b)/c) == ceil(a/(b*c))
    assert enc.modality == "signal" and enc.out_dim == 16
    assert out.features.shape == (batch, expected, 16)
    assert out.mask.shape == (batch, expected) and bool(out.mask.all())
    assert enc.num_tokens((12, t)) == enc.num_tokens((batch, 12, t)) == out.features.shape[1]


def test_padded_recording_gives_the_tokens_of_the_unpadded_one():
    enc = _enc().eval()
    short, long = _ecg((1, 12, 333), seed=1), _ecg((1, 12, 1000), seed=2)
    garbage = torch.full((1, 12, 1000 - 333), 1e3)
    batch = torch.cat([long, torch.cat([short, garbage], dim=2)])           # [2, 12, 1000]
    with torch.no_grad():
        out = enc(batch, lengths=torch.tensor([1000, 333]))
        alone = enc(short).features[0]                                       # [7, 16]
        alone_long = enc(long).features[0]
    n_short = math.ceil(333 / 50)
    assert out.mask[0].all() and out.mask[1].tolist() == [True] * n_short + [False] * (20 - n_short)
    torch.testing.assert_close(out.features[1, :n_short], alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.features[0], alone_long, rtol=1e-4, atol=1e-5)
    assert torch.equal(out.features[1, n_short:], torch.zeros(20 - n_short, 16))


def test_grads_finite_with_padding():
    enc = _enc().train()
    out = enc(_ecg((3, 12, 400)), lengths=torch.tensor([400, 120, 7]))
    w = torch.randn(out.features.shape, generator=torch.Generator().manual_seed(3))
    (out.features * w).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in enc.parameters())


def test_deterministic_with_seed():
    x = _ecg((2, 12, 500), seed=4)
    assert torch.equal(_enc(0)(x).features, _enc(0)(x).features)
    assert not torch.allclose(_enc(0)(x).features, _enc(1)(x).features)


def test_sinusoidal_positions_by_hand():
    table = sinusoidal_positions(3, 4)
    expected = torch.tensor([[math.sin(p), math.cos(p), math.sin(p / 100), math.cos(p / 100)] for p in range(3)])
    torch.testing.assert_close(table, expected)


def test_errors_and_builder():
    enc = _enc()
    with pytest.raises(InputError):
        enc(_ecg((1, 8, 100)))                                 # 8 leads, model has 12
    with pytest.raises(InputError):
        enc(_ecg((12, 100)))
    with pytest.raises(InputError):
        enc(_ecg((2, 12, 100)), lengths=torch.tensor([100, 0]))
    with pytest.raises(InputError):
        enc(_ecg((2, 12, 100)), lengths=torch.tensor([101, 5]))
    with pytest.raises(ConfigError):
        ECGEncoder(patch=(0, 2))
    one_lead = build_encoder("ecg", n_leads=1, dim=8, depth=1, heads=2, patch=4)
    assert one_lead(_ecg((2, 1, 9))).features.shape == (2, 3, 8) == (2, one_lead.num_tokens((1, 9)), 8)


def test_summary_tokens_are_the_masked_mean_and_max_of_the_recording():
    plain, summ = _enc(), _enc(summary_tokens=True)                       # same seed -> same weights
    short = _ecg((1, 12, 333), seed=1)
    batch = torch.cat([_ecg((1, 12, 1000), seed=2), torch.cat([short, torch.full((1, 12, 667), 1e3)], 2)])
    with torch.no_grad():
        out = summ(batch, lengths=torch.tensor([1000, 333]))
        ref = plain(short).features[0]                                      # [7, 16] tokens of the short one
    assert summ.num_tokens((12, 1000)) == out.features.shape[1] == 20 + 2
    assert out.mask[:, -2:].all() and out.mask[1, :-2].sum() == 7
    torch.testing.assert_close(out.features[1, -2], ref.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.features[1, -1], ref.amax(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.features[1, :7], ref, rtol=1e-4, atol=1e-5)
