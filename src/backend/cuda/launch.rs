//! Loading the embedded PTX modules, and one typed launcher per kernel.
//!
//! build.rs reads every `extern "C" __global__` signature in kernels/*.cu and generates a
//! launcher for it here: `const T*` takes an [`In<T>`], `T*` an [`Out<T>`] (a `CudaSlice<T>`,
//! a view of one, or a raw [`DevPtr<T>`]), `__nv_bfloat16` is `half::bf16`, `int` `i32`,
//! `size_t` `usize`, `uint64_t` `u64`, `float` `f32`. So a launch with a wrong count, order or
//! type of arguments does not compile:
//!
//! ```no_run
//! use cudarc::driver::{CudaSlice, CudaStream, DriverError, LaunchConfig};
//! use half::bf16;
//! use sft::backend::cuda::launch::{self, Kernels};
//!
//! fn norm(
//!     stream: &CudaStream, kernels: &Kernels, cfg: LaunchConfig, out: &mut CudaSlice<bf16>,
//!     rstd: &mut CudaSlice<f32>, x: &CudaSlice<bf16>, w: &CudaSlice<bf16>,
//! ) -> Result<(), DriverError> {
//!     // SAFETY: (an example; never run)
//!     unsafe { launch::rmsnorm_forward(stream, kernels, cfg, out, rstd, x, w, 4, 64, 1e-5) }
//! }
//! ```
//!
//! The same call with `out` and `rstd` swapped (a bf16 buffer where the kernel writes f32):
//!
//! ```compile_fail,E0277
//! # use cudarc::driver::{CudaSlice, CudaStream, DriverError, LaunchConfig};
//! # use half::bf16;
//! # use sft::backend::cuda::launch::{self, Kernels};
//! # fn norm(
//! #     stream: &CudaStream, kernels: &Kernels, cfg: LaunchConfig, out: &mut CudaSlice<bf16>,
//! #     rstd: &mut CudaSlice<f32>, x: &CudaSlice<bf16>, w: &CudaSlice<bf16>,
//! # ) -> Result<(), DriverError> {
//! unsafe { launch::rmsnorm_forward(stream, kernels, cfg, rstd, out, x, w, 4, 64, 1e-5) }
//! # }
//! ```
//!
//! A read-only buffer where the kernel writes (`x` for `out`):
//!
//! ```compile_fail,E0308
//! # use cudarc::driver::{CudaSlice, CudaStream, DriverError, LaunchConfig};
//! # use half::bf16;
//! # use sft::backend::cuda::launch::{self, Kernels};
//! # fn norm(
//! #     stream: &CudaStream, kernels: &Kernels, cfg: LaunchConfig, out: &mut CudaSlice<bf16>,
//! #     rstd: &mut CudaSlice<f32>, x: &CudaSlice<bf16>, w: &CudaSlice<bf16>,
//! # ) -> Result<(), DriverError> {
//! unsafe { launch::rmsnorm_forward(stream, kernels, cfg, x, rstd, x, w, 4, 64, 1e-5) }
//! # }
//! ```
//!
//! A missing argument (`eps`):
//!
//! ```compile_fail,E0061
//! # use cudarc::driver::{CudaSlice, CudaStream, DriverError, LaunchConfig};
//! # use half::bf16;
//! # use sft::backend::cuda::launch::{self, Kernels};
//! # fn norm(
//! #     stream: &CudaStream, kernels: &Kernels, cfg: LaunchConfig, out: &mut CudaSlice<bf16>,
//! #     rstd: &mut CudaSlice<f32>, x: &CudaSlice<bf16>, w: &CudaSlice<bf16>,
//! # ) -> Result<(), DriverError> {
//! unsafe { launch::rmsnorm_forward(stream, kernels, cfg, out, rstd, x, w, 4, 64) }
//! # }
//! ```
//!
//! A size where the kernel takes an `int` (`n: usize`):
//!
//! ```compile_fail,E0308
//! # use cudarc::driver::{CudaSlice, CudaStream, DriverError, LaunchConfig};
//! # use half::bf16;
//! # use sft::backend::cuda::launch::{self, Kernels};
//! # fn norm(
//! #     stream: &CudaStream, kernels: &Kernels, cfg: LaunchConfig, out: &mut CudaSlice<bf16>,
//! #     rstd: &mut CudaSlice<f32>, x: &CudaSlice<bf16>, w: &CudaSlice<bf16>,
//! # ) -> Result<(), DriverError> {
//! let n: usize = 4;
//! unsafe { launch::rmsnorm_forward(stream, kernels, cfg, out, rstd, x, w, n, 64, 1e-5) }
//! # }
//! ```

