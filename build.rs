//! Compiles every `kernels/*.cu` to PTX with nvcc and embeds the PTX in the crate.
//!
//! The PTX is generated here, on the build machine, so that a GPU box needs only the
//! driver: no toolkit, no Rust. Without nvcc the build still succeeds (the CPU backend
//! works everywhere); `REQUIRE_NVCC=1` turns a missing nvcc or a kernel that does not
//! compile into a build failure, which is what CI uses.
//!
//! It also reads every `extern "C" __global__` signature (macro-generated ones included) and
//! writes `$OUT_DIR/launchers.rs`: one typed, `unsafe` launcher per kernel, so that a launch
//! with a wrong argument count, order or type does not compile. The kernel list that the
//! backend loads comes from the same parse, so names cannot drift. A signature the parser
//! cannot read fails the build, with or without nvcc.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernels_dir = manifest.join("kernels");
    for var in ["NVCC", "CUDA_HOME", "REQUIRE_NVCC", "SFT_CUDA_ARCH", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build/signatures.rs");
    println!("cargo:rerun-if-changed=.cuda/nvidia/cu13/bin/nvcc");

    let require = env::var("REQUIRE_NVCC").map(|v| v == "1").unwrap_or(false);
    let mut sources: Vec<PathBuf> = fs::read_dir(&kernels_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect()
        })
        .unwrap_or_default();
    sources.sort();
    let signatures = kernel_signatures(&sources);
    for entry in fs::read_dir(&kernels_dir).into_iter().flatten().flatten() {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }

    let mut embedded: Vec<(String, PathBuf)> = Vec::new();
    let mut unavailable = String::new();
    match find_nvcc(&manifest) {
        None => {
            let msg = "nvcc not found (looked at $NVCC, $CUDA_HOME/bin, PATH, /usr/local/cuda/bin, \
                       .cuda/ from scripts/install_nvcc.sh); CUDA kernels are not embedded";
            if require {
                panic!("REQUIRE_NVCC=1: {msg}");
            }
            println!("cargo:warning={msg}");
            unavailable = msg.to_string();
        }
        Some(nvcc) => {
            let arch = env::var("SFT_CUDA_ARCH").unwrap_or_else(|_| "compute_80".to_string());
            // Every file for `arch`; a file with Hopper-only kernels (named *_sm90) a second time
            // for compute_90a, those kernels compiled in by -DSFT_SM90A.
            let mut builds: Vec<(PathBuf, String, String, Option<&str>)> = Vec::new();
            for src in &sources {
                let stem = src.file_stem().unwrap().to_string_lossy().to_string();
                builds.push((src.clone(), stem.clone(), arch.clone(), None));
                let sm90a = signatures::module_of(&stem, signatures::SM90A_SUFFIX);
                if signatures.kernels.iter().any(|k| k.module == sm90a) {
                    builds.push((src.clone(), sm90a, "compute_90a".to_string(), Some("-DSFT_SM90A")));
                }
            }
            for (src, stem, arch, define) in builds {
                let ptx = out.join(format!("{stem}.ptx"));
                let result = Command::new(&nvcc)
                    .arg("--ptx")
                    .arg(format!("--gpu-architecture={arch}"))
                    .args(define.iter())
                    .args(["-O3", "--use_fast_math", "-std=c++17", "-lineinfo"])
                    .arg("-I")
                    .arg(&kernels_dir)
                    .arg("-o")
                    .arg(&ptx)
                    .arg(&src)
                    .output();
                match result {
                    Ok(o) if o.status.success() => embedded.push((stem, ptx)),
                    Ok(o) => {
                        let msg = format!(
                            "nvcc failed on {}:\n{}{}",
                            src.display(),
                            String::from_utf8_lossy(&o.stdout),
                            String::from_utf8_lossy(&o.stderr)
                        );
                        if require {
                            panic!("{msg}");
                        }
                        println!("cargo:warning={}", msg.replace('\n', " | "));
                        unavailable = format!("kernel {stem} failed to compile");
                    }
                    Err(e) => {
                        let msg = format!("could not run {}: {e}", nvcc.display());
                        if require {
                            panic!("{msg}");
                        }
                        println!("cargo:warning={msg}");
                        unavailable = msg;
                    }
                }
            }
        }
    }

    let mut code =
        String::from("/// PTX modules compiled from kernels/*.cu by build.rs: (module name, PTX text).\n");
    code.push_str("pub const PTX_MODULES: &[(&str, &str)] = &[\n");
    for (name, path) in &embedded {
        code.push_str(&format!("    ({name:?}, include_str!({:?})),\n", path.display().to_string()));
    }
    code.push_str("];\n");
    code.push_str(&kernel_list(&signatures));
    code.push_str(&format!(
        "/// Why the kernels are missing, or empty when every kernel was compiled.\npub const PTX_UNAVAILABLE: &str = {unavailable:?};\n"
    ));
    fs::write(out.join("kernels.rs"), code).unwrap();
    fs::write(out.join("launchers.rs"), launchers(&signatures)).unwrap();
}

#[path = "build/signatures.rs"]
mod signatures;
use signatures::{kernel_list, kernel_signatures, launchers};

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(p) = env::var("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(home) = env::var("CUDA_HOME") {
        candidates.push(Path::new(&home).join("bin/nvcc"));
    }
    if let Ok(path) = env::var("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    candidates.push(manifest.join(".cuda/nvidia/cu13/bin/nvcc"));
    candidates.into_iter().find(|p| p.is_file())
}
