//! Per-kernel device time from CUDA events, for `sft bench --kernel-times` and the calibration of
//! `sft plan` where nsys cannot run. Off by default: then a launch costs one atomic load more.
//! On, every launch (our kernels by entry name, cuBLASLt as `cublasLt_gemm`) is bracketed by two
//! timing events; the events are read only when the times are taken, after the stream drains.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::Result;
use cudarc::driver::{sys, CudaEvent, CudaStream, DriverError};

use crate::backend::KernelTime;

#[derive(Default)]
pub struct KernelTimer {
    on: AtomicBool,
    pending: Mutex<Vec<(&'static str, CudaEvent, CudaEvent)>>,
}

impl KernelTimer {
    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    /// Before a launch: its start event, when timing.
    pub fn begin(&self, stream: &CudaStream) -> Result<Option<CudaEvent>, DriverError> {
        if !self.on.load(Ordering::Relaxed) {
            return Ok(None);
        }
        Ok(Some(stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?))
    }

    /// After the launch of `name` that `begin` returned `start` for.
    pub fn end(
        &self,
        stream: &CudaStream,
        name: &'static str,
        start: Option<CudaEvent>,
    ) -> Result<(), DriverError> {
        if let Some(start) = start {
            let end = stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).push((name, start, end));
        }
        Ok(())
    }

    /// The time of every launch since the last call, summed per kernel name (waits for each
    /// launch's end event).
    pub fn take(&self) -> Result<Vec<KernelTime>> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let mut per_name: BTreeMap<&'static str, (f64, u64)> = BTreeMap::new();
        for (name, start, end) in pending {
            let ms = start.elapsed_ms(&end)?;
            let e = per_name.entry(name).or_default();
            e.0 += ms as f64 * 1e6;
            e.1 += 1;
        }
        Ok(per_name
            .into_iter()
            .map(|(name, (ns, launches))| KernelTime { name: name.to_string(), ns, launches })
            .collect())
    }
}
