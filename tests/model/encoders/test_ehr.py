"""EHR feature tokenizer: one token per feature, learned missing embedding, never zero-for-missing."""

import pytest
import torch

from medmllm.errors import ConfigError, InputError
from medmllm.model.encoders import EHRFeatureTokenizer, build_encoder


def _values(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _enc(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_features=6, dim=8)
    cfg.update(kw)
    return EHRFeatureTokenizer(**cfg)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("depth", [0, 1])
def test_shapes_and_token_count(batch, depth):
    enc = _enc(depth=depth, heads=2)
    values = _values((batch, 6))
    out = enc(values, torch.zeros(batch, 6, dtype=torch.bool))
    assert enc.modality == "ehr" and enc.out_dim == 8
    assert out.features.shape == (batch, 6, 8)
    assert out.mask.shape == (batch, 6) and bool(out.mask.all())     # missing features are still tokens
    assert enc.num_tokens((6,)) == enc.num_tokens((batch, 6)) == out.features.shape[1]


def test_tokens_by_hand_and_missing_embedding_regardless_of_garbage():
    enc = _enc()
    values = _values((2, 6))
    missing = torch.zeros(2, 6, dtype=torch.bool)
    missing[0, 1] = missing[1, 4] = missing[1, 5] = True
    tokens = {}
    for garbage in (0.0, 1e6, -3.0, float("nan"), float("inf")):
        v = values.masked_fill(missing, garbage)
        with torch.no_grad():
            tokens[garbage] = enc(v, missing).features
    W, b, M = enc.weight.detach(), enc.bias.detach(), enc.missing_embedding.detach()
    for garbage, t in tokens.items():
        for i in range(2):
            for f in range(6):
                want = M[f] if missing[i, f] else values[i, f] * W[f] + b[f]
                torch.testing.assert_close(t[i, f], want, msg=f"garbage={garbage} row={i} feature={f}")
    # a missing value is not the same as a measured zero
    assert not torch.allclose(M[1], b[1])


def test_transformer_output_ignores_garbage_and_nan_gives_finite_grads():
    enc = _enc(depth=1, heads=2).train()
    values = _values((3, 6))
    missing = torch.rand(3, 6, generator=torch.Generator().manual_seed(1)) < 0.4
    a = enc(values.masked_fill(missing, 123.0), missing).features
    b = enc(values.masked_fill(missing, float("nan")), missing).features
    torch.testing.assert_close(a, b)
    w = torch.randn(b.shape, generator=torch.Generator().manual_seed(2))
    (b * w).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_nan_means_missing_when_no_mask_given():
    enc = _enc()
    values = _values((1, 6))
    values[0, 2] = float("nan")
    with torch.no_grad():
        out = enc(values).features
    torch.testing.assert_close(out[0, 2], enc.missing_embedding[2].detach())


def test_deterministic_with_seed():
    values = _values((2, 6), seed=3)
    run = lambda seed: _enc(seed, depth=1, heads=2)(values).features  # noqa: E731
    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_errors_and_builder():
    enc = _enc()
    with pytest.raises(InputError):
        enc(_values((2, 5)))                                   # 5 features, model has 6
    with pytest.raises(InputError):
        enc(_values((2, 6)), torch.zeros(2, 5, dtype=torch.bool))
    bad = _values((1, 6))
    bad[0, 0] = float("inf")
    with pytest.raises(InputError, match="missing"):
        enc(bad, torch.zeros(1, 6, dtype=torch.bool))          # unmarked non-finite value
    with pytest.raises(InputError):
        enc.num_tokens((2, 7))
    with pytest.raises(ConfigError):
        EHRFeatureTokenizer(0, 8)
    built = build_encoder("ehr", n_features=3, dim=4)
    assert isinstance(built, EHRFeatureTokenizer) and built.num_tokens((3,)) == 3
