//! Memory-mapped token shards.
//!
//! Layout (little-endian), all arrays aligned to their element size:
//!
//! ```text
//! 0   magic "SFTSHARD" (8 bytes)
//! 8   version u32, header_len u32 (64)
//! 16  tokenizer fingerprint u64
//! 24  n_examples u64, 32 n_tokens u64, 40 n_spans u64
//! 48  pad_id u32, flags u32 (0), 56 reserved u64 (0)
//! 64  tokens: n_tokens u32, plus one u32 of padding when n_tokens is odd
//!     token offsets: n_examples + 1 u64 (example i = tokens[off[i]..off[i+1]])
//!     span offsets:  n_examples + 1 u64 (example i's spans = spans[soff[i]..soff[i+1]])
//!     spans: n_spans × [start u32, end u32], supervised token ranges relative to the example
//! ```
//!
//! A shard is written to `<name>.tmp` and renamed when complete, so a reader never sees a
//! partial shard; opening checks magic, version, the exact file size and every offset, so a
//! truncated or foreign file is an error naming it.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use super::example::Example;

#[cfg(not(target_endian = "little"))]
compile_error!("token shards are read in place and assume a little-endian machine");

pub const MAGIC: [u8; 8] = *b"SFTSHARD";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;

/// The counts and identity of a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    pub fingerprint: u64,
    pub n_examples: u64,
    pub n_tokens: u64,
    pub n_spans: u64,
    pub pad_id: u32,
}

impl ShardHeader {
    fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.fingerprint.to_le_bytes());
        b[24..32].copy_from_slice(&self.n_examples.to_le_bytes());
        b[32..40].copy_from_slice(&self.n_tokens.to_le_bytes());
        b[40..48].copy_from_slice(&self.n_spans.to_le_bytes());
        b[48..52].copy_from_slice(&self.pad_id.to_le_bytes());
        b
    }

    /// Byte size of the whole file this header describes.
    fn file_len(&self) -> Option<u64> {
        let tokens = self.n_tokens.checked_add(self.n_tokens % 2)?.checked_mul(4)?;
        let offsets = self.n_examples.checked_add(1)?.checked_mul(16)?;
        let spans = self.n_spans.checked_mul(8)?;
        (HEADER_LEN as u64).checked_add(tokens)?.checked_add(offsets)?.checked_add(spans)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Writes one shard; examples are appended, the file appears under its name on [`finish`](Self::finish).
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    header: ShardHeader,
    offsets: Vec<u64>,
    span_offsets: Vec<u64>,
    spans: Vec<[u32; 2]>,
}

impl ShardWriter {
    pub fn create(path: &Path, fingerprint: u64, pad_id: u32) -> Result<Self> {
        let tmp = path.with_extension("bin.tmp");
        let file = File::create(&tmp).with_context(|| format!("{}: cannot create shard", tmp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; HEADER_LEN]).with_context(|| format!("{}: write failed", tmp.display()))?;
        Ok(ShardWriter {
            path: path.to_path_buf(),
            tmp,
            out,
            header: ShardHeader { fingerprint, n_examples: 0, n_tokens: 0, n_spans: 0, pad_id },
            offsets: vec![0],
            span_offsets: vec![0],
            spans: Vec::new(),
        })
    }

    pub fn n_examples(&self) -> u64 {
        self.header.n_examples
    }

    pub fn n_tokens(&self) -> u64 {
        self.header.n_tokens
    }

    /// Appends an example given by its tokens and supervised spans (relative to the example).
    pub fn push(&mut self, tokens: &[u32], spans: &[[u32; 2]]) -> Result<()> {
        let mut buf = Vec::with_capacity(tokens.len() * 4);
        for t in tokens {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        self.out.write_all(&buf).with_context(|| format!("{}: write failed", self.tmp.display()))?;
        self.header.n_tokens += tokens.len() as u64;
        self.header.n_examples += 1;
        self.offsets.push(self.header.n_tokens);
        self.spans.extend_from_slice(spans);
        self.span_offsets.push(self.spans.len() as u64);
        Ok(())
    }

    pub fn push_example(&mut self, ex: &Example) -> Result<()> {
        self.push(&ex.tokens, &ex.spans())
    }

    /// Writes the offsets, spans and header, syncs, and renames the file into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        let ctx = |p: &Path| format!("{}: write failed", p.display());
        self.header.n_spans = self.spans.len() as u64;
        let mut tail = Vec::new();
        if self.header.n_tokens % 2 == 1 {
            tail.extend_from_slice(&[0u8; 4]);
        }
        for o in self.offsets.iter().chain(&self.span_offsets) {
            tail.extend_from_slice(&o.to_le_bytes());
        }
        for [a, b] in &self.spans {
            tail.extend_from_slice(&a.to_le_bytes());
            tail.extend_from_slice(&b.to_le_bytes());
        }
        self.out.write_all(&tail).with_context(|| ctx(&self.tmp))?;
        self.out.seek(SeekFrom::Start(0)).with_context(|| ctx(&self.tmp))?;
        self.out.write_all(&self.header.to_bytes()).with_context(|| ctx(&self.tmp))?;
        let file = self.out.into_inner().map_err(|e| e.into_error()).with_context(|| ctx(&self.tmp))?;
        file.sync_all().with_context(|| ctx(&self.tmp))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).with_context(|| ctx(&self.path))?;
        Ok(self.path)
    }
}

