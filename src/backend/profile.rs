//! NVTX ranges around the phases of a step (forward, backward, optimizer), so that an nsys
//! timeline groups the kernels under them. Without a profiler attached, a range costs a check
//! of NVTX's function table.

/// An open range, closed when dropped (also on an early `?` return).
#[must_use = "the range closes when this guard is dropped"]
pub struct Range(());

/// Opens a nested range named `name` on this thread.
pub fn range(name: &str) -> Range {
    nvtx::range_push!("{name}");
    Range(())
}

impl Drop for Range {
    fn drop(&mut self) {
        nvtx::range_pop!();
    }
}
