"""Synthetic 12-lead ECGs with an exact rhythm label, and a deterministic WFDB writer.

Each beat is a sum of Gaussian bumps (P, Q, R, S, T) plus, for ST elevation, a
smooth plateau from the J point to the T wave. The frontal-plane leads follow
Einthoven's relations (III = II - I, aVR = -(I+II)/2, aVL = I - II/2, aVF = II - I/2)
from a heart vector per wave; the precordial leads use fixed per-wave gains.
On top come the things a model must see through: a per-case gain, beat-to-beat
amplitude change, baseline wander, mains hum and white noise.

Rhythm classes (uniform over the five):

* ``normal sinus rhythm``  regular RR, 65-95 bpm, P waves.
* ``sinus bradycardia``    regular RR, 40-54 bpm, P waves.
* ``sinus tachycardia``    regular RR, 106-140 bpm, P waves.
* ``atrial fibrillation``  irregular RR (coefficient of variation 0.15-0.30), 60-130 bpm,
  no P waves, fibrillatory 4-9 Hz baseline.
* ``st elevation``         sinus rhythm at 65-95 bpm with ST elevation of 1.5-3.5 mm
  (1 mm = 0.1 mV) in the inferior or anterior leads, reciprocal depression elsewhere.

The bands leave a margin round the 60 and 100 bpm cut-offs, so the class is never
ambiguous. ``heart_rate_bpm`` is ``60 / mean(rr_intervals_s)`` over the R peaks that
lie in the record, and the regular rhythms are rescaled so that number lands in the band.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

RHYTHMS = ("normal sinus rhythm", "atrial fibrillation", "sinus bradycardia", "sinus tachycardia", "st elevation")
LEAD_NAMES = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
# Heart-rate bands (bpm) the generator draws from; the clinical cut-offs are 60 and 100.
RATE_BANDS = {
    "normal sinus rhythm": (65.0, 95.0),
    "st elevation": (65.0, 95.0),
    "sinus bradycardia": (40.0, 54.0),
    "sinus tachycardia": (106.0, 140.0),
    "atrial fibrillation": (60.0, 130.0),
}
EDGE_S = 0.05  # R peaks closer than this to either end are not counted in rr_intervals_s

# Precordial gain per wave (rows V1..V6; columns P, Q, R, S, T).
_PRECORDIAL = np.array([
    [0.5, 0.0, 0.25, 1.6, -0.2],
    [0.6, 0.0, 0.5, 1.3, 0.6],
    [0.6, 0.2, 0.9, 0.9, 0.9],
    [0.6, 0.4, 1.4, 0.5, 1.0],
    [0.6, 0.6, 1.2, 0.3, 0.8],
    [0.5, 0.6, 0.9, 0.2, 0.6],
])


def _limb(amp: float, angle_deg: float) -> np.ndarray:
    """Six frontal leads (I, II, III, aVR, aVL, aVF) of a heart vector -> (6,)."""
    a = np.deg2rad(angle_deg)
    i, ii = amp * np.cos(a), amp * np.cos(a - np.pi / 3)
    return np.array([i, ii, ii - i, -(i + ii) / 2, i - ii / 2, ii - i / 2])


def _r_peaks(rng: np.random.Generator, rhythm: str, duration_s: float) -> np.ndarray:
    """R-peak times (s), from before 0 to past ``duration_s``; regular rhythms are stretched
    so the rate over the in-record peaks lies inside the rhythm's band."""
    lo, hi = RATE_BANDS[rhythm]
    target = rng.uniform(lo, hi)
    mean_rr = 60.0 / target
    n = int(duration_s / (0.45 * mean_rr)) + 4  # enough beats even if every RR were the shortest allowed
    if rhythm == "atrial fibrillation":
        cv = rng.uniform(0.15, 0.30)
        rr = np.clip(mean_rr * (1.0 + cv * rng.standard_normal(n)), max(0.33, 0.45 * mean_rr), 1.9 * mean_rr)
    else:  # sinus: respiratory sinus arrhythmia plus a little jitter
        phase, resp_hz = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.35)
        k = np.arange(n)
        rr = mean_rr * (1.0 + rng.uniform(0.005, 0.03) * np.sin(phase + 2 * np.pi * resp_hz * k * mean_rr)
                        + 0.005 * rng.standard_normal(n))
    start = -rng.uniform(0.0, 1.0) * rr[0]
    peaks = start + np.concatenate([[0.0], np.cumsum(rr)])
    if rhythm != "atrial fibrillation":
        # Keep the in-record rate inside the drawn band (it can drift out by < 4 % near the band's
        # edges): stretch the beat times about t=0. The bands are >= 5 bpm from the 60/100 cut-offs.
        for _ in range(3):
            rate = 60.0 / float(np.diff(_inner(peaks, duration_s)).mean())
            if lo <= rate <= hi:
                break
            peaks = peaks * (rate / float(np.clip(rate, lo, hi)))
    return peaks[peaks < duration_s + 2.0]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function without overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _inner(peaks: np.ndarray, duration_s: float) -> np.ndarray:
    """The R peaks counted in the truth: at least EDGE_S inside both ends of the record."""
    return peaks[(peaks >= EDGE_S) & (peaks <= duration_s - EDGE_S)]


