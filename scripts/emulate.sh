#!/usr/bin/env bash
# Every kernel of kernels/*.cu on the CPU, no GPU needed (CI runs this):
# - kernels/flash_attention.cu through tests/flash_emu (scripts/flash_emulate.sh: tensor-core
#   instructions, cp.async, ldmatrix bank conflicts) against a float64 reference;
# - every other kernel file through emu/ (the sft-emu crate: the real .cu files compiled as
#   C++, a thread per CUDA thread, instrumented shared-memory accesses) against its CPU twin in
#   sft::backend::cpu, with the launch shapes of src/backend/cuda.
# Prints one line per kernel entry of the PTX (cases, largest error, shared-memory races, bank
# conflicts); an entry without a case, an error over its tolerance or a race fails the run.
# Needs g++ (C++20), the CUDA headers and nvcc (scripts/install_nvcc.sh).
#
#   scripts/emulate.sh                 # everything (about a minute and a half on 2 cores)
#   EMU_KERNELS_DIR=/tmp/k scripts/emulate.sh   # emulate a modified copy of kernels/ instead
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
report="${TMPDIR:-/tmp}/flash_emu_report.$$"
trap 'rm -f "$report"' EXIT
if [ -n "${EMU_KERNELS_DIR:-}" ]; then
    # The flash program includes flash_attention.cu from kernels/: point it at the copy.
    FLASH_KERNELS_DIR="$EMU_KERNELS_DIR" bash scripts/flash_emulate.sh --report "$report"
else
    bash scripts/flash_emulate.sh --report "$report"
fi
# The entry list comes from the PTX that the sft build embeds: built without nvcc, the run
# fails and says so (CI builds with REQUIRE_NVCC=1 first, so this reuses that build).
cargo run --release -q -p sft-emu -- --flash-report "$report"
