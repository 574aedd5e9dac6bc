#!/usr/bin/env bash
# Builds the CUDA binaries on a development machine (no GPU needed) and runs them on a GPU box
# (which may have no Rust toolchain and no network).
#
#   scripts/gpu_check.sh build       # here: REQUIRE_NVCC=1 release build + test binaries, the CPU
#                                    # demo reference and the commit -> .gpu/ (carry that folder)
#   scripts/gpu_check.sh resources   # here: registers / spills / shared memory per kernel (sm_90 cubin)
#   scripts/gpu_check.sh sass        # here: the flash kernels' main loops by instruction class (sm_90
#                                    # SASS and the sm_90a wgmma kernels; fails where ptxas serializes a
#                                    # wgmma; installs cuobjdump and nvdisasm from PyPI into .cuda/sass)
#   .gpu/gpu_check.sh all            # on the GPU box: everything below in at most 8 minutes, each
#                                    # part time-boxed; results.md to $OUT (else beside this script)
#   scripts/gpu_check.sh dry         # here / CI (= all --dry): every part that runs on the CPU at
#                                    # tiny sizes, the rest skipped with the reason; same results.md
#   .gpu/gpu_check.sh run            # on the GPU box: the GPU tests only, as a table
#   .gpu/gpu_check.sh bench          # on the GPU box: the 1.3B training step, sft vs PyTorch +
#                                    # transformers (one table), then the full demo on the GPU
#   .gpu/gpu_check.sh attention      # on the GPU box: PyTorch flash SDPA vs sft bench-attention (one table)
#
# `all` runs five parts, each under `timeout` with its own budget (seconds; the environment
# variables BUDGET_TESTS ... override them), and records a failure or a timeout in the results
# before going on to the next part:
#   tests     120  gpu_ops, gpu_attention, gpu_train (each binary time-boxed too): every kernel
#                  against its CPU twin, a whole training step GPU vs CPU, padded and packed
#   demo       60  `sft demo` for 100 steps on the GPU, its per-step losses against the CPU run
#                  recorded at build time (tolerances: scripts/gpu_report.py, demo_compare)
#   bench     140  `sft bench` on the 1.3B next to PyTorch + transformers: tokens/s, MFU, memory
#   attention  80  causal attention fwd and fwd+bwd next to PyTorch flash SDPA (every dQ accumulation,
#                  on mma.sync and, on compute capability 9.0, on wgmma)
#   kernels    75  `sft bench-kernels`: lm_head + cross-entropy and AdamW next to PyTorch, and copy
#                  bandwidth
# 475 s of budgets inside a 490 s cap (GPU_CHECK_TOTAL): a part starts with what is left of the
# cap when that is less than its budget. Files back (results dir = $OUT, else .gpu/):
# results.md (machine, driver, CUDA, date, commit, the summary, every part's table and status),
# gpu_check.log (every part's output), demo_cpu_log.csv and demo_run_log.csv.
set -euo pipefail

mode="${1:-build}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
self="$here/$(basename "${BASH_SOURCE[0]}")"

# The demo run compared between the CPU (at build time) and the GPU: short enough for its
# budget, long enough for the loss to fall from about 5.8 to under 1.
DEMO_ARGS="--steps 100 --examples 4000 --heldout 10 --micro-batch 32 --seed 89"
SCRIPTS="gpu_check.sh gpu_probe.sh gpu_env.sh gpu_report.py bench_attention_torch.py bench_torch_train.py bench_kernels_torch.py"

# python_libs: the Python environment's nvidia/*/lib folders on LD_LIBRARY_PATH.
source "$here/gpu_env.sh"

# The folder holding the built binaries: this script's own (a copy in .gpu/), else ../.gpu.
gpu_dir() {
    if [[ -x "$here/sft" ]]; then
        echo "$here"
    else
        echo "$(cd "$here/.." && pwd)/.gpu"
    fi
}

have_torch() { python3 -c 'import torch' >/dev/null 2>&1; }

# Prints a part's command (results.md quotes the first one) and runs it.
say_run() {
    echo "\$ $*"
    "$@"
}