def _waves(rng: np.random.Generator, n: int, fs: int, peaks: np.ndarray, rhythm: str,
           st_mm: float) -> np.ndarray:
    """Per-wave time courses (6, n): P, Q, R, S, T, ST-plateau, each summed over beats.

    Each beat is evaluated on a window of -0.35..+0.65 s round its R peak (every wave is
    below 1e-7 of its height outside it) and scatter-added into the record.
    """
    rr = np.diff(peaks, append=peaks[-1] + np.mean(np.diff(peaks)))  # RR after each beat
    beat_amp = 1.0 + 0.06 * rng.standard_normal(peaks.size)            # (K,) beat-to-beat change
    p_amp = 0.0 if rhythm == "atrial fibrillation" else 1.0
    pr = rng.uniform(0.14, 0.19)
    t_peak = (0.16 + 0.12 * np.sqrt(np.clip(rr, 0.3, 2.0)))[:, None]   # (K, 1) R -> T peak, s
    offs = np.arange(-int(0.35 * fs), int(0.65 * fs) + 1)              # (M,) samples round R
    idx = np.round(peaks * fs).astype(np.int64)[:, None] + offs[None, :]  # (K, M)
    dt = idx / fs - peaks[:, None]                                     # (K, M) s since the R peak
    def bump(centre, sigma):
        return np.exp(-0.5 * ((dt - centre) / sigma) ** 2)
    local = np.stack([
        p_amp * bump(-pr, 0.022),
        bump(-0.022, 0.007),
        beat_amp[:, None] * bump(0.0, 0.009),
        bump(0.026, 0.009),
        bump(t_peak, 0.045),
        # ST plateau: 1 from the J point (~45 ms) to the T peak, smooth edges; 0 when st_mm == 0.
        (st_mm * 0.1) * _sigmoid((dt - 0.045) / 0.006) * _sigmoid((t_peak - dt) / 0.03),
    ])                                                                 # (6, K, M)
    keep = (idx >= 0) & (idx < n)
    return np.stack([np.bincount(idx[keep], weights=w[keep], minlength=n) for w in local])


def _lead_gains(rng: np.random.Generator, n_leads: int, territory: str | None) -> np.ndarray:
    """Gain matrix (12, 6): lead x wave (P, Q, R, S, T, ST) in mV per unit wave."""
    axis = rng.uniform(20.0, 80.0)                     # QRS axis, degrees (normal)
    r_amp, s_amp = rng.uniform(1.0, 1.8), rng.uniform(0.15, 0.4)
    q_amp, p_amp, t_amp = rng.uniform(0.05, 0.15), rng.uniform(0.08, 0.2), rng.uniform(0.2, 0.4)
    g = np.zeros((12, 6))
    g[:6, 0] = _limb(p_amp, rng.uniform(40.0, 70.0))
    g[:6, 1] = _limb(-q_amp, axis)
    g[:6, 2] = _limb(r_amp, axis)
    g[:6, 3] = _limb(-s_amp, axis)
    g[:6, 4] = _limb(t_amp, axis + rng.uniform(-20.0, 20.0))
    scale = np.array([p_amp, -q_amp, r_amp * 0.8, -s_amp * 2.5, t_amp])
    g[6:, :5] = _PRECORDIAL * scale[None, :]
    if territory == "inferior":       # ST vector toward aVF: II, III, aVF up; aVL, aVR down
        g[:6, 5] = _limb(1.0, 90.0)
    elif territory == "anterior":     # V1-V4 up, V5 half, limb leads flat
        g[6:, 5] = [1.0, 1.0, 1.0, 1.0, 0.5, 0.0]
    if territory is not None:         # the most elevated lead gets exactly 1 (-> st_mm)
        g[:, 5] /= g[:, 5].max()
    return g[:n_leads]


