#!/usr/bin/env bash
# A second, short GPU call after `gpu_check.sh all`: the GPU tests and the demo part again, the
# 1.3B step with per-kernel CUDA-event times (for `sft plan --calibrate-from`), the attention
# backward with every dQ accumulation (`sft bench-attention --dq all`), Nsight Compute on
# the flash kernels, and compute-sanitizer on the flash tests. Run on the box from the repo root:
#   .gpu/gpu_probe.sh        (results under $OUT, else .gpu/probe/)
#   .gpu/gpu_probe.sh dq     the flash kernel variants only (about 8 minutes; at most 10; give
#                            the call 590 s: what ran by then comes back), most telling first:
#                            the GPU attention tests (both deferred kernels against the ordered
#                            bits, the wgmma kernels against the CPU), `bench-attention --dq all
#                            --mma both`, the 1.3B step under ordered dQ on mma.sync and on
#                            wgmma, deferred-q64 on wgmma and on mma.sync, atomic on mma.sync and
#                            on wgmma, deferred, then the default step's kernel times
#                            (kernel_times_gemm8.csv; the GEMMs by shape on the terminal); a
#                            markdown table of the steps (steps.md) after each step
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
out="${OUT:-$PWD/probe}"
mkdir -p "$out"
source ./gpu_env.sh
python_libs
work="$PWD/work"
rm -rf "$work"
mkdir -p "$work"
step() { echo; echo "=== $1 (${2}s)"; shift 2; }
# SM clock, power and temperature sampled every 250 ms into $out/clocks_<name>.csv while a
# command runs, then their range: is the GPU slower in the training step (power-limited) than
# in a kernel benchmark alone? (The flash kernels took 20% longer per call inside the step.)
with_clocks() {
    local name="$1"
    shift
    local smi=""
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader,nounits -lms 250 \
            >"$out/clocks_$name.csv" 2>/dev/null &
        smi=$!
    fi
    "$@"
    local rc=$?
    if [[ -n "$smi" ]]; then
        kill "$smi" 2>/dev/null
        wait "$smi" 2>/dev/null
        # Busy samples only (over 200 W: the model's random init runs on the CPU first).
        awk -F', *' -v name="$name" '$2 + 0 > 200 { n++; c += $1; p += $2; if (!lo || $1 < lo) lo = $1; if ($1 > hi) hi = $1;
            if ($2 > pmax) pmax = $2; if ($3 > tmax) tmax = $3 }
            END { printf "clocks during %s: ", name; if (!n) { print "no busy samples"; exit }
                  printf "SM %d-%d MHz (mean %.0f), power mean %.0f W (max %.0f), up to %d C, %d busy samples\n",
                  lo, hi, c / n, p / n, pmax, tmax, n }' "$out/clocks_$name.csv"
    fi
    return $rc
}
if [[ "${1:-}" == dq ]]; then
    step "gpu_attention" 75
    timeout -k 5 75 ./gpu_attention --ignored --test-threads=1 >"$out/gpu_attention.log" 2>&1
    echo "rc=$?"
    grep -E "FAILED|panicked|test result|skipped" "$out/gpu_attention.log" | head
    step "bench-attention --dq all --mma both" 80
    with_clocks bench-attention timeout -k 5 80 ./sft bench-attention --seq-lens 1024,2048,4096 --dq all \
        --mma both 2>&1 | tee "$out/attention_dq.log"
    # One markdown table of the step runs so far, for BENCHMARKS.md.
    steps_table() {
        {
            echo "| SFT_FLASH_DQ / SFT_FLASH_MMA | s/step | tokens/s | MFU |"
            echo "|---|---:|---:|---:|"
            for log in "$out"/bench_*.log; do
                name="${log##*/bench_}"
                name="${name%.log}"
                awk -v mode="$name" '
                    /^time per step/ { s = $4 } /^tokens\/s/ { t = $2 } /^MFU/ { m = $2 }
                    END { printf "| %s | %s | %s | %s |\n", mode, s ? s : "failed", t ? t : "-", m ? m : "-" }' "$log"
            done
        } >"$out/steps.md"
    }
    # dQ sum / instructions, most telling first.
    for run in ordered/mma ordered/wgmma deferred-q64/wgmma deferred-q64/mma atomic/mma atomic/wgmma deferred/mma; do
        dq="${run%/*}" mma="${run#*/}" name="${run/\//_}"
        step "1.3B step, SFT_FLASH_DQ=$dq SFT_FLASH_MMA=$mma" 60
        SFT_FLASH_DQ=$dq SFT_FLASH_MMA=$mma with_clocks "step_$name" timeout -k 5 60 ./sft bench \
            --config simplellama-1.3b --tokens-per-step 65536 --seq-len 2048 --micro-batch 8 --steps 5 --warmup 2 \
            --device cuda --dropout 0 2>&1 |
            tee "$out/bench_$name.log" | grep -E "time per step|tokens/s|MFU|memory|clocks during"
        steps_table
    done
    # The default step's kernels, the GEMMs by shape with their TFLOP/s (stderr), for the
    # calibration of `sft plan` and to see which GEMM shape is slow.
    step "1.3B step, kernel times" 60
    timeout -k 5 60 ./sft bench --config simplellama-1.3b --tokens-per-step 65536 --seq-len 2048 --micro-batch 8 \
        --steps 3 --warmup 2 --device cuda --dropout 0 --kernel-times "$out/kernel_times_gemm8.csv" 2>&1 |
        tee "$out/bench_kernel_times_gemm8.txt" | grep -vE "^(device|model|recompute|step|loss) "
    cat "$out/steps.md"
    exit 0
