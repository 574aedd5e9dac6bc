//! Choosing the backend: `--device auto|cpu|cuda`.
//!
//! The model and trainer are generic over [`Backend`](super::Backend), so a command picks the
//! backend once at its top with [`with_backend!`](crate::with_backend) and runs a generic
//! function inside it.

use anyhow::{bail, Result};

/// Where a command runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The GPU when one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

impl Device {
    pub fn parse(name: &str) -> Result<Device> {
        match name {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => bail!("unknown device {other:?}: expected \"auto\", \"cpu\" or \"cuda\""),
        }
    }
}

/// The backend a device name resolves to, opened.
pub enum Opened {
    Cpu(super::cpu::CpuBackend<f32>),
    Cuda(Box<super::cuda::CudaBackend>),
}

/// Opens the backend for `device`. `Auto` takes GPU 0 when it opens (a driver, a GPU and the
/// embedded kernels) and says on stderr why it falls back to the CPU otherwise; `Cuda` fails
/// with that reason instead.
pub fn open(device: Device) -> Result<Opened> {
    match device {
        Device::Cpu => Ok(Opened::Cpu(super::cpu::CpuBackend::new())),
        Device::Cuda => Ok(Opened::Cuda(Box::new(super::cuda::CudaBackend::new(0)?))),
        Device::Auto => match super::cuda::CudaBackend::new(0) {
            Ok(b) => Ok(Opened::Cuda(Box::new(b))),
            Err(e) => {
                crate::say!("running on the CPU ({:#})", e);
                Ok(Opened::Cpu(super::cpu::CpuBackend::new()))
            }
        },
    }
}

/// `with_backend!(device, |backend| expr)`: opens the backend for `device` (a [`Device`]) and
/// evaluates `expr` with `backend` bound to it, once per backend type.
#[macro_export]
macro_rules! with_backend {
    ($device:expr, |$b:ident| $body:expr) => {
        match $crate::backend::device::open($device)? {
            $crate::backend::device::Opened::Cpu($b) => $body,
            $crate::backend::device::Opened::Cuda(cuda) => {
                let $b = *cuda;
                $body
            }
        }
    };
}

/// `(available, total)` bytes of host memory from `/proc/meminfo` (`MemAvailable`, `MemTotal`):
/// what the CPU backend can allocate before the kernel starts killing processes. None where the
/// file is absent or lacks the fields (not Linux).
pub fn host_memory() -> Option<(usize, usize)> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_meminfo(text: &str) -> Option<(usize, usize)> {
    let field = |name: &str| -> Option<usize> {
        let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(':'))?;
        let kib: usize = line[name.len() + 1..].trim().strip_suffix("kB")?.trim().parse().ok()?;
        kib.checked_mul(1024)
    };
    Some((field("MemAvailable")?, field("MemTotal")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_gives_available_and_total_bytes() {
        let text = "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   20480000 kB\n";
        assert_eq!(parse_meminfo(text), Some((20480000 * 1024, 24576000 * 1024)));
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
        if cfg!(target_os = "linux") {
            let (available, total) = host_memory().expect("/proc/meminfo");
            assert!(available > 0 && available <= total);
        }
    }
}
