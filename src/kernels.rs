//! The PTX that build.rs compiled from `kernels/*.cu`, embedded in the binary, and the list of
//! kernels (`KERNELS`) that build.rs read from the same sources; the typed launchers
//! (`backend::cuda::launch`) are generated from that parse too.

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The PTX of one kernel module (the file stem of `kernels/NAME.cu`).
pub fn ptx(module: &str) -> Option<&'static str> {
    PTX_MODULES.iter().find(|(name, _)| *name == module).map(|(_, ptx)| *ptx)
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