fi
step tests 90
timeout -k 5 90 ./gpu_check.sh _part tests "$work" 0 >"$out/tests.log" 2>&1
echo "tests rc=$?"
grep -E "FAILED|panicked|test result" "$out/tests.log" | head -20
step demo 60
timeout -k 5 60 ./gpu_check.sh _part demo "$work" 0 >"$out/demo.log" 2>&1
echo "demo rc=$?"
tail -n 25 "$out/demo.log"
step kernel-times 90
timeout -k 5 90 ./sft bench --config simplellama-1.3b --tokens-per-step 65536 --seq-len 2048 --micro-batch 8 \
    --steps 3 --warmup 2 --device cuda --dropout 0 --kernel-times "$out/kernel_times.csv" 2>&1 | tee "$out/bench.log"
head -n 40 "$out/kernel_times.csv"
step attention-dq 60
# The flash backward's dQ: ordered (the default), the two deferred kernels (the same bits) and
# atomic (SFT_FLASH_DQ).
timeout -k 5 60 ./sft bench-attention --seq-lens 2048,4096 --dq all --mma both 2>&1 | tee "$out/attention_dq.log"
echo "attention-dq rc=${PIPESTATUS[0]}"
NCU="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)"
step ncu 100
if [[ -n "$NCU" ]]; then
    for k in backward_64 forward_64 backward_64_sm90 forward_64_sm90; do
        mma=mma
        if [[ "$k" == *sm90 ]]; then mma=wgmma; fi
        timeout -k 5 50 "$NCU" --clock-control none --kernel-name "flash_$k" --launch-skip 3 --launch-count 1 \
            --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
            --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
            ./sft bench-attention --seq-lens 2048 --iters 2 --mma $mma >"$out/ncu_flash_$k.txt" 2>&1
    done
    echo "ncu rc=$?"
    grep -E "flash_|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Theoretical Occ|Block Limit|Warp Cycles Per Issued|Executed Ipc A|Dynamic Shared" "$out"/ncu_flash_*.txt | head -80
else
    echo "no ncu"
fi
step sanitizer 60
timeout -k 5 60 compute-sanitizer --tool memcheck ./gpu_attention --ignored --test-threads=1 flash_hd64_packed_grouped_kv \
    >"$out/memcheck.log" 2>&1
echo "memcheck rc=$?"
tail -n 8 "$out/memcheck.log"
