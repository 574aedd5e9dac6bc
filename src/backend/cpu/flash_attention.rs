//! The host twin of kernels/flash_attention.cu's `flash_tile_table`. The tensor-core attention
//! kernels compute the same function as the scalar ones, so their numeric CPU twins are
//! `attention_forward` and `attention_backward` in attention.rs.

/// The host mirror of `flash_tile_table`: (first row, segment start, segment end) per tile, in
/// segment order. The kernels read the table back to front (longest causal rows first).
pub fn tile_table(cu_seqlens: &[u32], tile: usize) -> Vec<[u32; 3]> {
    let mut out = Vec::new();
    for w in cu_seqlens.windows(2) {
        let (start, end) = (w[0], w[1]);
        let mut q = start;
        while q < end {
            out.push([q, start, end]);
            q += tile as u32;
        }
    }
    out
}
