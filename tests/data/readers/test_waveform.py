"""WFDB and signal-CSV readers.

The wfdb package ships no sample records (checked: its installed package folder holds
only Python modules), so records are written here with ``wfdb.wrsamp`` and the reader is
compared with ``wfdb.rdrecord``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from medmllm.data.readers import detect, read
from medmllm.data.readers.waveform import read_signal_csv, read_wfdb
from medmllm.errors import InputError

wfdb = pytest.importorskip("wfdb")

FS = 360
N = 1001  # odd, so format 212's last byte triple is half used
BYTES_PER_SAMPLE = {"16": 2, "212": 1.5, "80": 1, "24": 3, "32": 4}  # WFDB format spec


def _signal() -> np.ndarray:
    t = np.arange(N) / FS
    return np.stack([np.sin(2 * np.pi * 1.2 * t), 0.5 * np.cos(2 * np.pi * 3 * t), 0.1 * t], 1)  # (N, 3) mV


def _write(tmp_path: Path, fmt: str, name: str = "rec") -> Path:
    wfdb.wrsamp(name, fs=FS, units=["mV", "mV", "mV"], sig_name=["I", "II", "V1"], p_signal=_signal(),
                fmt=[fmt] * 3, write_dir=str(tmp_path), comments=["Rhythm: atrial fibrillation", "age: 71"])
    return tmp_path / name


@pytest.mark.parametrize("fmt", sorted(BYTES_PER_SAMPLE))
def test_wfdb_matches_rdrecord(tmp_path, fmt):
    rec = _write(tmp_path, fmt)
    sig, meta = read_wfdb(rec.with_suffix(".hea"))
    ref = wfdb.rdrecord(str(rec))
    assert sig.dtype == np.float32 and sig.shape == (3, N)
    np.testing.assert_allclose(sig, ref.p_signal.T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sig, _signal().T, atol=0.02)  # physical units, close to what was written
    assert meta["fs"] == FS and meta["lead_names"] == ["I", "II", "V1"] and meta["units"] == ["mV"] * 3
    assert meta["n_samples"] == N and meta["duration_s"] == pytest.approx(N / FS)
    assert meta["comments"] == ["Rhythm: atrial fibrillation", "age: 71"]
    assert meta["kind"] == "signal" and meta["format"] == "wfdb"


def test_wfdb_path_forms_agree(tmp_path):
    rec = _write(tmp_path, "16")
    ref, _ = read_wfdb(rec.with_suffix(".hea"))
    for form in (rec.with_suffix(".dat"), rec, str(rec)):
        np.testing.assert_array_equal(read_wfdb(form)[0], ref)
    assert detect(rec.with_suffix(".hea")) == "wfdb" and detect(rec.with_suffix(".dat")) == "wfdb"
    np.testing.assert_array_equal(read(rec.with_suffix(".dat"))[0], ref)
    np.testing.assert_array_equal(read(rec, reader="wfdb")[0], ref)


@pytest.mark.parametrize("fmt", ["16", "212"])
def test_truncated_dat_is_refused_with_sizes(tmp_path, fmt):
    rec = _write(tmp_path, fmt)
    dat = rec.with_suffix(".dat")
    expected = int(np.ceil(3 * N * BYTES_PER_SAMPLE[fmt]))
    assert dat.stat().st_size == expected
    dat.write_bytes(dat.read_bytes()[:-7])
    with pytest.raises(InputError, match=f"expected {expected} bytes.*found {expected - 7}"):
        read_wfdb(rec.with_suffix(".hea"))


def test_missing_dat_and_header(tmp_path):
    rec = _write(tmp_path, "16")
    rec.with_suffix(".dat").unlink()
    with pytest.raises(InputError, match=r"rec\.dat is missing"):
        read_wfdb(rec.with_suffix(".hea"))
    with pytest.raises(InputError, match="header"):
        read_wfdb(tmp_path / "nothing.hea")


def test_absurd_signal_length_fails_fast(tmp_path):
    rec = _write(tmp_path, "16")
    hea = rec.with_suffix(".hea")
    lines = hea.read_text().splitlines()
    first = lines[0].split()
    first[3] = str(10**12)  # record line: name n_sig fs sig_len
    hea.write_text("\n".join([" ".join(first)] + lines[1:]) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="above the limit"):
        read_wfdb(hea)
    assert time.perf_counter() - t0 < 2.0


def test_header_naming_a_file_elsewhere_is_refused(tmp_path):
    rec = _write(tmp_path, "16")
    hea = rec.with_suffix(".hea")
    hea.write_text(hea.read_text().replace("rec.dat", "../rec.dat"))
    with pytest.raises(InputError, match=r"rec\.hea"):  # never reads ../rec.dat
        read_wfdb(hea)


def test_two_data_files_and_header_without_length(tmp_path):
    sig = _signal()[:, :2]
    wfdb.wrsamp("a", fs=FS, units=["mV"], sig_name=["I"], p_signal=sig[:, :1], fmt=["16"], write_dir=str(tmp_path))
    wfdb.wrsamp("b", fs=FS, units=["mV"], sig_name=["II"], p_signal=sig[:, 1:], fmt=["212"], write_dir=str(tmp_path))
    line_a = (tmp_path / "a.hea").read_text().splitlines()[1]
    line_b = (tmp_path / "b.hea").read_text().splitlines()[1]
    (tmp_path / "two.hea").write_text(f"two 2 {FS} {N}\n{line_a}\n{line_b}\n")
    (tmp_path / "nolen.hea").write_text(f"nolen 2 {FS}\n{line_a}\n{line_b}\n")  # length from the .dat size
    ref = wfdb.rdrecord(str(tmp_path / "two")).p_signal.T
    for name in ("two", "nolen"):
        out, meta = read_wfdb(tmp_path / f"{name}.hea")
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
        assert meta["n_samples"] == N and meta["lead_names"] == ["I", "II"]
    b = tmp_path / "b.dat"
    b.write_bytes(b.read_bytes()[:-3])
    expected = int(np.ceil(N * 1.5))
    with pytest.raises(InputError, match=f"b.dat: truncated data: expected {expected} bytes"):
        read_wfdb(tmp_path / "two.hea")


# ----------------------------------------------------------------------------- CSV


def _csv(tmp_path: Path, text: str, name: str = "sig.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_with_time_column(tmp_path):
    fs = 500
    t = np.arange(50) / fs
    lead_i, lead_ii = np.sin(t * 40), np.cos(t * 40)
    rows = "\n".join(f"{a:.6f},{b:.6f},{c:.6f}" for a, b, c in zip(t, lead_i, lead_ii))
    path = _csv(tmp_path, "time,I [mV],II (mV)\n" + rows + "\n")
    assert detect(path) == "signal_csv"
    sig, meta = read(path)
    assert sig.shape == (2, 50) and sig.dtype == np.float32
    np.testing.assert_allclose(sig, np.round(np.stack([lead_i, lead_ii]), 6), atol=1e-6)
    assert meta["fs"] == pytest.approx(fs) and meta["lead_names"] == ["I", "II"] and meta["units"] == ["mV", "mV"]
    assert meta["n_samples"] == 50 and meta["duration_s"] == pytest.approx(0.1) and meta["format"] == "signal_csv"


def test_csv_sample_column_with_fs_comment(tmp_path):
    path = _csv(tmp_path, "# fs=250\n# device: test\nsample,V1\n0,1.5\n1,\n2,-0.25\n")
    sig, meta = read_signal_csv(path)
    np.testing.assert_array_equal(sig, np.array([[1.5, np.nan, -0.25]], np.float32))  # empty cell -> NaN
    assert meta["fs"] == 250 and meta["comments"] == ["fs=250", "device: test"]
    assert read_signal_csv(path, fs=250)[1]["fs"] == 250
    with pytest.raises(InputError, match="disagrees"):
        read_signal_csv(path, fs=100)


def test_csv_sample_column_needs_fs(tmp_path):
    path = _csv(tmp_path, "sample,V1\n0,1\n1,2\n")
    with pytest.raises(InputError, match="fs"):
        read_signal_csv(path)
    assert read_signal_csv(path, fs=100)[1]["duration_s"] == pytest.approx(0.02)


def test_csv_non_uniform_time_is_refused(tmp_path):
    path = _csv(tmp_path, "time,I\n0.000,1\n0.002,2\n0.004,3\n0.0065,4\n0.0085,5\n")
    with pytest.raises(InputError, match="not uniform.*line 5"):
        read_signal_csv(path)


def test_csv_small_jitter_is_accepted(tmp_path):
    times = [0.0, 0.002, 0.004001, 0.006, 0.008]  # 0.05% jitter, rounding in an export
    path = _csv(tmp_path, "time,I\n" + "".join(f"{t},{i}\n" for i, t in enumerate(times)))
    assert read_signal_csv(path)[1]["fs"] == pytest.approx(500)


def test_csv_non_numeric_cell_names_line_and_column(tmp_path):
    path = _csv(tmp_path, "time,I,II\n0,1,2\n0.01,3,x7\n")
    with pytest.raises(InputError, match=r"line 3, column 'II'.*'x7'"):
        read_signal_csv(path)


def test_csv_ragged_row_and_bad_first_column(tmp_path):
    with pytest.raises(InputError, match="line 3"):
        read_signal_csv(_csv(tmp_path, "time,I,II\n0,1,2\n0.01,3\n", "ragged.csv"))
    with pytest.raises(InputError, match="first column"):
        read_signal_csv(_csv(tmp_path, "lead,I\n0,1\n", "bad.csv"))
