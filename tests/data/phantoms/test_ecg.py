"""Synthetic ECGs: labels re-derived from the signal with scipy, WFDB checked against wfdb."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from medmllm.data.phantoms.ecg import EDGE_S, RHYTHMS, generate_ecg, write_wfdb

FS = 500
N_CASES = 500


@pytest.fixture(scope="module")
def cases():
    return [generate_ecg(np.random.default_rng([11, i])) for i in range(N_CASES)]


def detect_r_peaks(lead: np.ndarray, fs: int = FS) -> np.ndarray:
    """R-peak times (s) of one lead: 5-25 Hz band-pass (QRS band), then scipy find_peaks."""
    from scipy import signal

    b, a = signal.butter(3, [5.0, 25.0], btype="band", fs=fs)
    x = signal.filtfilt(b, a, lead.astype(np.float64))
    peaks, _ = signal.find_peaks(x, height=0.4 * x.max(), distance=int(0.2 * fs))
    t = peaks / fs
    duration = lead.size / fs
    return t[(t >= EDGE_S) & (t <= duration - EDGE_S)]  # the truth counts R peaks inside this margin


def test_shape_dtype_and_json_truth(cases):
    sig, truth = cases[0]
    assert sig.shape == (12, 5000) and sig.dtype == np.float32
    assert truth["lead_names"] == ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    assert truth["fs"] == FS and truth["modality"] == "ecg"
    assert json.loads(json.dumps(truth)) == truth
    assert np.isfinite(sig).all()


def test_same_rng_same_ecg_other_rng_other_ecg():
    a, ta = generate_ecg(np.random.default_rng([3, 7]))
    b, tb = generate_ecg(np.random.default_rng([3, 7]))
    c, _ = generate_ecg(np.random.default_rng([3, 8]))
    assert np.array_equal(a, b) and ta == tb
    assert not np.array_equal(a, c)


def test_fewer_leads_are_the_first_standard_leads():
    sig, truth = generate_ecg(np.random.default_rng(0), fs=250, duration_s=5.0, n_leads=3)
    assert sig.shape == (3, 1250) and truth["lead_names"] == ["I", "II", "III"]
    with pytest.raises(ValueError):
        generate_ecg(np.random.default_rng(0), n_leads=13)


def test_heart_rate_from_detected_r_peaks_matches_truth(cases):
    for sig, truth in cases[:150]:
        peaks = detect_r_peaks(sig[1])
        hr = 60.0 / np.mean(np.diff(peaks))
        assert abs(hr - truth["heart_rate_bpm"]) < 3.0, (truth["rhythm"], hr, truth["heart_rate_bpm"])


def test_rate_classes_hold_on_the_detected_rate(cases):
    for sig, truth in cases[:250]:
        hr = 60.0 / np.mean(np.diff(detect_r_peaks(sig[1])))
        rhythm = truth["rhythm"]
        if rhythm == "sinus bradycardia":
            assert hr < 60
        elif rhythm == "sinus tachycardia":
            assert hr > 100
        elif rhythm in ("normal sinus rhythm", "st elevation"):
            assert 60 <= hr <= 100


def test_af_rr_irregularity_clearly_above_sinus(cases):
    cv = {"af": [], "sinus": []}
    for sig, truth in cases[:250]:
        rr = np.diff(detect_r_peaks(sig[1]))
        cv["af" if truth["rhythm"] == "atrial fibrillation" else "sinus"].append(rr.std() / rr.mean())
    assert len(cv["af"]) > 20
    assert min(cv["af"]) > 2 * max(cv["sinus"]), (min(cv["af"]), max(cv["sinus"]))


def test_st_elevation_measured_at_j_plus_60ms(cases):
    """Mean over beats of x(R + 100 ms) - x(R - 50 ms) (PR segment baseline), max over leads."""
    ste, other = [], []
    for sig, truth in cases[:250]:
        r = np.asarray(truth["r_peak_times_s"])
        r = r[(r > 0.1) & (r < 9.8)]
        elev = (sig[:, np.round((r + 0.1) * FS).astype(int)] - sig[:, np.round((r - 0.05) * FS).astype(int)]).mean(1)
        if truth["rhythm"] == "st elevation":
            assert abs(elev.max() - truth["st_elevation_mm"] * 0.1) < 0.06
            ste.append(elev.max())
        else:
            assert truth["st_elevation_mm"] == 0.0
            other.append(elev.max())
    assert min(ste) > max(other) + 0.05


def test_rhythm_classes_balanced(cases):
    counts = Counter(t["rhythm"] for _, t in cases)
    assert set(counts) == set(RHYTHMS)
    for rhythm, k in counts.items():  # expected 100 each, sd ~9
        assert 70 <= k <= 130, counts


def test_signal_is_noisy_and_amplitude_varies(cases):
    """Baseline wander: lead II's 2 s moving mean moves; R amplitudes differ across cases."""
    r_amp = []
    for sig, truth in cases[:40]:
        lead = sig[1].astype(np.float64)
        baseline = np.convolve(lead, np.ones(1000) / 1000, mode="valid")
        assert np.ptp(baseline) > 0.02
        r_amp.append(np.percentile(lead, 99.5) - np.median(lead))
    assert max(r_amp) / min(r_amp) > 1.5


def test_wfdb_round_trip_with_wfdb_rdrecord(tmp_path, cases):
    import wfdb

    sig, truth = cases[3]
    paths = write_wfdb(tmp_path, "rec1", sig, truth["fs"], truth["lead_names"], comments=["synthetic"])
    assert sorted(p.name for p in paths) == ["rec1.dat", "rec1.hea"]
    rec = wfdb.rdrecord(str(tmp_path / "rec1"))
    assert rec.fs == FS and rec.sig_name == truth["lead_names"] and rec.units == ["mV"] * 12
    assert rec.comments == ["synthetic"]
    np.testing.assert_allclose(rec.p_signal.T, sig, atol=0.0005 + 1e-6)  # 1 uV quantisation
    assert sorted(x.name for x in tmp_path.iterdir()) == ["rec1.dat", "rec1.hea"]  # no temp files left


def test_wfdb_bytes_equal_wfdb_wrsamp(tmp_path, cases):
    import wfdb

    sig, truth = cases[4]
    write_wfdb(tmp_path / "ours", "r", sig, FS, truth["lead_names"], comments=["a b", "c"])
    digital = np.clip(np.round(sig.astype(np.float64) * 1000), -32767, 32767).astype(np.int64).T
    ref = tmp_path / "ref"
    ref.mkdir()
    wfdb.wrsamp("r", fs=FS, units=["mV"] * 12, sig_name=truth["lead_names"], d_signal=digital, fmt=["16"] * 12,
                adc_gain=[1000.0] * 12, baseline=[0] * 12, comments=["a b", "c"], write_dir=str(ref))
    for ext in ("hea", "dat"):
        assert (tmp_path / "ours" / f"r.{ext}").read_bytes() == (ref / f"r.{ext}").read_bytes()
