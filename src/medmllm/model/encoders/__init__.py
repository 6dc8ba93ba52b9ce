"""Modality encoders: tensor -> :class:`EncoderOutput` (tokens ``[B, N, out_dim]`` + mask ``[B, N]``).

The contract is in :mod:`medmllm.model.encoders.base`. ``ENCODERS`` maps exact names to builders:

=============  ==============================  ==================================
name           builder                         tokens N
=============  ==============================  ==================================
``hf_image``   :func:`hf_image_encoder`        ``(H//p) * (W//p)`` (CLS dropped)
``cnn_image``  :class:`CNNImageEncoder`        ``grid**2 + 1``
``volume_vit`` :class:`VolumePatchViT`         ``(D//pd) * (H//ph) * (W//pw)``
``cnn_volume`` :class:`CNNVolumeEncoder`       ``gd * g * g + 1``
``slice3d``    :func:`slice_encoder_3d`        ``D * k + 1``
``ecg``        :class:`ECGEncoder`             ``ceil(T / prod(patch))`` (stage-wise ceil)
``ehr``        :class:`EHRFeatureTokenizer`    ``F``
=============  ==============================  ==================================
"""

from __future__ import annotations

from typing import Any

from torch import nn

from medmllm.errors import ConfigError
from medmllm.model.encoders.base import MODALITIES, EncoderOutput, ModalityEncoder
from medmllm.model.encoders.ehr import EHRFeatureTokenizer
from medmllm.model.encoders.image import (CNNImageEncoder, HFImageEncoder, hf_image_encoder,
                                          tiny_cnn_image_encoder)
from medmllm.model.encoders.signal import ECGEncoder
from medmllm.model.encoders.volume import CNNVolumeEncoder, SliceEncoder3D, VolumePatchViT
from medmllm.registry import Registry

ENCODERS: Registry = Registry("encoder")


def slice_encoder_3d(image_encoder: nn.Module | dict[str, Any], k: int = 4,
                     query_dim: int | None = None) -> SliceEncoder3D:
    """:class:`SliceEncoder3D` whose ``image_encoder`` is a module or a spec ``{"name": ..., **kw}``."""
    if isinstance(image_encoder, dict):
        spec = dict(image_encoder)
        if "name" not in spec:
            raise ConfigError(f"slice3d image_encoder spec needs a 'name', got keys {sorted(spec)}")
        image_encoder = build_encoder(spec.pop("name"), **spec)
    if getattr(image_encoder, "modality", None) != "image":
        raise ConfigError(f"slice3d needs an image encoder, got {type(image_encoder).__name__}")
    return SliceEncoder3D(image_encoder, k=k, query_dim=query_dim)


ENCODERS.register("hf_image", hf_image_encoder)
ENCODERS.register("cnn_image", CNNImageEncoder)
ENCODERS.register("volume_vit", VolumePatchViT)
ENCODERS.register("slice3d", slice_encoder_3d)
ENCODERS.register("cnn_volume", CNNVolumeEncoder)
ENCODERS.register("ecg", ECGEncoder)
ENCODERS.register("ehr", EHRFeatureTokenizer)


def build_encoder(name: str, **kw) -> nn.Module:
    """Build the encoder registered as ``name`` with keyword arguments ``kw``."""
    return ENCODERS.get(name)(**kw)


__all__ = ["ENCODERS", "MODALITIES", "CNNImageEncoder", "ECGEncoder", "EHRFeatureTokenizer", "EncoderOutput",
           "CNNVolumeEncoder", "HFImageEncoder", "ModalityEncoder", "SliceEncoder3D", "VolumePatchViT", "build_encoder",
           "hf_image_encoder", "slice_encoder_3d", "tiny_cnn_image_encoder"]