# One part of `all`, run by `timeout` in a process of its own: in the binaries' folder, output
# to stdout, its table to $work/<part>.md. Exit 0: done; 3: skipped (reason in
# $work/<part>.skip); anything else: failed.
run_one_part() {
    local name="$1" work="$2" dry="$3"
    local torch_flag=""
    have_torch || torch_flag="--no-torch"
    case "$name" in
    tests)
        local raw="$work/tests.raw" t budget rc
        : >"$raw"
        echo "\$ ./{gpu_ops,gpu_attention,gpu_train} --ignored --test-threads=1 --nocapture"
        for t in gpu_ops gpu_attention gpu_train; do
            # Per-binary boxes inside the part's, so that one hanging binary leaves the others
            # their turn. The 200-step demo test is left to `run`: the demo part checks the
            # same against the CPU run recorded at build time, without a CPU run on the box.
            case "$t" in gpu_ops) budget=35 ;; gpu_attention) budget=50 ;; *) budget=35 ;; esac
            echo "== $t" >>"$raw"
            set +e
            timeout -k 5 "$budget" ./"$t" --ignored --test-threads=1 --nocapture \
                --skip demo_loss_curve_on_gpu_follows_cpu >>"$raw" 2>&1
            rc=$?
            set -e
            if [[ $rc -eq 124 || $rc -eq 137 ]]; then
                echo "== $t timed out after $budget s" >>"$raw"
            fi
        done
        cat "$raw"
        set +e
        python3 ./gpu_report.py tests-table "$raw" "$work/tests.md"
        rc=$?
        set -e
        if [[ $rc -eq 3 ]]; then
            if [[ "$dry" == 1 ]]; then
                echo "no GPU: every test ran and skipped (the table shows why)" >"$work/tests.skip"
                return 3
            fi
            echo "every test skipped: the CUDA backend did not open on this machine" >&2
            return 1
        fi
        return "$rc"
        ;;
    demo)
        [[ -f demo_cpu_log.csv && -f demo_args ]] ||
            { echo "no demo_cpu_log.csv / demo_args here: run scripts/gpu_check.sh build" >&2; return 1; }
        local device=cuda label=gpu
        if [[ "$dry" == 1 ]]; then device=cpu label="cpu rerun"; fi
        # shellcheck disable=SC2046
        say_run ./sft demo --device "$device" $(cat demo_args) --out "$work/demo-run"
        cp "$work/demo-run/run/log.csv" "$work/demo_run_log.csv"
        python3 ./gpu_report.py demo-compare demo_cpu_log.csv "$work/demo-run/run/log.csv" "$work/demo.md" "$label"
        ;;
    bench)
        if [[ "$dry" == 1 ]]; then
            say_run python3 ./bench_torch_train.py --sft ./sft --config tiny --device cpu --tokens-per-step 2048 \
                --seq-len 256 --micro-batch 4 --steps 2 --warmup 1 $torch_flag --markdown "$work/bench.md"
        else
            # sft first, bounded, so that PyTorch keeps the rest of the budget.
            say_run python3 ./bench_torch_train.py --sft ./sft --config simplellama-1.3b --tokens-per-step 65536 \
                --seq-len 2048 --micro-batch 8 --steps 5 --warmup 2 --device cuda --sft-timeout 70 \
                $torch_flag --markdown "$work/bench.md"
        fi
        ;;
    attention)
        if [[ "$dry" == 1 ]]; then
            echo "needs a CUDA GPU (sft bench-attention and flash SDPA run on the device only)" >"$work/attention.skip"
            return 3
        fi
        say_run python3 ./bench_attention_torch.py --sft ./sft --dq all --mma both $torch_flag \
            --markdown "$work/attention.md"
        ;;
    kernels)
        if [[ "$dry" == 1 ]]; then
            say_run python3 ./bench_kernels_torch.py --sft ./sft --device cpu $torch_flag --markdown "$work/kernels.md"
        else
            say_run python3 ./bench_kernels_torch.py --sft ./sft --device cuda --sft-timeout 40 $torch_flag \
                --markdown "$work/kernels.md"
        fi
        ;;
    *)
        echo "unknown part $name" >&2
        return 2
        ;;
    esac
}

