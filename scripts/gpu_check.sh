#!/usr/bin/env bash
# Builds the CUDA binaries on a development machine (no GPU needed) and runs them on a GPU box
# (which may have no Rust toolchain and no network).
#
#   scripts/gpu_check.sh build       # here: REQUIRE_NVCC=1 release build + test binaries -> .gpu/
#   scripts/gpu_check.sh resources   # here: registers / spills / shared memory per kernel (sm_90 cubin)
#   .gpu/gpu_check.sh run            # on the GPU box, from the folder holding the copied .gpu/
#   .gpu/gpu_check.sh bench          # on the GPU box: the 1.3B training step, sft vs PyTorch +
#                                    # transformers (one table), then the demo on the GPU
#   .gpu/gpu_check.sh attention      # on the GPU box: PyTorch flash SDPA vs sft bench-attention (one table)
#
# `run` puts the Python environment's nvidia/*/lib folders (cuBLASLt, ...) on LD_LIBRARY_PATH,
# runs every ignored GPU test against the CPU reference, and prints a short table.
set -euo pipefail

mode="${1:-build}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

case "$mode" in
build)
    root="$(cd "$here/.." && pwd)"
    cd "$root"
    REQUIRE_NVCC=1 cargo build --release
    # The paths of the test executables come from cargo's JSON messages.
    mkdir -p .gpu
    for test in gpu_ops gpu_attention gpu_train; do
        test_bin="$(REQUIRE_NVCC=1 cargo test --release --test "$test" --no-run --message-format=json 2>/dev/null |
            python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$test" | tail -n 1)"
        if [[ -z "$test_bin" ]]; then
            echo "could not find the $test test binary" >&2
            exit 1
        fi
        cp "$test_bin" ".gpu/$test"
    done
    cp target/release/sft .gpu/sft
    cp scripts/gpu_check.sh .gpu/gpu_check.sh
    cp scripts/bench_attention_torch.py scripts/bench_torch_train.py .gpu/
    echo "copied to $root/.gpu: sft, gpu_ops, gpu_attention, gpu_train, gpu_check.sh, bench_attention_torch.py, bench_torch_train.py (run: .gpu/gpu_check.sh run on the GPU box)"
    ;;
resources)
    root="$(cd "$here/.." && pwd)"
    nvcc="${NVCC:-$root/.cuda/nvidia/cu13/bin/nvcc}"
    printf '%-34s %5s %7s %7s %6s\n' kernel regs spill_st spill_ld smem
    for src in "$root"/kernels/*.cu; do
        "$nvcc" -cubin -arch=sm_90 -O3 --use_fast_math -std=c++17 -I "$root/kernels" --resource-usage \
            -o /dev/null "$src" 2>&1 | python3 -c '
import re, sys
name = None
for line in sys.stdin:
    m = re.search(r"Function properties for (\w+)", line)
    if m:
        name = m.group(1); stores = loads = "?"; continue
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name:
        stores, loads = m.group(1), m.group(2); continue
    m = re.search(r"Used (\d+) registers", line)
    if m and name and not name.startswith("__internal"):
        smem = re.search(r"(\d+) bytes smem", line)
        print("%-34s %5s %7s %7s %6s" % (name, m.group(1), stores, loads, smem.group(1) if smem else "0"))
        name = None'
    done
    ;;
run)
    cd "$here"
    libs=""
    for py in python3 python; do
        command -v "$py" >/dev/null 2>&1 || continue
        for dir in $("$py" -c 'import site, sys; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null); do
            for lib in "$dir"/nvidia/*/lib; do
                [[ -d "$lib" ]] && libs="$libs:$lib"
            done
        done
        break
    done
    export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
    set +e
    # One thread and --nocapture: each test's output (relative errors, skip reasons) follows its name.
    status=0
    : >gpu_tests.log
    for test in gpu_ops gpu_attention gpu_train; do
        ./"$test" --ignored --test-threads=1 --nocapture >>gpu_tests.log 2>&1 || status=1
    done
    set -e
    cat gpu_tests.log
    echo
    python3 - gpu_tests.log <<'PY' || status=1
import re, sys
rows, cur, skipped = [], None, 0
for line in open(sys.argv[1], errors="replace"):
    line = line.rstrip("\n")
    m = re.match(r"^test (\S+) \.\.\. ?(.*)$", line)
    if m:
        cur = {"name": m.group(1), "result": None, "err": 0.0, "skip": False}
        rows.append(cur)
        line = m.group(2)
    if cur is None:
        continue
    if "skipped:" in line:
        cur["skip"] = True
    for e in re.findall(r"relative error ([0-9.eE+-]+)", line):
        cur["err"] = max(cur["err"], float(e))
    tail = line.strip()
    for word in ("ok", "FAILED", "ignored"):
        if tail == word or tail.endswith(" " + word):
            cur["result"] = word
print("%-52s %-8s %s" % ("test", "result", "max rel err"))
for r in rows:
    res = "SKIPPED" if r["skip"] else (r["result"] or "?")
    skipped += r["skip"]
    print("%-52s %-8s %s" % (r["name"], res, "%.2e" % r["err"] if r["err"] else "-"))
if skipped:
    print("%d tests were skipped: the backend did not open (see the log above)" % skipped)
    sys.exit(1)
PY
    exit "$status"
    ;;
bench)
    # The training step of the 1.3B on synthetic batches (with its dropout, then sft next to
    # PyTorch + transformers without dropout, in one table), then the demo on the GPU.
    cd "$here"
    export LD_LIBRARY_PATH="$(python3 -c 'import site,glob; print(":".join(sorted(glob.glob(site.getsitepackages()[0] + "/nvidia/*/lib"))))' 2>/dev/null)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    ./sft bench --config simplellama-1.3b --tokens-per-step 65536 --seq-len 2048 --micro-batch 8 --steps 5 --device cuda
    python3 ./bench_torch_train.py --sft ./sft --config simplellama-1.3b --tokens-per-step 65536 --seq-len 2048 \
        --micro-batch 8 --steps 5 --device cuda || echo "bench_torch_train.py failed (see above)"
    ./sft demo --device cuda --out demo-gpu
    ;;
attention)
    # Causal attention at B·T = 16k, 32 heads of 64: PyTorch flash SDPA, then ours (tensor cores
    # and the scalar kernels), in one table.
    cd "$here"
    export LD_LIBRARY_PATH="$(python3 -c 'import site,glob; print(":".join(sorted(glob.glob(site.getsitepackages()[0] + "/nvidia/*/lib"))))' 2>/dev/null)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    python3 ./bench_attention_torch.py --sft ./sft --scalar
    ;;
*)
    echo "usage: $0 build|resources|run|bench|attention" >&2
    exit 2
    ;;
esac
