#!/usr/bin/env bash
# The flash backward's three dQ accumulations on a GPU: the GPU attention tests (which pick
# their modes themselves), the training tests with the default (ordered) and with
# SFT_FLASH_DQ=pipelined, `sft bench-attention --dq all`,
# and the 1.3B step under each mode. Run on the box from the repo root, after
# `scripts/gpu_check.sh build` here:   .gpu/gpu_dq_modes.sh   (results under $OUT, else .gpu/dq/)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
out="${OUT:-$PWD/dq}"
mkdir -p "$out"
libs=""
for dir in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))'); do
    for lib in "$dir"/nvidia/*/lib; do [[ -d "$lib" ]] && libs="$libs:$lib"; done
done
export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for run in "gpu_attention ordered" "gpu_train ordered" "gpu_train pipelined"; do
    read -r t mode <<<"$run"
    echo "=== $t, SFT_FLASH_DQ=$mode"
    SFT_FLASH_DQ=$mode timeout -k 5 60 "./$t" --ignored --test-threads=1 >"$out/${t}_$mode.log" 2>&1
    echo "rc=$?"
    grep -E "FAILED|panicked|test result" "$out/${t}_$mode.log" | head
done
echo "=== bench-attention --dq all"
timeout -k 5 60 ./sft bench-attention --seq-lens 1024,2048,4096 --dq all 2>&1 | tee "$out/attention.log"
for mode in ordered pipelined atomic; do
    echo "=== 1.3B step, SFT_FLASH_DQ=$mode"
    SFT_FLASH_DQ=$mode timeout -k 5 120 ./sft bench --config simplellama-1.3b --tokens-per-step 65536 \
        --seq-len 2048 --micro-batch 8 --steps 3 --warmup 2 --device cuda --dropout 0 2>&1 |
        tee "$out/bench_$mode.log" | grep -E "time per step|tokens/s|MFU|memory"
done