# Writes $work/<part>.status (JSON) for gpu_report.py.
write_status() {
    python3 - "$@" <<'PY'
import json, sys
work, name, status, seconds, budget, note, command = sys.argv[1:8]
st = {"status": status, "budget": budget, "note": note, "command": command}
if seconds:
    st["seconds"] = float(seconds)
with open("%s/%s.status" % (work, name), "w") as f:
    json.dump(st, f)
PY
}

# Machine, driver, CUDA, PyTorch, date, commit -> $work/info.json.
write_info() {
    local work="$1" dry="$2" device="" driver="" cuda="" torch="" cpu
    cpu="$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //') ($(nproc 2>/dev/null || echo '?') CPUs)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        device="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n 1 || true)"
        driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)"
        cuda="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -n 1 || true)"
    fi
    torch="$(python3 -c 'import torch, transformers; print("torch %s (CUDA %s), transformers %s" % (torch.__version__, torch.version.cuda, transformers.__version__))' 2>/dev/null ||
        python3 -c 'import torch; print("torch %s (CUDA %s), no transformers" % (torch.__version__, torch.version.cuda))' 2>/dev/null ||
        echo "not installed")"
    python3 - "$work/info.json" "$dry" "${device:-none}" "${driver:--}" "${cuda:--}" "$torch" "$cpu" <<'PY'
import json, os, sys, time
out, dry, device, driver, cuda, torch, cpu = sys.argv[1:8]
build = {}
if os.path.exists("BUILD"):
    for line in open("BUILD"):
        k, _, v = line.rstrip("\n").partition("\t")
        build[k] = v
info = {
    "dry": dry == "1",
    "device": device if dry != "1" else "none (dry run on the CPU)",
    "driver": driver,
    "CUDA (driver)": cuda,
    "PyTorch": torch,
    "host CPU": cpu,
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "commit": build.get("commit", "unknown (no BUILD file: built before gpu_check.sh wrote one)"),
    "built": "%s with %s, %s" % (build.get("built", "?"), build.get("rustc", "?"), build.get("nvcc", "?")),
    "command": ".gpu/gpu_check.sh %s" % ("dry" if dry == "1" else "all"),
}
json.dump(info, open(out, "w"))
PY
}