use std::marker::PhantomData;
use std::sync::Arc;

use super::timing::KernelTimer;
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DriverError, LaunchArgs,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

/// Launches the variant of a kernel family for `head_dim` (`attention_forward_32`/`_64`/`_128`,
/// ...), whose signatures are the same; a head_dim without a listed variant is an error.
macro_rules! launch_for_head_dim {
    ($head_dim:expr, [$($hd:literal => $k:path),+ $(,)?], $args:tt) => {
        match $head_dim {
            $($hd => $k $args.map_err(anyhow::Error::from),)+
            hd => Err(anyhow::anyhow!("no kernel of {:?} for head_dim {hd}", [$(stringify!($k)),+])),
        }
    };
}
pub(super) use launch_for_head_dim;

/// Threads per block of the element-wise and row-wise kernels.
pub const BLOCK: u32 = 256;
/// Warps (query or key rows) per attention block; must match ATT_WARPS in attention.cu.
pub(super) const ATT_WARPS: usize = 8;

/// Every kernel of every module ([`crate::kernels::KERNELS`], read from kernels/*.cu by build.rs),
/// loaded when the backend opens: a module that does not load is an error at start-up.
pub struct Kernels {
    /// In the order of `KERNELS`, which the generated launchers index; `None` for the kernels of
    /// an sm_90a module on a device that is not compute capability 9.0.
    functions: Vec<Option<CudaFunction>>,
    names: Vec<&'static str>,
    /// Per-kernel timing (`sft bench --kernel-times`); off unless asked for.
    pub(super) timer: KernelTimer,
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
        let (mut functions, mut names) = (Vec::new(), Vec::new());
        let hopper = ctx.compute_capability().context("querying the compute capability")? == (9, 0);
        for (module_name, kernel_names) in crate::kernels::KERNELS {
            // sm_90a PTX runs on compute capability 9.0 only (H100, H200, GH200).
            if module_name.ends_with("_sm90a") && !hopper {
                functions.extend(kernel_names.iter().map(|_| None));
                names.extend(kernel_names.iter().copied());
                continue;
            }
            let ptx = crate::kernels::ptx(module_name)
                .ok_or_else(|| anyhow!("kernel module {module_name} is not embedded in this binary"))?;
            let module = match ctx.load_module(Ptx::from_src(ptx)) {
                Ok(m) => m,
                // The sm_90a kernels are opt-in: without them the defaults still run.
                Err(e) if module_name.ends_with("_sm90a") => {
                    crate::say!("warning: the {module_name} kernels did not load ({e}); SFT_FLASH_MMA=wgmma is unavailable");
                    functions.extend(kernel_names.iter().map(|_| None));
                    names.extend(kernel_names.iter().copied());
                    continue;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("loading the PTX of kernels/{module_name}.cu"))
                }
            };
            for name in kernel_names.iter() {
                let f = module
                    .load_function(name)
                    .with_context(|| format!("kernel {name} in kernels/{module_name}.cu"))?;
                functions.push(Some(f));
                names.push(*name);
            }
        }
        Ok(Kernels { functions, names, timer: KernelTimer::default() })
    }

    /// Whether kernel `name` is loaded (an sm_90a one may not be).
    pub(super) fn has(&self, name: &str) -> bool {
        self.names.iter().position(|n| *n == name).is_some_and(|i| self.functions[i].is_some())
    }

    /// A kernel by name, for its attributes (launches go through the typed launchers below).
    pub(super) fn get(&self, name: &str) -> Result<&CudaFunction> {
        let i = self
            .names
            .iter()
            .position(|n| *n == name)
            .ok_or_else(|| anyhow!("kernel {name} was not loaded"))?;
        self.functions[i].as_ref().ok_or_else(|| anyhow!("kernel {name} needs compute capability 9.0"))
    }

    /// The kernel at `index` of `KERNELS`, which the generated launchers pass; an sm_90a kernel
    /// on another device is CUDA_ERROR_NO_BINARY_FOR_GPU.
    fn function(&self, index: usize) -> Result<&CudaFunction, DriverError> {
        self.functions[index]
            .as_ref()
            .ok_or(DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU))
    }
}

