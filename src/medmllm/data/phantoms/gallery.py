"""A one-page picture of a MedPhantom build: a few cases per modality with their ground truth."""

from __future__ import annotations

import json
import os
from pathlib import Path


def _first(cases: list[dict], modality: str, k: int, pred=lambda c: True) -> list[dict]:
    return [c for c in cases if c["truth"]["modality"] == modality and pred(c)][:k]


def write_gallery(out_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Render ``out_dir/gallery.png`` (X-rays, CT slices, CT volumes, ECGs) from a finished build.

    Reads the files back through medmllm's readers, so the picture shows what a model gets.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medmllm.data.preprocess import window_preset
    from medmllm.data.readers import read
    from medmllm.io import atomic_open

    out = Path(out_dir)
    cases = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(4, 4, figsize=(12, 12))
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    for i, c in enumerate(_first(cases, "xray", 4)):
        img, _ = read(out / "xray" / f"{c['case_id']}.dcm")
        f = c["truth"]["findings"]
        nod = f"nodule {f['nodule']['side']} {f['nodule']['zone']} {f['nodule']['diameter_mm']:.0f} mm" \
            if f["nodule"]["present"] else "no nodule"
        eff = f"effusion {f['effusion']['side']}" if f["effusion"]["present"] else "no effusion"
        axes[0, i].imshow(img, cmap="gray")
        axes[0, i].set_title(f"X-ray: {nod}\n{eff}, CTR {f['cardiomegaly']['ctr']:.2f}", fontsize=8)
    for i, c in enumerate(_first(cases, "ct", 4)):
        hu, _ = read(out / "ct" / f"{c['case_id']}.dcm")
        les = c["truth"]["findings"]["lesion"]
        axes[1, i].imshow(window_preset(hu, c["truth"]["window"]), cmap="gray")
        desc = f"lesion {les['side']} {les['diameter_mm']:.0f} mm" if les["present"] else "no lesion"
        axes[1, i].set_title(f"CT {c['truth']['organ']} ({c['truth']['window']} window)\n{desc}", fontsize=8)
    for i, c in enumerate(_first(cases, "ct3d", 4, lambda c: c["truth"]["findings"]["lesion"]["present"])):
        nii = next(p for p in (out / "ct3d" / f"{c['case_id']}.nii", out / "ct3d" / f"{c['case_id']}.nii.gz") if p.exists())
        vol, _ = read(nii)
        les = c["truth"]["findings"]["lesion"]
        d = int(round(les["center_dhw"][0]))
        axes[2, i].imshow(window_preset(vol[d], "abdomen"), cmap="gray")
        axes[2, i].set_title(f"CT volume, slice {d}\nlesion: {les['organ']}, slices {les['slice_range']}", fontsize=8)
    for i, c in enumerate(_first(cases, "ecg", 4)):
        hea = next((out / "ecg").glob(f"{c['case_id']}*.hea"))
        sig, meta = read(hea)
        lead = meta["lead_names"].index("II") if "II" in meta["lead_names"] else 0
        n = min(sig.shape[1], int(4 * meta["fs"]))
        axes[3, i].plot(sig[lead, :n], lw=0.6)
        axes[3, i].set_title(f"ECG lead II (4 s)\n{c['truth']['rhythm']}, {c['truth']['heart_rate_bpm']:.0f} bpm", fontsize=8)
    fig.suptitle("MedPhantom: cases read back through medmllm's readers, with their ground truth", fontsize=11)
    fig.tight_layout()
    target = Path(path) if path else out / "gallery.png"
    with atomic_open(target, "wb") as fh:
        fig.savefig(fh, format="png", dpi=72, metadata={"Software": None})
    plt.close(fig)
    return target
