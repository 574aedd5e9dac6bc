//! Loading the embedded PTX modules and launching their kernels.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaContext, CudaFunction, LaunchConfig};
use cudarc::nvrtc::Ptx;

/// Every kernel the backend launches, by module (the file stem of `kernels/NAME.cu`).
/// Loading them all up front turns a missing or misspelled entry into an error at start-up.
const KERNELS: &[(&str, &[&str])] = &[
    ("cast", &["cast_f32_to_bf16", "cast_bf16_to_f32"]),
    (
        "rmsnorm",
        &[
            "rmsnorm_forward",
            "residual_rmsnorm_forward",
            "rmsnorm_backward_dx",
            "rmsnorm_backward_dw_partial",
            "rmsnorm_backward_dw_reduce",
        ],
    ),
    ("rope", &["rope_apply"]),
    ("swiglu", &["swiglu_forward", "swiglu_backward"]),
    ("dropout", &["dropout_bf16", "dropout_f32"]),
    ("embedding", &["embedding_forward", "embedding_backward_grouped", "embedding_backward_grouped_bf16"]),
    ("cross_entropy", &["cross_entropy_gather_rows", "cross_entropy_scatter_rows", "cross_entropy_rows"]),
    ("global_norm", &["sum_squares_f32", "sum_squares_bf16"]),
    ("adamw", &["adamw_multi"]),
    ("matmul", &["matmul_fallback_f32out", "matmul_fallback_bf16out"]),
    (
        "attention",
        &[
            "attention_forward_64",
            "attention_forward_128",
            "attention_decode_64",
            "attention_decode_128",
            "attention_kv_cache_write",
            "attention_backward_d",
            "attention_backward_dq_64",
            "attention_backward_dq_128",
            "attention_backward_dkdv_64",
            "attention_backward_dkdv_128",
        ],
    ),
    (
        "flash_attention",
        &[
            "flash_tile_table",
            "flash_forward_64",
            "flash_forward_128",
            "flash_backward_dq_64",
            "flash_backward_dq_128",
            "flash_backward_dkdv_64",
            "flash_backward_dkdv_128",
        ],
    ),
];

/// Threads per block of the element-wise and row-wise kernels.
pub(super) const BLOCK: u32 = 256;
/// Warps (query or key rows) per attention block; must match ATT_WARPS in attention.cu.
pub(super) const ATT_WARPS: usize = 8;

pub(super) struct Kernels {
    functions: HashMap<&'static str, CudaFunction>,
}

impl Kernels {
    pub(super) fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        if !crate::kernels::PTX_UNAVAILABLE.is_empty() {
            bail!(
                "this binary was built without the CUDA kernels ({}); rebuild with nvcc available \
                 (scripts/install_nvcc.sh, REQUIRE_NVCC=1 cargo build --release)",
                crate::kernels::PTX_UNAVAILABLE
            );
        }
        let mut functions = HashMap::new();
        for (module_name, names) in KERNELS {
            let ptx = crate::kernels::ptx(module_name)
                .ok_or_else(|| anyhow!("kernel module {module_name} is not embedded in this binary"))?;
            let module = ctx
                .load_module(Ptx::from_src(ptx))
                .with_context(|| format!("loading the PTX of kernels/{module_name}.cu"))?;
            for name in names.iter() {
                let f = module
                    .load_function(name)
                    .with_context(|| format!("kernel {name} in kernels/{module_name}.cu"))?;
                functions.insert(*name, f);
            }
        }
        Ok(Kernels { functions })
    }

    pub(super) fn get(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| anyhow!("kernel {name} was not loaded"))
    }
}

/// A grid-stride launch over `total` elements (`total` > 0).
pub(super) fn grid_stride(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(BLOCK as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// One block of `BLOCK` threads per row.
pub(super) fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Converts a size to the `int` the kernels take, refusing what does not fit.
pub(super) fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow!("{what} = {v} does not fit the kernels' 32-bit int"))
}
