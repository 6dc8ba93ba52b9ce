"""PartLoader / RecordDataset on a small MedPhantom build: shapes, and that findings survive loading."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medmllm.data import preprocess as P
from medmllm.data.dataset import ModalityShapes, PartLoader, RecordDataset, skip_bad_items
from medmllm.data.records import read_records


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from medmllm.data.phantoms.build import build_phantoms

    out = tmp_path_factory.mktemp("ph")
    build_phantoms(out, 80, seed=5, workers=1, progress=False)
    cases = {c["case_id"]: c for c in map(json.loads, (out / "cases.jsonl").read_text().splitlines())}
    recs = []
    for split in ("train", "validation", "test"):
        recs += read_records(out / "records" / f"{split}.jsonl")[0]
    return out, cases, recs


def _first(recs, modality, pred=lambda r: True):
    return next(r for r in recs if r["meta"]["modality"] == modality and pred(r))


def _part(rec):
    return next(p for p in rec["messages"][0]["content"] if p["type"] != "text")


def test_xray_nodule_survives_loading(phantom):
    out, cases, recs = phantom
    rec = _first(recs, "xray", lambda r: cases[r["meta"]["extra"]["case_id"]]["truth"]["findings"]["nodule"]["present"])
    truth = cases[rec["meta"]["extra"]["case_id"]]["truth"]["findings"]["nodule"]
    x, text = PartLoader()(_part(rec), out / "records")
    assert x.shape == (1, 128, 128) and x.dtype == torch.float32 and text is None
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    r, c = (int(round(v)) for v in truth["center_rc"])
    radius = max(1, int(truth["diameter_px"] / 2))
    yy, xx = np.mgrid[:128, :128]
    d = np.hypot(yy - r, xx - c)
    img = x[0].numpy()
    inside, ring = img[d <= max(1, radius - 1)].mean(), img[(d > radius + 2) & (d <= radius + 5)].mean()
    assert inside > ring  # the nodule is denser (brighter) than the lung around it


def test_ct_slice_window_matches_pydicom(phantom):
    import pydicom

    out, cases, recs = phantom
    rec = _first(recs, "ct")
    part = _part(rec)
    x, _ = PartLoader()(part, out / "records")
    ds = pydicom.dcmread((out / "records" / part["path"]).resolve())
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    c, w = P.CT_WINDOWS.get(part["options"]["window"])
    expected = np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1)  # DICOM linear window, by hand
    np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-5)


def test_volume_lesion_is_where_the_truth_says(phantom):
    out, cases, recs = phantom
    twins = [c for c in cases.values() if c["modality"] == "ct3d" and c.get("counterfactual_of")]
    if not twins:
        pytest.skip("no 3D counterfactual twin in this small build")
    twin = twins[0]
    orig = cases[twin["counterfactual_of"]]
    load = PartLoader()
    wide = {"window": "lung"}  # a wide window (-1350..150 HU): a lesion in any organ, lung included, shows
    a, _ = load({"type": "volume", "path": orig["files"]["nifti"], "options": wide}, out)
    b, _ = load({"type": "volume", "path": twin["files"]["nifti"], "options": wide}, out)
    assert a.shape == b.shape == (1, 32, 64, 64) and 0 <= float(a.min()) and float(a.max()) <= 1
    lesion = (cases[orig["case_id"]]["truth"]["findings"]["lesion"]
              if orig["truth"]["findings"]["lesion"]["present"] else twin["truth"]["findings"]["lesion"])
    differs = (a != b)[0].any(dim=(1, 2)).nonzero().flatten().tolist()
    # the windowed twins differ exactly on the lesion's slices (or a subset, where the window clips)
    d0, d1 = lesion["slice_range"]
    assert differs and d0 <= min(differs) and max(differs) <= d1


def test_multi_window_volume_has_one_channel_per_window(phantom):
    out, cases, recs = phantom
    case = next(c for c in cases.values() if c["modality"] == "ct3d")
    part = {"type": "volume", "path": case["files"]["nifti"]}
    shapes = ModalityShapes(volume_window="multi", volume_windows=("lung", "liver", "abdomen"))
    x, _ = PartLoader(shapes)(part, out)
    assert shapes.volume_channels == 3 and x.shape == (3, 32, 64, 64)
    for k, name in enumerate(shapes.volume_windows):     # each channel = that single window
        one, _ = PartLoader(ModalityShapes(volume_window=name))(part, out)
        torch.testing.assert_close(x[k], one[0])


def test_volume_windows_must_be_three():
    with pytest.raises(Exception, match="volume_windows"):
        ModalityShapes(volume_windows=("lung", "liver"))


def test_ecg_keeps_heart_rate_after_resampling(phantom):
    from scipy.signal import find_peaks

    out, cases, recs = phantom
    rec = _first(recs, "ecg")
    truth = cases[rec["meta"]["extra"]["case_id"]]["truth"]
    shapes = ModalityShapes()
    x, _ = PartLoader(shapes)(_part(rec), out / "records")
    assert x.shape == (12, shapes.signal_samples)
    np.testing.assert_allclose(x.mean(dim=1).numpy(), 0, atol=1e-4)
    lead2 = x[1].numpy()
    peaks, _ = find_peaks(lead2, height=np.percentile(lead2, 99) * 0.5, distance=int(0.25 * shapes.signal_fs))
    rate = 60.0 / (np.diff(peaks).mean() / shapes.signal_fs)
    assert abs(rate - truth["heart_rate_bpm"]) < 5


def test_ehr_values_missing_flags_and_notes(phantom):
    out, cases, recs = phantom
    rec = _first(recs, "ehr")
    part = _part(rec)
    doc = json.loads((out / "records" / part["path"]).resolve().read_text())
    x, text = PartLoader()(part, out / "records")
    feats = ModalityShapes().ehr_features
    assert x.shape == (len(feats), 2)
    for j, f in enumerate(feats):
        raw = doc["vitals"].get(f) or doc["labs"].get(f)
        if raw is None:
            assert x[j, 1] == 1.0 and x[j, 0] == 0.0
        else:
            lo, hi, _ = P.EHR_REFERENCE_RANGES[f]
            z = (raw["value"] - (lo + hi) / 2) / ((hi - lo) / (2 * 1.96))
            assert x[j, 1] == 0.0 and float(x[j, 0]) == pytest.approx(z, rel=1e-5, abs=1e-5)
    assert text.startswith("Clinical note: ") and doc["notes"][0].strip()[:20] in text


def test_inline_ehr_data():
    x, text = PartLoader()({"type": "ehr", "data": {"vitals": {"temp_c": 39.0}, "note": "Febrile."}})
    feats = ModalityShapes().ehr_features
    j = feats.index("temp_c")
    assert x[j, 1] == 0 and float(x[j, 0]) > 2  # 39 C is far above the reference mid-point
    assert x[:, 1].sum() == len(feats) - 1
    assert text == "Clinical note: Febrile."


def test_record_dataset_skips_bad_items_and_collates(phantom, tmp_path):
    from medmllm.data.collate import MultimodalCollator
    from medmllm.data.tokenizers import build_tokenizer

    out, cases, recs = phantom
    ehr = _first(recs, "ehr")
    xray = _first(recs, "xray")
    broken = json.loads(json.dumps(xray))
    broken["id"] = "broken"
    _part(broken)["path"] = "../xray/does_not_exist.dcm"
    ds = RecordDataset([ehr, xray, broken], PartLoader(cache_items=8), base_dir=out / "records")
    items = [ds[i] for i in range(len(ds))]
    assert items[2] is None and "does_not_exist.dcm" in ds.errors[0]
    kinds = [p["type"] for p in items[0]["record"]["messages"][0]["content"]]
    assert kinds[:2] == ["ehr", "text"] and items[0]["record"]["messages"][0]["content"][1]["text"].startswith("Clinical note")
    tok = build_tokenizer("llama3")
    collate = skip_bad_items(MultimodalCollator(tok, max_length=256, num_tokens_fn=lambda kind, t: 3))
    batch = collate(items)
    assert batch["skipped"] == 1 and batch["input_ids"].shape[0] == 2
    assert (batch["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum() == 3
