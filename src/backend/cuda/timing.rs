//! Per-kernel device time from CUDA events, for `sft bench --kernel-times` and the calibration of
//! `sft plan` where nsys cannot run. Off by default: then a launch costs one atomic load more.
//! On, every launch (our kernels by entry name, cuBLASLt GEMMs per shape, named by
//! `GemmCall::timing_label`) is bracketed by two timing events; the events are read only when the times are
//! taken, after the stream drains.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::Result;
use cudarc::driver::{sys, CudaEvent, CudaStream, DriverError};

use crate::backend::KernelTime;

/// One timed launch: its name, its FLOPs where known (0 otherwise), and its two events.
type Launch = (Cow<'static, str>, f64, CudaEvent, CudaEvent);

#[derive(Default)]
pub struct KernelTimer {
    on: AtomicBool,
    pending: Mutex<Vec<Launch>>,
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
        self.end_with(stream, start, || (Cow::Borrowed(name), 0.0))
    }

    /// As [`end`](Self::end), with the name and the FLOPs made only when timing (a GEMM's
    /// label is formatted per launch).
    pub fn end_with(
        &self,
        stream: &CudaStream,
        start: Option<CudaEvent>,
        what: impl FnOnce() -> (Cow<'static, str>, f64),
    ) -> Result<(), DriverError> {
        if let Some(start) = start {
            let end = stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            let (name, flops) = what();
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).push((name, flops, start, end));
        }
        Ok(())
    }

    /// The time of every launch since the last call, summed per kernel name (waits for each
    /// launch's end event).
    pub fn take(&self) -> Result<Vec<KernelTime>> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let mut per_name: BTreeMap<Cow<'static, str>, (f64, u64, f64)> = BTreeMap::new();
        for (name, flops, start, end) in pending {
            let ms = start.elapsed_ms(&end)?;
            let e = per_name.entry(name).or_default();
            e.0 += ms as f64 * 1e6;
            e.1 += 1;
            e.2 += flops;
        }
        Ok(per_name
            .into_iter()
            .map(|(name, (ns, launches, flops))| KernelTime { name: name.into_owned(), ns, launches, flops })
            .collect())
    }
}