case "$mode" in
build)
    root="$(cd "$here/.." && pwd)"
    cd "$root"
    REQUIRE_NVCC=1 cargo build --release
    mkdir -p .gpu
    # A previous run's results must not travel to the box as if they were new.
    rm -rf .gpu/work .gpu/results.md .gpu/gpu_check.log .gpu/demo_run_log.csv .gpu/gpu_tests.log .gpu/gpu_tests.md
    # Binaries without their debug sections (symbols kept, for backtraces): the folder must
    # travel to the GPU box (under 64 MiB there).
    install_bin() {
        strip --strip-debug -o "$2" "$1" 2>/dev/null || cp "$1" "$2"
    }
    # The paths of the test executables come from cargo's JSON messages.
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
        install_bin "$test_bin" ".gpu/$test"
    done
    install_bin target/release/sft .gpu/sft
    for s in $SCRIPTS; do cp "scripts/$s" ".gpu/$s"; done
    # The box may have no git: the commit travels in .gpu/BUILD.
    commit="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
    git diff --quiet HEAD 2>/dev/null || commit="$commit + uncommitted changes"
    {
        printf 'commit\t%s on branch %s\n' "$commit" "$(git rev-parse --abbrev-ref HEAD 2>/dev/null || echo '?')"
        printf 'built\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
        printf 'rustc\t%s\n' "$(rustc --version 2>/dev/null || echo '?')"
        printf 'nvcc\t%s\n' "$(.cuda/nvidia/cu13/bin/nvcc --version 2>/dev/null | sed -n 's/.*\(release [0-9.]*\).*/nvcc \1/p' | head -n 1)"
    } >.gpu/BUILD
    # The CPU reference of the demo check: per-step losses of the same run on the CPU backend.
    echo "$DEMO_ARGS" >.gpu/demo_args
    rm -rf .gpu/work/demo-cpu
    # shellcheck disable=SC2086
    .gpu/sft demo --device cpu $DEMO_ARGS --out .gpu/work/demo-cpu >.gpu/demo_cpu.out 2>&1 ||
        { cat .gpu/demo_cpu.out; echo "the CPU demo reference failed" >&2; exit 1; }
    cp .gpu/work/demo-cpu/run/log.csv .gpu/demo_cpu_log.csv
    rm -rf .gpu/work
    echo "copied to $root/.gpu ($(du -sh .gpu | cut -f1)): sft, gpu_ops, gpu_attention, gpu_train, $SCRIPTS,"
    echo "BUILD ($(cut -f2 .gpu/BUILD | head -n 1)), demo_cpu_log.csv ($(($(wc -l <.gpu/demo_cpu_log.csv) - 1)) CPU steps)."
    echo "On the GPU box: .gpu/gpu_check.sh all   (here, without a GPU: scripts/gpu_check.sh dry)"
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
sass)
    root="$(cd "$here/.." && pwd)"
    nvcc="${NVCC:-$root/.cuda/nvidia/cu13/bin/nvcc}"
    tools="$root/.cuda/sass"
    # cuobjdump and nvdisasm are not in the 13.0 wheels; later ones read sm_90 cubins of 13.0.
    if [[ ! -x "$tools/nvidia/cu13/bin/cuobjdump" || ! -x "$tools/nvidia/cu13/bin/nvdisasm" ]]; then
        python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$tools" \
            nvidia-cuda-cuobjdump==13.2.78 nvidia-cuda-nvdisasm==13.5.37
    fi
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$nvcc" -cubin -arch=sm_90 -O3 --use_fast_math -std=c++17 -I "$root/kernels" -o "$tmp/flash.cubin" \
        "$root/kernels/flash_attention.cu" 2>/dev/null
    # The sm_90a module (the *_sm90 kernels on wgmma), as build.rs compiles it. A wgmma that
    # ptxas serializes (waits after every one: C7520, e.g. for accumulator registers written in
    # a divergent path) would throw away what the kernel is for: fail.
    "$nvcc" -cubin -arch=sm_90a -DSFT_SM90A -O3 --use_fast_math -std=c++17 -Xptxas -v -I "$root/kernels" \
        -o "$tmp/flash90a.cubin" "$root/kernels/flash_attention.cu" >"$tmp/ptxas90a.log" 2>&1
    if grep -i "serialized" "$tmp/ptxas90a.log"; then
        echo "ptxas serialized wgmma instructions (above)" >&2
        exit 1
    fi
    for c in flash flash90a; do
        PATH="$tools/nvidia/cu13/bin:$PATH" cuobjdump -sass "$tmp/$c.cubin" >>"$tmp/flash.sass"
    done
    python3 "$here/sass_loops.py" "$tmp/flash.sass"
    ;;
