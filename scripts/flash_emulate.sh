#!/usr/bin/env bash
# Runs the real kernels/flash_attention.cu on the CPU: tests/flash_emu/flash_emu.h emulates the
# CUDA built-ins it uses (one std::thread per CUDA thread; __syncthreads, warp shuffles,
# ldmatrix, mma.m16n8k16 and cp.async per the PTX ISA), and tests/flash_emu/main.cpp compares
# out, lse, dq, dk, dv with a float64 reference on packed, grouped-KV cases for hd 64 and 128.
# It runs each backward twice, the second time with 3 blocks at once (its dQ semaphores then
# really wait), and fails unless both give the same bits and leave every semaphore at zero.
# Then the opt-in atomic dQ path (flash_backward_atomic_HD + flash_dq_convert), twice (1, then
# 3 blocks at once): dq within tolerance, dk/dv the ordered path's bits, the accumulator zero.
# It fails on a shared-memory race (cp.async, plain stores and ldmatrix without a barrier
# between them; flash_emu.h) and prints the ldmatrix bank conflicts. No GPU needed; needs g++
# (C++20) and the CUDA headers (cuda_bf16.h) of .cuda/ or $CUDA_HOME. CI runs every case.
#
#   scripts/flash_emulate.sh          # every case (a few minutes on 2 busy cores)
#   scripts/flash_emulate.sh quick    # the first case only
#   scripts/flash_emulate.sh 3        # case 3 only (the list is in tests/flash_emu/main.cpp)
#   scripts/flash_emulate.sh --report FILE   # also write per-kernel lines (scripts/emulate.sh)
# FLASH_KERNELS_DIR: a copy of kernels/ to compile instead.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
inc="${CUDA_HOME:-$root/.cuda/nvidia/cu13}/include"
out="${TMPDIR:-/tmp}/flash_emu.$$"
g++ -std=c++20 -O2 -pthread -DFLASH_EMULATE -x c++ -I "$root/tests/flash_emu" -I "${FLASH_KERNELS_DIR:-$root/kernels}" -I "$inc" \
    "$root/tests/flash_emu/main.cpp" -o "$out"
trap 'rm -f "$out"' EXIT
"$out" "$@"
