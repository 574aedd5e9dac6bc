//! The CUDA backend: our kernels (kernels/*.cu, embedded as PTX) and cuBLASLt GEMMs, driven by cudarc.
