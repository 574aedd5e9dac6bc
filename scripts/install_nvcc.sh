#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc + its headers) from PyPI wheels into
# .cuda/ (git-ignored), so that build.rs can compile kernels/*.cu to PTX on machines
# without a CUDA toolkit. All five wheels must stay on 13.0: PTX from a newer nvcc does
# not load under a CUDA 13.0 driver.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${SFT_CUDA_DIR:-$root/.cuda}"
nvcc="$dest/nvidia/cu13/bin/nvcc"
if [ -x "$nvcc" ]; then
  echo "nvcc already installed: $nvcc"
  exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest" \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
"$nvcc" --version | tail -n 2
echo "nvcc installed: $nvcc"