def _noise(rng: np.random.Generator, t: np.ndarray, n_leads: int, fs: int) -> np.ndarray:
    """Baseline wander (0.05-0.35 Hz), mains hum (50/60 Hz) and white noise -> (leads, N) mV."""
    n = t.size
    out = rng.normal(0.0, rng.uniform(0.01, 0.04), size=(n_leads, n))
    for _ in range(2):
        f, ph = rng.uniform(0.05, 0.35), rng.uniform(0, 2 * np.pi, size=(n_leads, 1))
        out += rng.uniform(0.03, 0.2, size=(n_leads, 1)) * np.sin(2 * np.pi * f * t[None, :] + ph)
    mains = 50.0 if rng.random() < 0.5 else 60.0
    if mains < fs / 2:
        out += rng.uniform(0.0, 0.03) * np.sin(2 * np.pi * mains * t[None, :] + rng.uniform(0, 2 * np.pi))
    return out


def _fibrillation(rng: np.random.Generator, t: np.ndarray, n_leads: int) -> np.ndarray:
    """Atrial fibrillatory baseline: a few 4-9 Hz sines with drifting amplitude -> (leads, N) mV."""
    f = np.zeros_like(t)
    for _ in range(3):
        hz, ph = rng.uniform(4.0, 9.0), rng.uniform(0, 2 * np.pi)
        env = 1.0 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t + rng.uniform(0, 2 * np.pi))
        f += rng.uniform(0.015, 0.035) * env * np.sin(2 * np.pi * hz * t + ph)
    lead_gain = np.array([0.5, 1.0, 0.8, -0.7, 0.2, 0.9, 1.5, 1.2, 0.8, 0.6, 0.5, 0.4])[:n_leads]
    return lead_gain[:, None] * f[None, :]


def generate_ecg(rng: np.random.Generator, fs: int = 500, duration_s: float = 10.0,
                 n_leads: int = 12) -> tuple[np.ndarray, dict]:
    """Draw one synthetic ECG -> ``(signal (n_leads, round(fs*duration_s)) float32 mV, truth)``.

    Leads are the first ``n_leads`` of LEAD_NAMES (I, II, III, aVR, aVL, aVF, V1-V6).
    truth = {"modality": "ecg", "fs", "duration_s", "lead_names", "rhythm" (one of RHYTHMS),
    "heart_rate_bpm" (60 / mean RR, 0.1 bpm), "rr_intervals_s" (between the R peaks at least
    EDGE_S inside the record, ms precision), "r_peak_times_s", "st_elevation_mm" (peak elevation in
    the most elevated lead; 0.0 unless rhythm == "st elevation"), "st_territory" (None,
    "inferior" or "anterior"), "p_waves" (bool)}. Pure function of ``rng``.
    """
    if not 1 <= int(n_leads) <= 12:
        raise ValueError(f"n_leads: expected 1..12, got {n_leads!r}")
    if fs < 100 or duration_s < 3.0:
        raise ValueError(f"fs >= 100 and duration_s >= 3 expected, got fs={fs!r}, duration_s={duration_s!r}")
    rhythm = RHYTHMS[int(rng.integers(len(RHYTHMS)))]
    st_mm = float(np.round(rng.uniform(1.5, 3.5), 1)) if rhythm == "st elevation" else 0.0
    territory = (("inferior", "anterior")[int(rng.integers(2))]) if st_mm else None
    t = np.arange(int(round(fs * duration_s))) / fs                    # (N,) s
    peaks = _r_peaks(rng, rhythm, duration_s)
    waves = _waves(rng, t.size, fs, peaks, rhythm, st_mm)                       # (6, N)
    gains = _lead_gains(rng, n_leads, territory)                       # (L, 6)
    # Per-case amplitude scales P-QRS-T only, so the ST plateau stays exactly st_mm.
    sig = rng.uniform(0.6, 1.4) * (gains[:, :5] @ waves[:5]) + gains[:, 5:] @ waves[5:]  # (L, N)
    if rhythm == "atrial fibrillation":
        sig += _fibrillation(rng, t, n_leads)
    sig += _noise(rng, t, n_leads, fs)
    inner = _inner(peaks, duration_s)
    rr = np.diff(inner)
    truth = {
        "modality": "ecg",
        "fs": int(fs),
        "duration_s": float(duration_s),
        "lead_names": list(LEAD_NAMES[:n_leads]),
        "rhythm": rhythm,
        "heart_rate_bpm": round(60.0 / float(rr.mean()), 1),
        "rr_intervals_s": [round(float(x), 3) for x in rr],
        "r_peak_times_s": [round(float(x), 3) for x in inner],
        "st_elevation_mm": st_mm,
        "st_territory": territory,
        "p_waves": rhythm != "atrial fibrillation",
    }
    return sig.astype(np.float32), truth