all | dry)
    dry=0
    if [[ "$mode" == dry || "${2:-}" == --dry ]]; then dry=1; fi
    g="$(gpu_dir)"
    [[ -x "$g/sft" ]] || { echo "no sft binary in $g: run scripts/gpu_check.sh build first" >&2; exit 1; }
    if [[ "$dry" == 1 && "$here" != "$g" ]]; then
        # From scripts/: the dry run checks these scripts, not the copies of the last build.
        for s in $SCRIPTS; do cp "$here/$s" "$g/$s"; done
    fi
    cd "$g"
    python_libs
    results_dir="${OUT:-$g}"
    mkdir -p "$results_dir"
    work="$g/work"
    rm -rf "$work"
    mkdir -p "$work"
    total="${GPU_CHECK_TOTAL:-490}"
    t0=$(date +%s)
    write_info "$work" "$dry"
    failed=0
    if [[ "$dry" == 1 ]]; then
        # The table-making code first: parsing, comparing and checking on made-up inputs.
        python3 ./gpu_report.py self-test || exit 1
        # On two shared CPU cores the demo's 100 steps take 20-50 s.
        budgets="tests ${BUDGET_TESTS:-60} demo ${BUDGET_DEMO:-120} bench ${BUDGET_BENCH:-60}"
        budgets="$budgets attention ${BUDGET_ATTENTION:-30} kernels ${BUDGET_KERNELS:-60}"
    else
        budgets="tests ${BUDGET_TESTS:-120} demo ${BUDGET_DEMO:-60} bench ${BUDGET_BENCH:-140}"
        budgets="$budgets attention ${BUDGET_ATTENTION:-80} kernels ${BUDGET_KERNELS:-75}"
    fi
    set -- $budgets
    while (($# >= 2)); do
        name="$1" budget="$2"
        shift 2
        left=$((total - ($(date +%s) - t0)))
        ((left < budget)) && budget=$left
        if ((left < 10)); then
            write_status "$work" "$name" skipped "" "$budget" "no time left of the $total s cap" ""
            failed=1
            continue
        fi
        echo
        echo "=== part $name (budget $budget s) ==="
        start=$(date +%s.%N)
        set +e
        timeout -k 10 "$budget" "$self" _part "$name" "$work" "$dry" 2>&1 | tee "$work/$name.log"
        rc=${PIPESTATUS[0]}
        set -e
        seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
        note=""
        case "$rc" in
        0) status=ok ;;
        3)
            status=skipped
            note="$(cat "$work/$name.skip" 2>/dev/null || echo "no reason given")"
            [[ "$dry" == 1 ]] || failed=1
            ;;
        124 | 137)
            status=TIMEOUT
            note="stopped after its $budget s budget"
            failed=1
            ;;
        *)
            status=FAILED
            note="exit status $rc"
            failed=1
            ;;
        esac
        command="$(sed -n 's/^\$ //p' "$work/$name.log" | head -n 1)"
        write_status "$work" "$name" "$status" "$seconds" "$budget" "$note" "$command"
    done
    set +e
    python3 ./gpu_report.py results "$work" "$results_dir/results.md" >"$work/summary.txt"
    rc_results=$?
    python3 ./gpu_report.py check-results "$results_dir/results.md"
    rc_check=$?
    set -e
    for name in tests demo bench attention kernels; do
        echo "=== $name ==="
        cat "$work/$name.log" 2>/dev/null || echo "(no output)"
    done >"$results_dir/gpu_check.log"
    cp demo_cpu_log.csv "$results_dir/demo_cpu_log.csv" 2>/dev/null || true
    cp "$work/demo_run_log.csv" "$results_dir/demo_run_log.csv" 2>/dev/null || true
    echo
    cat "$work/summary.txt"
    echo "logs: $results_dir/gpu_check.log"
    if ((rc_results != 0 || rc_check != 0)); then
        echo "gpu_check.sh: writing or checking results.md failed" >&2
        exit 1
    fi
    exit "$failed"
    ;;
_part)
    # Internal: one part of `all`, under its timeout (see above). Under `set -e` the first
    # failing command ends the part with its status.
    cd "$(gpu_dir)"
    run_one_part "$2" "$3" "$4"
    exit 0
    ;;
run)
    cd "$here"
    python_libs
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
    set +e
    # One thread and --nocapture: each test's output (relative errors, skip reasons) follows its name.
    status=0
    : >gpu_tests.log
    for test in gpu_ops gpu_attention gpu_train; do
        echo "== $test" >>gpu_tests.log
        ./"$test" --ignored --test-threads=1 --nocapture >>gpu_tests.log 2>&1 || status=1
    done
    cat gpu_tests.log
    echo
    # Exit 3 there: every test skipped (no GPU), which fails here too.
    python3 ./gpu_report.py tests-table gpu_tests.log gpu_tests.md || status=1
    exit "$status"
    ;;
bench)
    # The training step of the 1.3B on synthetic batches (with its dropout, then sft next to
    # PyTorch + transformers without dropout, in one table), then the demo on the GPU.
    cd "$here"
    python_libs
    ./sft bench --config simplellama-1.3b --tokens-per-step 65536 --seq-len 2048 --micro-batch 8 --steps 5 --device cuda
    python3 ./bench_torch_train.py --sft ./sft --config simplellama-1.3b --tokens-per-step 65536 --seq-len 2048 \
        --micro-batch 8 --steps 5 --device cuda || echo "bench_torch_train.py failed (see above)"
    ./sft demo --device cuda --out demo-gpu
    ;;
attention)
    # Causal attention at B·T = 16k, 32 heads of 64: PyTorch flash SDPA, then ours (tensor cores
    # and the scalar kernels), in one table.
    cd "$here"
    python_libs
    python3 ./bench_attention_torch.py --sft ./sft --scalar
    ;;
*)
    echo "usage: $0 build|resources|sass|all [--dry]|dry|run|bench|attention" >&2
    exit 2
    ;;
esac
