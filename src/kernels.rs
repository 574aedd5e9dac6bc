//! The PTX that build.rs compiled from `kernels/*.cu`, embedded in the binary.

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The PTX of one kernel module (the file stem of `kernels/NAME.cu`).
pub fn ptx(module: &str) -> Option<&'static str> {
    PTX_MODULES.iter().find(|(name, _)| *name == module).map(|(_, ptx)| *ptx)
}

#[cfg(test)]
mod tests {
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
