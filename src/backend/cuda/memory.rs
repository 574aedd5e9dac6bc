//! Allocation, host transfers, zeroing and copies.

use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DeviceRepr};
use half::bf16;

use super::{CudaBackend, CudaBuf};
use crate::backend::Precision;

impl CudaBackend {
    /// The raw device address of a buffer, for cuBLASLt and descriptor arrays. With event
    /// tracking off (see `new`), dropping the guard records nothing.
    pub(super) fn dev_ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _guard) = s.device_ptr(&self.stream);
        p
    }

    /// Copies device data to the host. cudarc's copy into a `Vec` is an async copy from
    /// pageable memory, which CUDA only documents as "might be synchronous", so the stream is
    /// synchronized explicitly before the data is used.
    /// Every blocking read-back goes through here, and is counted (`host_reads`).
    pub(super) fn download<T: DeviceRepr>(&self, src: &CudaView<'_, T>) -> Result<Vec<T>> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let host = self.stream.clone_dtoh(src)?;
        self.stream.synchronize()?;
        Ok(host)
    }

    pub(super) fn zeros(&self, len: usize, precision: Precision) -> Result<CudaBuf> {
        // cudarc refuses zero-length allocations on some paths; one element costs nothing.
        let len = len.max(1);
        Ok(match precision {
            Precision::Compute | Precision::Bf16 => CudaBuf::Bf16(
                self.stream.alloc_zeros::<bf16>(len).with_context(|| format!("allocating {len} bf16"))?,
            ),
            Precision::F32 => CudaBuf::F32(
                self.stream.alloc_zeros::<f32>(len).with_context(|| format!("allocating {len} f32"))?,
            ),
        })
    }

    pub(super) fn zeros_ids(&self, len: usize) -> Result<CudaSlice<u32>> {
        self.stream.alloc_zeros::<u32>(len.max(1)).context("allocating an id buffer")
    }

    pub(super) fn write(&self, dst: &mut CudaBuf, src: &[f32]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        if src.len() > dst.len() {
            bail!("write: {} values into a buffer of {}", src.len(), dst.len());
        }
        match dst {
            CudaBuf::Bf16(s) => {
                let host: Vec<bf16> = src.iter().map(|&v| bf16::from_f32(v)).collect();
                self.stream.memcpy_htod(&host, &mut s.slice_mut(0..src.len()))?;
            }
            CudaBuf::F32(s) => self.stream.memcpy_htod(src, &mut s.slice_mut(0..src.len()))?,
        }
        Ok(())
    }

    pub(super) fn read(&self, src: &CudaBuf, len: usize) -> Result<Vec<f32>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        if len > src.len() {
            bail!("read: {len} values from a buffer of {}", src.len());
        }
        Ok(match src {
            CudaBuf::Bf16(s) => self.download(&s.slice(0..len))?.into_iter().map(|v| v.to_f32()).collect(),
            CudaBuf::F32(s) => self.download(&s.slice(0..len))?,
        })
    }

    pub(super) fn write_ids(&self, dst: &mut CudaSlice<u32>, src: &[u32]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        if src.len() > dst.len() {
            bail!("write_ids: {} ids into a buffer of {}", src.len(), dst.len());
        }
        // A tile table prepared from these ids would go stale.
        self.flash_forget_segments(dst);
        self.stream.memcpy_htod(src, &mut dst.slice_mut(0..src.len()))?;
        Ok(())
    }

    pub(super) fn zero(&self, buf: &mut CudaBuf, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if len > buf.len() {
            bail!("zero: {len} elements of a buffer of {}", buf.len());
        }
        match buf {
            CudaBuf::Bf16(s) => self.stream.memset_zeros(&mut s.slice_mut(0..len))?,
            CudaBuf::F32(s) => self.stream.memset_zeros(&mut s.slice_mut(0..len))?,
        }
        Ok(())
    }

    pub(super) fn copy(&self, dst: &mut CudaBuf, src: &CudaBuf, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if len > dst.len() || len > src.len() {
            bail!("copy: {len} elements between buffers of {} and {}", src.len(), dst.len());
        }
        match (dst, src) {
            (CudaBuf::Bf16(d), CudaBuf::Bf16(s)) => {
                self.stream.memcpy_dtod(&s.slice(0..len), &mut d.slice_mut(0..len))?
            }
            (CudaBuf::F32(d), CudaBuf::F32(s)) => {
                self.stream.memcpy_dtod(&s.slice(0..len), &mut d.slice_mut(0..len))?
            }
            (dst, src) => self.cast(dst, src, len)?,
        }
        Ok(())
    }
}
