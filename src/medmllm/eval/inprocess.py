"""In-process evaluation of a composed model: batched greedy answers for records, with ablations.

``predict(model, tokenizer, records, base_dir, shapes)`` loads each record's files through
:class:`~medmllm.data.dataset.PartLoader`, builds generation prompts with the same collator as
training (``train=False``, left padding) and decodes answers with ``model/generate``.

``ablation`` replaces every modality tensor before the model sees it — the trust checks that
show whether a model looks at its input at all:

* ``"blank"``: zeros (a black image / flat signal / all-missing EHR);
* ``"noise"``: uniform noise in the tensor's value range (EHR: random values, none missing).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

from medmllm.errors import ConfigError

ABLATIONS = (None, "blank", "noise")


def ablate(kind: str, x: torch.Tensor, how: str | None, generator: torch.Generator) -> torch.Tensor:
    """The modality tensor ``x`` replaced as ``how`` says (see module doc); ``None`` keeps it."""
    if how is None:
        return x
    if how == "blank":
        if kind == "ehr":  # every value missing
            out = torch.zeros_like(x)
            out[..., 1] = 1.0
            return out
        return torch.zeros_like(x)
    if how == "noise":
        if kind == "ehr":
            out = torch.randn(x.shape, generator=generator)
            out[..., 1] = 0.0
            return out
        if kind == "signal":
            return torch.randn(x.shape, generator=generator)
        return torch.rand(x.shape, generator=generator)
    raise ConfigError(f"ablation: expected one of {ABLATIONS}, got {how!r}")


def predict(model, tokenizer, records: Sequence[dict], base_dir: str | os.PathLike, shapes=None, *,
            batch_size: int = 32, max_new_tokens: int = 16, max_length: int = 512, ablation: str | None = None,
            seed: int = 0, progress: bool = True, on_batch: Callable[[list[str], list[str]], None] | None = None,
            temperature: float = 0.0, top_p: float = 1.0) -> list[str | None]:
    """Answers, one per record (``None`` where the record's files could not be read): greedy, or
    with ``temperature > 0`` nucleus sampling (``top_p``) seeded per batch from ``seed``.

    ``on_batch(ids, answers)`` is called after each batch (e.g. to stream predictions to a file).
    """
    from tqdm.auto import tqdm

    from medmllm.data.collate import MultimodalCollator
    from medmllm.data.dataset import ModalityShapes, PartLoader, RecordDataset
    from medmllm.model.generate import generate

    if ablation not in ABLATIONS:
        raise ConfigError(f"ablation: expected one of {ABLATIONS}, got {ablation!r}")
    if shapes is None:                                                 # what the model's encoders fix
        from medmllm.model.inspect import modality_shapes_for

        shapes = modality_shapes_for(model)
    ds = RecordDataset(list(records), PartLoader(shapes, cache_items=4096), base_dir=base_dir)
    collate = MultimodalCollator(tokenizer, max_length=max_length, num_tokens_fn=model.num_tokens,
                                 truncation="drop", train=False)
    gen = torch.Generator().manual_seed(seed)
    out: list[str | None] = [None] * len(ds)
    bar = tqdm(total=len(ds), desc=f"eval{'' if ablation is None else ' (' + ablation + ')'}",
               disable=not progress, unit="q")
    model.eval()
    for start in range(0, len(ds), batch_size):
        idx = list(range(start, min(start + batch_size, len(ds))))
        items = {i: ds[i] for i in idx}
        good = [i for i in idx if items[i] is not None]
        for i in good:
            items[i]["modalities"] = [(k, ablate(k, t, ablation, gen)) for k, t in items[i]["modalities"]]
        if good:
            batch = collate([items[i] for i in good])
            kept = {rid: pos for pos, rid in enumerate(batch["ids"])}
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, seed=seed + start) \
                if temperature > 0 else {}
            answers = generate(model, batch, tokenizer, max_new_tokens=max_new_tokens, **sampling) \
                if batch["ids"] else []
            for i in good:
                pos = kept.get(ds.records[i]["id"])
                if pos is not None:
                    out[i] = answers[pos].strip()
            if on_batch is not None:
                on_batch([ds.records[i]["id"] for i in good], [out[i] for i in good])
        bar.update(len(idx))
    bar.close()
    return out
