//! Compiles every kernel file of EMULATED (src/table.rs) for the CPU: one C++ translation unit
//! per file includes emu.h and the real kernels/NAME.cu and exports `emu_ENTRY` for each entry.
//! The kernel code is instrumented (-fsanitize=thread, with our hooks in runtime.cpp, not the
//! ThreadSanitizer runtime) for the shared-memory checks.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;

include!("src/table.rs");

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernels = root.join("kernels");
    let cuda_include = env::var("CUDA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join(".cuda/nvidia/cu13"))
        .join("include");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=EMU_KERNELS_DIR");
    println!("cargo:rerun-if-changed=cpp");
    println!("cargo:rerun-if-changed=src/table.rs");
    println!("cargo:rerun-if-changed={}", kernels.display());
    // EMU_KERNELS_DIR: a copy of kernels/ to emulate instead (the sensitivity checks).
    let kernels = env::var("EMU_KERNELS_DIR").map(PathBuf::from).unwrap_or(kernels);
    for entry in fs::read_dir(&kernels).into_iter().flatten().flatten() {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
    if !cuda_include.join("cuda_bf16.h").exists() {
        panic!(
            "the emulation needs the CUDA headers (cuda_bf16.h) in {}: run scripts/install_nvcc.sh or set CUDA_HOME",
            cuda_include.display()
        );
    }

    let mut units = Vec::new();
    for (stem, entries) in EMULATED {
        let mut src = String::new();
        // A namespace per file: the same inline helper in two files (block_sum) keeps its own
        // `partial` (one CTA of one kernel runs at a time, but the check wants no aliasing).
        // emu.h has included every header the kernels include, so those see no namespace.
        let cu = kernels.join(format!("{stem}.cu"));
        writeln!(src, "#include \"emu.h\"\nnamespace emu_{stem} {{\n#include \"{}\"\n}}", cu.display())
            .unwrap();
        for e in *entries {
            writeln!(src, "EMU_ENTRY(emu_{stem}::{e}, {e})").unwrap();
        }
        let path = out.join(format!("emu_{stem}.cpp"));
        fs::write(&path, src).unwrap();
        units.push(path);
    }
    // The checks' self-test (emu/cpp/selftest.cu), compiled as a kernel file.
    let selftest = out.join("emu_selftest.cpp");
    let st_entries = ["selftest_missing_barrier", "selftest_with_barrier", "selftest_bank_conflict"];
    let mut src = "#include \"emu.h\"\nnamespace emu_selftest {\n#include \"selftest.cu\"\n}\n".to_string();
    for e in st_entries {
        writeln!(src, "EMU_ENTRY(emu_selftest::{e}, {e})").unwrap();
    }
    fs::write(&selftest, src).unwrap();
    units.push(selftest);

    // The Rust side: one extern declaration per entry and a lookup by name.
    let mut ffi = String::from("extern \"C\" {\n");
    let mut lookup = String::from("/// The emulated entry `name`, if EMULATED lists it.\npub fn entry(name: &str) -> Option<Entry> {\n    Some(match name {\n");
    for entries in EMULATED.iter().map(|(_, e)| *e).chain([&st_entries[..]]) {
        for e in entries {
            writeln!(ffi, "    fn emu_{e}(cfg: *const EmuLaunch, args: *mut *mut c_void);").unwrap();
            writeln!(lookup, "        \"{e}\" => emu_{e},").unwrap();
        }
    }
    ffi.push_str("}\n");
    lookup.push_str("        _ => return None,\n    })\n}\n");
    fs::write(out.join("entries.rs"), ffi + &lookup).unwrap();

    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .std("c++20")
            .opt_level(2)
            .include(manifest.join("cpp"))
            .include(&kernels)
            .include(&cuda_include)
            .flag("-pthread")
            .warnings(false);
        b
    };
    base()
        .files(&units)
        .flag("-fsanitize=thread")
        .flag("--param=tsan-instrument-func-entry-exit=0")
        .compile("emu_kernels");
    base().file(manifest.join("cpp/runtime.cpp")).compile("emu_runtime");
    println!("cargo:rustc-link-lib=stdc++");
}
