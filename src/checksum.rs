//! A fast 64-bit checksum of bytes, for the files sft writes and reads back: token shards (the
//! whole file) and checkpoints (each tensor's stored bytes). A file changed after it was written
//! (a disk or copy error, a tool that edited it) is then refused instead of silently used.
//!
//! Bytes are hashed in chunks of [`CHUNK`], in parallel, and the chunk hashes combined in order,
//! so the result depends on the bytes alone, not on how many threads computed it.

use rayon::prelude::*;

/// Bytes per independently hashed chunk.
pub const CHUNK: usize = 1 << 20;

const K1: u64 = 0x9E37_79B9_7F4A_7C15;
const K2: u64 = 0xC2B2_AE3D_27D4_EB4F;

/// MurmurHash3's 64-bit finalizer.
pub(crate) fn fmix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    x = x.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    x ^ (x >> 33)
}

/// Hash of one chunk, four independent lanes of 64-bit words (so the CPU overlaps the
/// multiplies). Every step is invertible, so any change confined to one word always changes the
/// result.
pub(crate) fn chunk_hash(bytes: &[u8]) -> u64 {
    let mut lanes = [K1, K2, K1 ^ K2, !K1];
    let mut blocks = bytes.chunks_exact(32);
    for block in &mut blocks {
        for (l, w) in lanes.iter_mut().zip(block.chunks_exact(8)) {
            let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            *l = (*l ^ w).wrapping_mul(K2).rotate_left(29);
        }
    }
    let mut tail = [0u8; 32];
    let rest = blocks.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    let mut h = (bytes.len() as u64).wrapping_mul(K1);
    for (l, w) in lanes.iter().zip(tail.chunks_exact(8)) {
        let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = fmix(h ^ fmix(*l ^ w.wrapping_mul(K1)));
    }
    h
}

/// Folds the next chunk's hash into the running hash `h`.
pub(crate) fn fold(h: u64, chunk: u64) -> u64 {
    fmix(h.rotate_left(17) ^ chunk).wrapping_mul(K1)
}

/// The checksum of `bytes`.
pub fn of_bytes(bytes: &[u8]) -> u64 {
    let chunks: Vec<u64> = bytes.par_chunks(CHUNK).map(chunk_hash).collect();
    chunks.into_iter().fold(fmix((bytes.len() as u64).wrapping_mul(K2)), fold)
}

/// The checksum of the bytes `encode` writes for `values` (`width` bytes per value), without
/// holding all of them at once: each chunk is encoded, hashed and dropped in turn.
pub fn of_encoded<T: Sync>(values: &[T], width: usize, encode: impl Fn(&[T], &mut Vec<u8>) + Sync) -> u64 {
    assert!(width > 0 && CHUNK.is_multiple_of(width), "a value's bytes must not straddle two chunks");
    let chunks: Vec<u64> = values
        .par_chunks(CHUNK / width)
        .map(|part| {
            let mut bytes = Vec::with_capacity(part.len() * width);
            encode(part, &mut bytes);
            debug_assert_eq!(bytes.len(), part.len() * width);
            chunk_hash(&bytes)
        })
        .collect();
    chunks.into_iter().fold(fmix(((values.len() * width) as u64).wrapping_mul(K2)), fold)
}

/// A checksum as it is written in a file: 16 lowercase hex digits.
pub fn to_hex(sum: u64) -> String {
    format!("{sum:016x}")
}

/// A checksum written by [`to_hex`], or `None` for anything else.
pub fn from_hex(text: &str) -> Option<u64> {
    (text.len() == 16 && text.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u64::from_str_radix(text, 16).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_values_hash_as_their_bytes() {
        let values: Vec<u32> = (0..(CHUNK as u32 / 2 + 77)).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let encoded = of_encoded(&values, 4, |vs, out| out.extend(vs.iter().flat_map(|v| v.to_le_bytes())));
        assert_eq!(of_bytes(&bytes), encoded);
    }

    #[test]
    fn any_one_changed_byte_changes_the_checksum() {
        let bytes: Vec<u8> = (0..CHUNK + 1000).map(|i| (i * 31 % 251) as u8).collect();
        let sum = of_bytes(&bytes);
        for at in [0, 7, 31, 32, CHUNK - 1, CHUNK, CHUNK + 999] {
            for bit in [0, 3, 7] {
                let mut changed = bytes.clone();
                changed[at] ^= 1 << bit;
                assert_ne!(of_bytes(&changed), sum, "byte {at} bit {bit}");
            }
        }
        // A byte cut or a zero byte added changes it too.
        assert_ne!(of_bytes(&bytes[..bytes.len() - 1]), sum);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_ne!(of_bytes(&longer), sum);
    }

    #[test]
    fn hex_round_trips_and_refuses_other_text() {
        for sum in [0, 1, u64::MAX, 0x0123_4567_89ab_cdef] {
            assert_eq!(from_hex(&to_hex(sum)), Some(sum));
        }
        for bad in ["", "0", "0123456789abcdeg", "+123456789abcdef", "0123456789abcdef0"] {
            assert_eq!(from_hex(bad), None, "{bad}");
        }
    }
}
