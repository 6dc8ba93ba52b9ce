"""DICOM -> model-ready tensor throughput: medmllm vs MONAI, on the same files, in one run.

medmllm:  read_dicom (modality LUT, HU)  -> window (lung preset) -> resize 224x224 -> torch [1,224,224]
MONAI:    LoadImage(PydicomReader) -> EnsureChannelFirst -> ScaleIntensityRange(same window) -> Resize 224x224

Both produce float32 [1, 224, 224] tensors in [0, 1]. Rounds alternate between the two
pipelines; the median round time is reported. Results -> bench/results/dicom_throughput.json.

    python bench/dicom_throughput.py [--rounds 7] [--out bench/results/dicom_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

FILES = ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
         "JPEG2000.dcm", "693_J2KI.dcm", "rtdose_1frame.dcm", "MR_small_bigendian.dcm"]
SIZE = (224, 224)
CENTER, WIDTH = -600.0, 1500.0  # lung window


def medmllm_pipeline():
    from medmllm.data.preprocess import resize, window
    from medmllm.data.readers.dicom import read_dicom

    def run(path: str) -> torch.Tensor:
        hu, _ = read_dicom(path)                      # (H, W) float32
        x = resize(window(hu, CENTER, WIDTH), SIZE)   # (224, 224) float32 in [0, 1]
        return torch.from_numpy(np.ascontiguousarray(x))[None]  # [1, 224, 224]

    return run


def monai_pipeline():
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize, ScaleIntensityRange

    lo, hi = CENTER - WIDTH / 2, CENTER + WIDTH / 2
    t = Compose([LoadImage(reader="PydicomReader", image_only=True), EnsureChannelFirst(),
                 ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True), Resize(SIZE)])
    return lambda path: t(path)


def time_round(fn, files) -> float:
    t0 = time.perf_counter()
    for f in files:
        out = fn(f)
        assert out.shape == (1, *SIZE)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=5, help="passes over the file list per round")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dicom_throughput.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from pydicom.data import get_testdata_file

    files = [get_testdata_file(n) for n in FILES] * args.repeat
    ours, theirs = medmllm_pipeline(), monai_pipeline()
    for f in files[: len(FILES)]:  # warm-up (imports, codec plugins)
        ours(f), theirs(f)
    t_ours, t_theirs = [], []
    for _ in range(args.rounds):
        t_ours.append(time_round(ours, files))
        t_theirs.append(time_round(theirs, files))
    med_ours, med_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    result = {
        "benchmark": "dicom_to_tensor",
        "files": FILES, "images_per_round": len(files), "rounds": args.rounds, "output_shape": [1, *SIZE],
        "medmllm_images_per_s": len(files) / med_ours,
        "monai_images_per_s": len(files) / med_theirs,
        "ratio_medmllm_over_monai": med_theirs / med_ours,
        "round_times_s": {"medmllm": t_ours, "monai": t_theirs},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1,
                    "cpu": platform.processor() or platform.machine()},
    }
    from medmllm.io import write_json

    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("round_times_s", "files")}, indent=2))


if __name__ == "__main__":
    main()
