//! The PTX that build.rs compiled from `kernels/*.cu`, embedded in the binary, and the list of
//! kernels (`KERNELS`) that build.rs read from the same sources; the typed launchers
//! (`backend::cuda::launch`) are generated from that parse too.

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The PTX of one kernel module (the file stem of `kernels/NAME.cu`).
pub fn ptx(module: &str) -> Option<&'static str> {
    PTX_MODULES.iter().find(|(name, _)| *name == module).map(|(_, ptx)| *ptx)
}

/// The newest PTX ISA version (`.version MAJOR.MINOR`) among the embedded modules; `None`
/// without kernels.
pub fn ptx_isa_version() -> Option<(u32, u32)> {
    PTX_MODULES.iter().filter_map(|(_, ptx)| parse_ptx_version(ptx)).max()
}

fn parse_ptx_version(ptx: &str) -> Option<(u32, u32)> {
    let line = ptx.lines().find_map(|l| l.trim().strip_prefix(".version "))?;
    let (major, minor) = line.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The oldest driver (`cuDriverGetVersion`, 1000·major + 10·minor) that loads PTX of this ISA
/// version, where known: nvcc 13 writes ISA 9.0, which needs the CUDA 13.0 driver (R580).
pub fn driver_needed_for_ptx(isa: (u32, u32)) -> Option<i32> {
    (isa >= (9, 0)).then_some(13_000)
}

/// An error naming the driver needed when `driver_version` cannot load PTX of ISA `isa`.
pub fn check_driver_for_ptx(driver_version: i32, isa: (u32, u32)) -> Result<(), String> {
    match driver_needed_for_ptx(isa) {
        Some(need) if driver_version < need => Err(format!(
            "the CUDA driver is version {}.{} ({driver_version}), but this binary's kernels are PTX ISA \
             {}.{} (nvcc {}), which needs the CUDA {}.{} driver or newer (NVIDIA driver R580+ for CUDA 13); \
             update the NVIDIA driver",
            driver_version / 1000,
            driver_version % 1000 / 10,
            isa.0,
            isa.1,
            need / 1000,
            need / 1000,
            need % 1000 / 10
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[allow(dead_code)]
#[path = "../build/signatures.rs"]
mod signatures;

#[cfg(test)]
mod tests {
    use super::signatures::{parse_source, ParamKind};

    #[test]
    fn every_ptx_entry_is_in_the_kernel_list() {
        if !super::PTX_UNAVAILABLE.is_empty() {
            eprintln!("skipped: {}", super::PTX_UNAVAILABLE);
            return;
        }
        for (module, names) in super::KERNELS {
            let ptx = super::ptx(module).unwrap();
            let entries: Vec<&str> = ptx
                .lines()
                .filter_map(|l| l.trim_start().strip_prefix(".visible .entry "))
                .map(|l| l.split('(').next().unwrap().trim())
                .collect();
            let mut listed: Vec<&str> = names.to_vec();
            let mut found = entries.clone();
            listed.sort();
            found.sort();
            assert_eq!(listed, found, "kernels/{module}.cu: parsed signatures vs PTX entries");
        }
    }

    #[test]
    fn an_old_driver_is_named_with_the_one_needed() {
        assert_eq!(super::parse_ptx_version("//\n.version 9.0\n.target sm_80\n"), Some((9, 0)));
        assert_eq!(super::parse_ptx_version(".version 8.7\n"), Some((8, 7)));
        let err = super::check_driver_for_ptx(12_040, (9, 0)).unwrap_err();
        assert!(err.contains("12.4 (12040)") && err.contains("PTX ISA 9.0"), "{err}");
        assert!(err.contains("CUDA 13.0 driver") && err.contains("R580"), "{err}");
        assert!(super::check_driver_for_ptx(12_090, (9, 0)).is_err());
        assert!(super::check_driver_for_ptx(13_000, (9, 0)).is_ok());
        assert!(super::check_driver_for_ptx(13_020, (9, 0)).is_ok());
        // Older ISAs are left to the module load's own error.
        assert!(super::check_driver_for_ptx(12_040, (8, 5)).is_ok());
    }

    #[test]
    fn hopper_only_kernels_get_their_own_module() {
        use super::signatures::module_of;
        assert_eq!(module_of("flash_attention", "flash_forward_64_sm90"), "flash_attention_sm90a");
        assert_eq!(module_of("flash_attention", "flash_forward_64"), "flash_attention");
        // An sm_90a module holds its *_sm90 kernels and nothing else (the PTX entries test above
        // checks the same against what nvcc wrote).
        for (module, names) in super::KERNELS {
            assert_eq!(module.ends_with("_sm90a"), names.iter().all(|n| n.ends_with("_sm90")), "{module}");
        }
    }

    #[test]
    fn macro_generated_kernels_are_expanded() {
        let src = r#"
            typedef __nv_bfloat16 bf16_t;
            // extern "C" __global__ void commented_out(int x);
            #define ENTRIES(HD, NW)                                                  \
                extern "C" __global__ void __launch_bounds__(NW * 32, 2)             \
                    fwd_##HD(bf16_t* out, const float* lse, int n) {                 \
                    impl<HD>(out, lse, n);                                           \
                }
            ENTRIES(64, 8)
            ENTRIES(128, 4)
            extern "C" __global__ void plain(float* x, const unsigned int* __restrict__ ids, size_t len,
                                             unsigned long long seed, long long ld) {}
        "#;
        let sigs = parse_source("m", src).unwrap();
        let names: Vec<&str> = sigs.kernels.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["fwd_64", "fwd_128", "plain"]);
        let fwd = &sigs.kernels[0];
        assert_eq!(fwd.params[0].rust, "half::bf16");
        assert_eq!(fwd.params[0].kind, ParamKind::Out);
        assert_eq!(fwd.params[1].kind, ParamKind::In);
        assert_eq!((fwd.params[2].rust.as_str(), fwd.params[2].kind), ("i32", ParamKind::Scalar));
        let plain: Vec<&str> = sigs.kernels[2].params.iter().map(|p| p.rust.as_str()).collect();
        assert_eq!(plain, ["f32", "u32", "usize", "u64", "i64"]);
    }

    #[test]
    fn an_unreadable_signature_is_an_error_naming_it() {
        let err = parse_source("m", "extern \"C\" __global__ void k(float2* x, int n) {}").unwrap_err();
        assert!(err.contains("void k(float2* x, int n)") && err.contains("float2"), "{err}");
        let err = parse_source("m", "extern \"C\" __global__ void k(const float* const x) {}").unwrap_err();
        assert!(err.contains("const pointer"), "{err}");
        let err = parse_source("m", "__global__ void hidden(float* x) {}").unwrap_err();
        assert!(err.contains("1 `__global__` declarations but 0"), "{err}");
    }

    #[test]
    fn struct_parameters_are_mirrored() {
        let src = "struct T { float* a; const float* b; unsigned long long len; };\n\
                   extern \"C\" __global__ void k(const T* t, float lr) {}";
        let sigs = parse_source("m", src).unwrap();
        assert_eq!(sigs.structs.len(), 1);
        let fields: Vec<(&str, &str)> =
            sigs.structs[0].fields.iter().map(|(n, t, _)| (n.as_str(), t.as_str())).collect();
        assert_eq!(fields, [("a", "u64"), ("b", "u64"), ("len", "u64")]);
        assert_eq!(sigs.kernels[0].params[0].rust, "T");
    }

    #[test]
    fn every_kernel_source_is_embedded_when_nvcc_was_found() {
        if !super::PTX_UNAVAILABLE.is_empty() {
            eprintln!("skipped: {}", super::PTX_UNAVAILABLE);
            return;
        }
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "cu") {
                let stem = path.file_stem().unwrap().to_str().unwrap();
                let ptx = super::ptx(stem).unwrap_or_else(|| panic!("{stem} not embedded"));
                assert!(ptx.contains(".entry"), "{stem}: PTX has no kernel entry");
            }
        }
    }
}
