"""3D lesion presence from the volume encoder alone, on every CT volume of a MedPhantom build.

Each volume is scored by the highest voxel logit of the encoder's decoder (``aux["voxel_logits"]``, what
the LLM's volume tokens carry) and called "lesion" when that logit is above ``--threshold`` (0: p = 0.5).
Use a build the model never trained on, e.g. a volume-only one of another seed than the quickstart's 0
and 1, to measure on many more volumes than the quickstart's 32 test questions:

    medmllm phantoms --out data/ct3d_seed2 --n 300 --seed 2 --modalities ct3d
    python scripts/volume_heldout.py --model runs/quickstart/instruct/model --build data/ct3d_seed2

Prints (and with ``--out`` writes) accuracy at the threshold, ROC AUC, and accuracy per lesion organ.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def volume_scores(model, build: Path, batch: int = 16) -> tuple[list[dict], list[float]]:
    """The build's ct3d cases and, per case, the highest voxel logit of ``model``'s volume encoder."""
    import torch

    from medmllm.data.dataset import PartLoader
    from medmllm.errors import InputError
    from medmllm.model.inspect import modality_shapes_for
    from medmllm.train.encoder_stage import VOXEL_KEY, load_items, read_cases

    if "volume" not in model.encoders:
        raise InputError("model", "expected a model with a volume encoder")
    encoder = model.encoders["volume"].eval()
    cases = [c for c in read_cases(build) if c.get("modality") == "ct3d"]
    if not cases:
        raise InputError(Path(build) / "cases.jsonl", "expected ct3d cases, found none")
    items = load_items(build, cases, ["volume"], PartLoader(modality_shapes_for(model), cache_items=0))
    scores: list[float] = []
    with torch.no_grad():
        for i in range(0, len(items), batch):
            out = encoder(torch.stack([it.tensor for it in items[i:i + batch]]))
            if VOXEL_KEY not in out.aux:
                raise InputError("model", f"its volume encoder returns no {VOXEL_KEY} (a decoder is needed)")
            scores += out.aux[VOXEL_KEY].flatten(1).amax(1).tolist()
    return cases, scores


def summarise(cases: list[dict], scores: list[float], threshold: float = 0.0) -> dict:
    """Accuracy at ``threshold``, ROC AUC (ties count half) and accuracy per lesion organ ("none": no lesion)."""
    organs = [c["truth"]["findings"]["lesion"].get("organ") or "none" for c in cases]
    truth = [o != "none" for o in organs]
    calls = [s > threshold for s in scores]
    pos = [s for s, y in zip(scores, truth) if y]
    neg = [s for s, y in zip(scores, truth) if not y]
    auc = (sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))) if pos and neg else None
    by: dict = collections.defaultdict(lambda: [0, 0])
    for o, c, y in zip(organs, calls, truth):
        by[o][0] += c == y
        by[o][1] += 1
    right = sum(c == y for c, y in zip(calls, truth))
    return {"volumes": len(cases), "threshold": threshold, "accuracy": right / len(cases), "right": right,
            "auc": auc, "by_organ": {o: {"right": a, "n": n} for o, (a, n) in sorted(by.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a saved medmllm model folder")
    ap.add_argument("--build", required=True, help="a MedPhantom build folder holding ct3d cases")
    ap.add_argument("--threshold", type=float, default=0.0, help="voxel logit above which a volume is 'lesion'")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    from medmllm.io import write_json
    from medmllm.model.mllm import MedMLLM

    model = MedMLLM.from_pretrained(args.model)
    result = {"model": args.model, "build": args.build,
              **summarise(*volume_scores(model, Path(args.build)), threshold=args.threshold)}
    if args.out:
        write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
