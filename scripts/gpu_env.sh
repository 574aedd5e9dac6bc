# Sourced by gpu_check.sh and gpu_probe.sh on the GPU box: python_libs puts the Python
# environment's nvidia/*/lib folders (cuBLASLt, NCCL, ...) on LD_LIBRARY_PATH.
python_libs() {
    local libs="" py dir lib
    for py in python3 python; do
        command -v "$py" >/dev/null 2>&1 || continue
        for dir in $("$py" -c 'import site; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null); do
            for lib in "$dir"/nvidia/*/lib; do
                [[ -d "$lib" ]] && libs="$libs:$lib"
                # NCCL's wheels ship libnccl.so.2 alone; cudarc loads libnccl.so.
                if [[ -e "$lib/libnccl.so.2" && ! -e "$lib/libnccl.so" ]]; then
                    mkdir -p /tmp/sft_nccl && ln -sf "$lib/libnccl.so.2" /tmp/sft_nccl/libnccl.so
                    libs="$libs:/tmp/sft_nccl"
                fi
            done
        done
        break
    done
    export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
