#!/usr/bin/env bash
# The head_dim 64 flash kernels with CTAs of 8 warps (the default) next to 4 warps
# (SFT_FLASH_FORWARD_WARPS, SFT_FLASH_BACKWARD_WARPS): the GPU attention tests under the 4-warp
# kernels, `sft bench-attention --dq both` for each combination, and the 1.3B step for each
# backward. Run on the box from the repo root, after `scripts/gpu_check.sh build` here:
#   .gpu/gpu_flash_variants.sh        (results under $OUT, else .gpu/variants/)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
out="${OUT:-$PWD/variants}"
mkdir -p "$out"
libs=""
for dir in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))'); do
    for lib in "$dir"/nvidia/*/lib; do [[ -d "$lib" ]] && libs="$libs:$lib"; done
done
export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "=== attention tests, 4-warp kernels"
SFT_FLASH_FORWARD_WARPS=4 SFT_FLASH_BACKWARD_WARPS=4 timeout -k 5 60 ./gpu_attention --ignored --test-threads=1 \
    >"$out/tests_w4.log" 2>&1
echo "rc=$?"
grep -E "FAILED|panicked|test result" "$out/tests_w4.log" | head
for fw in 8 4; do
    for bw in 8 4; do
        echo "=== bench-attention forward ${fw} warps, backward ${bw} warps"
        SFT_FLASH_FORWARD_WARPS=$fw SFT_FLASH_BACKWARD_WARPS=$bw timeout -k 5 40 \
            ./sft bench-attention --seq-lens 1024,2048,4096 --dq both 2>&1 | tee "$out/attention_f${fw}_b${bw}.log" | grep -v "^cuda"
    done
done
for bw in 8 4; do
    echo "=== 1.3B step, backward ${bw} warps"
    SFT_FLASH_BACKWARD_WARPS=$bw timeout -k 5 60 ./sft bench --config simplellama-1.3b --tokens-per-step 65536 \
        --seq-len 2048 --micro-batch 8 --steps 3 --warmup 2 --device cuda --dropout 0 2>&1 | tee "$out/bench_b${bw}.log" |
        grep -E "time per step|tokens/s|MFU|memory"
done
