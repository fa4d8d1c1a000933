#!/usr/bin/env bash
# The GPU machine's image, emulated here before a GPU is lent (issue 18): a Python 3.12
# virtual environment holding only what that image holds of what the check imports (torch
# 2.11 and its CUDA 13 build from PyPI, which runs on a CPU; accelerate 1.15; ...), none of
# what it lacks (webdataset, deepspeed, ray, transformers: those come from .whl/, as on the
# GPU machine), then the smoke check in it. It downloads gigabytes once: not run in CI.
#
#   bash tests/gpu/emulate.sh [OUT_DIR]     (OUT_DIR default: ./gpu_check_emulated)
#
# EMULATE_VENV (default .emulate/, git-ignored) keeps the environment between runs;
# PYTHON312 names the interpreter (default: python3.12, else pyenv's).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${EMULATE_VENV:-$repo/.emulate}"
py="${PYTHON312:-$(command -v python3.12 || ls /root/.pyenv/versions/3.12*/bin/python3.12 | tail -1)}"
# The image's versions where KINDS.md names them; the rest as pip resolves them today.
image=(torch==2.11.0 torchvision==0.26.0 accelerate==1.15.0 safetensors==0.8.0 huggingface_hub==1.33.0
       numpy timm pyarrow scipy pandas pillow pyyaml tqdm tensorboard matplotlib scikit-image scikit-learn
       pytest psutil msgpack ninja py-cpuinfo packaging einops nvidia-ml-py tokenizers regex)
if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "${image[@]}"
fi
for lacking in webdataset deepspeed ray transformers; do  # the image lacks them: so must we
    if "$venv/bin/python" -c "import $lacking" 2>/dev/null; then
        echo "error: $venv holds $lacking, which the GPU machine's image lacks" >&2; exit 1
    fi
done
[ -d "$repo/.whl" ] || bash "$repo/tests/gpu/wheels.sh"
PYTHON="$venv/bin/python" exec bash "$repo/tests/gpu/check.sh" "${1:-$repo/gpu_check_emulated}" --smoke