/// A grid-stride launch over `total` elements (`total` > 0).
pub fn grid_stride(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(BLOCK as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// One block of `BLOCK` threads per row.
pub fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Converts a size to the `int` the kernels take, refusing what does not fit.
pub(super) fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow!("{what} = {v} does not fit the kernels' 32-bit int"))
}

/// A device buffer of `T` that a kernel reads (`const T*`).
pub trait In<T> {
    /// Appends the buffer's device address to the launch.
    fn push<'a>(&'a self, args: &mut LaunchArgs<'a>);
}

/// A device buffer of `T` that a kernel writes (`T*`).
pub trait Out<T> {
    /// Appends the buffer's device address to the launch.
    fn push<'a>(&'a mut self, args: &mut LaunchArgs<'a>);
}

impl<T> In<T> for CudaSlice<T> {
    fn push<'a>(&'a self, args: &mut LaunchArgs<'a>) {
        args.arg(self);
    }
}
impl<T> In<T> for CudaView<'_, T> {
    fn push<'a>(&'a self, args: &mut LaunchArgs<'a>) {
        args.arg(self);
    }
}
impl<T> Out<T> for CudaSlice<T> {
    fn push<'a>(&'a mut self, args: &mut LaunchArgs<'a>) {
        args.arg(self);
    }
}
impl<T> Out<T> for CudaViewMut<'_, T> {
    fn push<'a>(&'a mut self, args: &mut LaunchArgs<'a>) {
        args.arg(self);
    }
}

/// The null pointer that an optional output passes when absent.
static NULL_DEVICE_PTR: u64 = 0;

/// An optional output: `None` passes a null pointer (the kernel must check for it).
impl<T, B: Out<T>> Out<T> for Option<&mut B> {
    fn push<'a>(&'a mut self, args: &mut LaunchArgs<'a>) {
        match self {
            Some(b) => b.push(args),
            None => {
                args.arg(&NULL_DEVICE_PTR);
            }
        }
    }
}

/// An optional input: `None` passes a null pointer (the kernel must not read it then).
impl<T, B: In<T>> In<T> for Option<&B> {
    fn push<'a>(&'a self, args: &mut LaunchArgs<'a>) {
        match self {
            Some(b) => b.push(args),
            None => {
                args.arg(&NULL_DEVICE_PTR);
            }
        }
    }
}

/// A raw device address of `T` elements (cuBLASLt operands, which the backend holds as
/// addresses); the element type still has to match the kernel's.
pub struct DevPtr<T> {
    address: u64,
    element: PhantomData<T>,
}

impl<T> DevPtr<T> {
    pub fn new(address: u64) -> Self {
        DevPtr { address, element: PhantomData }
    }
}
impl<T> In<T> for DevPtr<T> {
    fn push<'a>(&'a self, args: &mut LaunchArgs<'a>) {
        args.arg(&self.address);
    }
}
impl<T> Out<T> for DevPtr<T> {
    fn push<'a>(&'a mut self, args: &mut LaunchArgs<'a>) {
        args.arg(&self.address);
    }
}

include!(concat!(env!("OUT_DIR"), "/launchers.rs"));