def wfdb_bytes(record_name: str, signal: np.ndarray, fs: int, lead_names: list[str],
               comments: list[str] | None = None) -> tuple[bytes, bytes]:
    """``(header, data)`` bytes of a single-segment WFDB record, format 16, 1000 units per mV.

    The header is the one ``wfdb.wrsamp`` writes for the same digital signal (gain
    ``1000.0(0)/mV``, 16-bit ADC, zero 0, initial value, checksum = sum of samples mod 2**16);
    the data is little-endian int16, samples interleaved. Written by hand because
    ``wfdb.wrsamp`` spends ~0.1 s per record; tests check the bytes against it.
    """
    sig = np.asarray(signal, dtype=np.float64)
    if sig.ndim != 2 or sig.shape[0] != len(lead_names):
        raise ValueError(f"signal: expected (leads={len(lead_names)}, samples), got shape {sig.shape}")
    if any(not name or any(c.isspace() for c in name) for name in lead_names) or " " in record_name:
        raise ValueError(f"lead and record names must be non-empty without spaces, got {record_name!r}, {lead_names!r}")
    digital = np.clip(np.round(sig * 1000.0), -32767, 32767).astype(np.int64)  # (leads, samples); -32768 = NaN
    n, length = digital.shape
    lines = [f"{record_name} {n} {int(fs)} {length}"]
    for k, name in enumerate(lead_names):
        checksum = int(digital[k].sum()) % 65536
        lines.append(f"{record_name}.dat 16 1000.0(0)/mV 16 0 {int(digital[k, 0])} {checksum} 0 {name}")
    lines += [f"# {c}" for c in comments or []]
    header = ("\n".join(lines) + "\n").encode("ascii")
    data = digital.T.astype("<i2").tobytes()                                    # (samples, leads) interleaved
    return header, data


def write_wfdb(dir: str | os.PathLike, record_name: str, signal: np.ndarray, fs: int,
               lead_names: list[str], comments: list[str] | None = None) -> list[Path]:
    """Write ``signal`` (leads, samples) mV as WFDB format 16 (1 uV per unit) -> [.dat, .hea] paths.

    Byte-identical for identical inputs (no date/time). Each file is written atomically
    (temporary sibling + ``os.replace``), the ``.dat`` before the ``.hea``, so a reader that
    finds the header finds the data. Values are clipped to +-32.767 mV.
    """
    header, data = wfdb_bytes(record_name, signal, fs, lead_names, comments)
    out_dir = Path(dir)
    targets = [out_dir / f"{record_name}.dat", out_dir / f"{record_name}.hea"]
    for target, payload in zip(targets, (data, header)):
        _atomic_write(target, payload)
    return targets


def _atomic_write(path: Path, payload: bytes) -> None:
    """Temporary sibling + ``os.replace`` (no fsync: a crash leaves the old file or the new one)."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