/// One example of a shard, borrowed from the memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExampleRef<'a> {
    pub tokens: &'a [u32],
    /// Supervised token ranges `[start, end)`: `tokens[start..end]` are targets.
    pub spans: &'a [[u32; 2]],
}

impl ExampleRef<'_> {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn n_supervised(&self) -> usize {
        self.spans.iter().map(|[a, b]| (b - a) as usize).sum()
    }

    pub fn to_example(&self) -> Example {
        Example::from_spans(self.tokens.to_vec(), self.spans)
    }
}

/// A validated, memory-mapped shard.
pub struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
    header: ShardHeader,
    /// Byte positions of the arrays inside the map.
    offsets_at: usize,
    span_offsets_at: usize,
    spans_at: usize,
}

impl Shard {
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display();
        let file = File::open(path).with_context(|| format!("{name}: cannot open shard"))?;
        // SAFETY: shards are written once (temp file + rename) and never modified in place.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("{name}: cannot map shard"))?;
        let b: &[u8] = &map;
        ensure!(b.len() >= HEADER_LEN && b[0..8] == MAGIC, "{name}: not an sft token shard (bad magic)");
        let version = u32_at(b, 8);
        ensure!(version == VERSION, "{name}: shard version {version}, this build reads version {VERSION}");
        ensure!(u32_at(b, 12) as usize == HEADER_LEN, "{name}: corrupt shard header");
        let header = ShardHeader {
            fingerprint: u64_at(b, 16),
            n_examples: u64_at(b, 24),
            n_tokens: u64_at(b, 32),
            n_spans: u64_at(b, 40),
            pad_id: u32_at(b, 48),
        };
        match header.file_len() {
            Some(n) if n == b.len() as u64 => {}
            Some(n) => {
                bail!("{name}: shard is {} bytes, its header describes {n} (truncated or corrupt)", b.len())
            }
            None => bail!("{name}: corrupt shard header (impossible counts)"),
        }
        let offsets_at = HEADER_LEN + 4 * (header.n_tokens + header.n_tokens % 2) as usize;
        let span_offsets_at = offsets_at + 8 * (header.n_examples as usize + 1);
        let spans_at = span_offsets_at + 8 * (header.n_examples as usize + 1);
        let shard = Shard { path: path.to_path_buf(), map, header, offsets_at, span_offsets_at, spans_at };
        shard.validate()?;
        Ok(shard)
    }

    /// Checks every offset and span, so that `example` can never index out of bounds.
    fn validate(&self) -> Result<()> {
        let name = self.path.display();
        let (offs, soffs) = (self.offsets(), self.span_offsets());
        ensure!(offs[0] == 0 && soffs[0] == 0, "{name}: corrupt offsets");
        ensure!(
            offs[offs.len() - 1] == self.header.n_tokens && soffs[soffs.len() - 1] == self.header.n_spans,
            "{name}: corrupt offsets (totals disagree with the header)"
        );
        let spans = self.spans();
        for i in 0..self.header.n_examples as usize {
            ensure!(
                offs[i] <= offs[i + 1] && soffs[i] <= soffs[i + 1],
                "{name}: corrupt offsets at example {i}"
            );
            let len = offs[i + 1] - offs[i];
            let mut prev_end = 0u64;
            for &[a, b] in &spans[soffs[i] as usize..soffs[i + 1] as usize] {
                ensure!(
                    (a as u64) >= prev_end && a < b && (b as u64) <= len,
                    "{name}: corrupt supervised span [{a}, {b}) in example {i} of {len} tokens"
                );
                prev_end = b as u64;
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &ShardHeader {
        &self.header
    }

    pub fn len(&self) -> usize {
        self.header.n_examples as usize
    }

    pub fn is_empty(&self) -> bool {
        self.header.n_examples == 0
    }

    fn cast<T>(&self, at: usize, n: usize) -> &[T] {
        let bytes = &self.map[at..at + n * std::mem::size_of::<T>()];
        // SAFETY: u32/u64/[u32; 2] accept any bit pattern; the map is page-aligned and every array
        // starts at a multiple of its element size (checked), so the prefix is empty.
        let (pre, mid, _) = unsafe { bytes.align_to::<T>() };
        assert!(pre.is_empty() && mid.len() == n, "shard arrays are aligned by construction");
        mid
    }

    fn tokens(&self) -> &[u32] {
        self.cast(HEADER_LEN, self.header.n_tokens as usize)
    }

    fn offsets(&self) -> &[u64] {
        self.cast(self.offsets_at, self.header.n_examples as usize + 1)
    }

    fn span_offsets(&self) -> &[u64] {
        self.cast(self.span_offsets_at, self.header.n_examples as usize + 1)
    }

    fn spans(&self) -> &[[u32; 2]] {
        self.cast(self.spans_at, self.header.n_spans as usize)
    }

    /// Example `i` (panics when `i >= len()`, like slice indexing).
    pub fn example(&self, i: usize) -> ExampleRef<'_> {
        let (offs, soffs) = (self.offsets(), self.span_offsets());
        ExampleRef {
            tokens: &self.tokens()[offs[i] as usize..offs[i + 1] as usize],
            spans: &self.spans()[soffs[i] as usize..soffs[i + 1] as usize],
        }
    }

    /// Length in tokens of example `i`.
    pub fn example_len(&self, i: usize) -> usize {
        let offs = self.offsets();
        (offs[i + 1] - offs[i]) as usize
    }
}
