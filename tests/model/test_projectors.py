"""Projectors: (features [B, N, in], mask [B, N]) -> (tokens [B, M, out], mask [B, M])."""

import math

import pytest
import torch

from medmllm.errors import ConfigError, InputError
from medmllm.model.projectors import (PROJECTORS, LinearProjector, PoolProjector, ResamplerProjector,
                                      build_projector)

IN, OUT, N = 12, 16, 7
KW = {"linear": {}, "mlp": {"hidden": 20}, "resampler": {"num_queries": 5, "heads": 4, "depth": 2},
      "pool": {"factor": 3}}
EXPECTED_M = {"linear": N, "mlp": N, "resampler": 5, "pool": math.ceil(N / 3)}


def _features(batch, seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n, IN, generator=g)
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[:, -2:] = False                                       # the last two tokens are padding
    if batch > 1:
        mask[1, 2] = False
    return features, mask


def _build(name, seed=0):
    torch.manual_seed(seed)
    return build_projector(name, IN, OUT, **KW[name])


def test_registry_names():
    assert PROJECTORS.names() == ["linear", "mlp", "pool", "resampler"]
    with pytest.raises(ConfigError):
        build_projector("MLP", IN, OUT)


@pytest.mark.parametrize("name", sorted(KW))
@pytest.mark.parametrize("batch", [1, 3])
def test_shapes_and_token_count(name, batch):
    proj = _build(name)
    features, mask = _features(batch)
    tokens, out_mask = proj(features, mask)
    m = EXPECTED_M[name]
    assert tokens.shape == (batch, m, OUT)
    assert out_mask.shape == (batch, m) and out_mask.dtype == torch.bool
    assert proj.num_tokens(N) == m
    assert torch.equal(tokens[~out_mask], torch.zeros(int((~out_mask).sum()), OUT))   # masked -> zero
    no_mask_tokens, no_mask = proj(features)                    # mask None = all real
    assert no_mask_tokens.shape == (batch, m, OUT) and bool(no_mask.all())


@pytest.mark.parametrize("name", sorted(KW))
def test_masked_features_do_not_change_the_output(name):
    proj = _build(name).eval()
    features, mask = _features(3)
    perturbed = features.clone()
    perturbed[~mask] = torch.randn(int((~mask).sum()), IN) * 1e3
    perturbed[0, -1] = float("nan")
    with torch.no_grad():
        a, ma = proj(features, mask)
        b, mb = proj(perturbed, mask)
        c, _ = proj(features + 0.5, mask)                         # real features do matter
    assert torch.equal(ma, mb)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", sorted(KW))
def test_grads_finite(name):
    proj = _build(name).train()
    features, mask = _features(3)
    features.requires_grad_(True)
    tokens, _ = proj(features, mask)
    w = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(9))
    (tokens * w).sum().backward()
    for pname, p in proj.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert torch.equal(features.grad[~mask], torch.zeros(int((~mask).sum()), IN))   # no grad into padding


@pytest.mark.parametrize("name", sorted(KW))
def test_deterministic_with_seed(name):
    features, mask = _features(2)
    assert torch.equal(_build(name, 0)(features, mask)[0], _build(name, 0)(features, mask)[0])
    assert not torch.allclose(_build(name, 0)(features, mask)[0], _build(name, 1)(features, mask)[0])


def test_linear_is_the_linear_layer_on_real_tokens():
    proj = _build("linear")
    features, mask = _features(2)
    tokens, _ = proj(features, mask)
    want = features @ proj.proj.weight.T + proj.proj.bias
    torch.testing.assert_close(tokens[mask], want[mask])


def test_pool_is_the_masked_window_mean_then_mlp():
    torch.manual_seed(0)
    proj = PoolProjector(IN, OUT, factor=3)
    features, mask = _features(3)
    tokens, out_mask = proj(features, mask)
    for b in range(3):
        for m in range(3):                                     # windows [0:3], [3:6], [6:7]
            idx = [i for i in range(3 * m, min(3 * m + 3, N)) if mask[b, i]]
            if not idx:
                assert not out_mask[b, m]
                continue
            mean = features[b, idx].mean(dim=0)
            torch.testing.assert_close(tokens[b, m], proj.mlp(mean))
    assert out_mask[:, 2].tolist() == [False, False, False]   # window [6:7] is padding only


def test_resampler_row_without_real_tokens_is_empty_and_finite():
    proj = ResamplerProjector(IN, OUT, num_queries=3, heads=2)
    features, mask = _features(2)
    mask[0] = False
    tokens, out_mask = proj(features, mask)
    assert out_mask.tolist() == [[False] * 3, [True] * 3]
    assert torch.isfinite(tokens).all() and torch.equal(tokens[0], torch.zeros(3, OUT))


def test_resampler_output_does_not_depend_on_n():
    proj = _build("resampler").eval()
    features, mask = _features(1)
    real = features[:, mask[0]]                                # drop the padding tokens
    with torch.no_grad():
        torch.testing.assert_close(proj(features, mask)[0], proj(real)[0], rtol=1e-5, atol=1e-6)


def test_errors():
    with pytest.raises(ConfigError):
        ResamplerProjector(IN, OUT, heads=3)
    with pytest.raises(ConfigError):
        PoolProjector(IN, OUT, factor=0)
    proj = LinearProjector(IN, OUT)
    with pytest.raises(InputError):
        proj(torch.randn(2, N, IN + 1))
    with pytest.raises(InputError):
        proj(torch.randn(2, N, IN), torch.ones(2, N + 1, dtype=torch.bool))
