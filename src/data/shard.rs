//! Memory-mapped token shards.
//!
//! Layout (little-endian), all arrays aligned to their element size:
//!
//! ```text
//! 0   magic "SFTSHARD" (8 bytes)
//! 8   version u32 (2), header_len u32 (96)
//! 16  tokenizer fingerprint u64
//! 24  n_examples u64, 32 n_tokens u64, 40 n_spans u64
//! 48  pad_id u32, vocab_size u32 (0: not recorded)
//! 56  set_id u64 (the `sft prepare` run that wrote the shard; 0: none)
//! 64  checksum u64 (of the whole file, this field read as 0)
//! 72  reserved, 24 bytes of 0
//! 96  tokens: n_tokens u32, plus one u32 of padding when n_tokens is odd
//!     token offsets: n_examples + 1 u64 (example i = tokens[off[i]..off[i+1]])
//!     span offsets:  n_examples + 1 u64 (example i's spans = spans[soff[i]..soff[i+1]])
//!     spans: n_spans × [start u32, end u32], supervised token ranges relative to the example
//! ```
//!
//! A shard is written to `<name>.tmp` and renamed when complete, so a reader never sees a
//! partial shard. Opening checks every header field, every offset and span, the checksum and
//! that every id is inside the recorded vocabulary, so that no later access can index out of
//! bounds and a truncated, corrupt or foreign file is an error naming it and the field.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;

use super::example::Example;
use crate::checksum::{chunk_hash, fmix, fold, CHUNK as CHECKSUM_CHUNK};

#[cfg(not(target_endian = "little"))]
compile_error!("token shards are read in place and assume a little-endian machine");

pub const MAGIC: [u8; 8] = *b"SFTSHARD";
pub const VERSION: u32 = 2;
pub const HEADER_LEN: usize = 96;
/// Byte position of the checksum field.
const CHECKSUM_AT: usize = 64;
const RESERVED: std::ops::Range<usize> = 72..HEADER_LEN;

/// The counts and identity of a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ShardHeader {
    pub fingerprint: u64,
    pub n_examples: u64,
    pub n_tokens: u64,
    pub n_spans: u64,
    pub pad_id: u32,
    /// Ids must be below this; 0 when the writer did not record it.
    pub vocab_size: u32,
    /// The `sft prepare` run that wrote the shard (0: none): the shards of a prepared directory
    /// share it, so that a mix of two runs is refused.
    pub set_id: u64,
    pub checksum: u64,
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
        b[52..56].copy_from_slice(&self.vocab_size.to_le_bytes());
        b[56..64].copy_from_slice(&self.set_id.to_le_bytes());
        b[64..72].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }

    /// Parses and checks the fixed fields of a header (`b` holds at least its first bytes).
    pub fn parse(b: &[u8], name: &str) -> Result<Self> {
        ensure!(b.len() >= 16 && b[0..8] == MAGIC, "{name}: not an sft token shard (bad magic)");
        let version = u32_at(b, 8);
        if version == 1 {
            bail!(
                "{name}: shard format version 1 (without a checksum); this build reads version {VERSION}: \
                 re-run `sft prepare` to rewrite the data"
            );
        }
        ensure!(version == VERSION, "{name}: shard version {version}, this build reads version {VERSION}");
        ensure!(
            b.len() >= HEADER_LEN,
            "{name}: shard is {} bytes, shorter than its header (truncated)",
            b.len()
        );
        let header_len = u32_at(b, 12);
        ensure!(
            header_len as usize == HEADER_LEN,
            "{name}: corrupt shard header: field header_len = {header_len}, expected {HEADER_LEN}"
        );
        ensure!(
            b[RESERVED].iter().all(|&x| x == 0),
            "{name}: corrupt shard header: reserved bytes {}..{} are not zero",
            RESERVED.start,
            RESERVED.end
        );
        let h = ShardHeader {
            fingerprint: u64_at(b, 16),
            n_examples: u64_at(b, 24),
            n_tokens: u64_at(b, 32),
            n_spans: u64_at(b, 40),
            pad_id: u32_at(b, 48),
            vocab_size: u32_at(b, 52),
            set_id: u64_at(b, 56),
            checksum: u64_at(b, CHECKSUM_AT),
        };
        ensure!(
            h.vocab_size == 0 || h.pad_id < h.vocab_size,
            "{name}: corrupt shard header: field pad_id = {} is not below field vocab_size = {}",
            h.pad_id,
            h.vocab_size
        );
        Ok(h)
    }

    /// Byte size of the whole file this header describes.
    fn file_len(&self) -> Option<u64> {
        let tokens = self.n_tokens.checked_add(self.n_tokens % 2)?.checked_mul(4)?;
        let offsets = self.n_examples.checked_add(1)?.checked_mul(16)?;
        let spans = self.n_spans.checked_mul(8)?;
        (HEADER_LEN as u64).checked_add(tokens)?.checked_add(offsets)?.checked_add(spans)
    }
}

/// Reads and checks only the header of a shard (cheap: the other split of a directory is
/// compared by its headers).
pub fn read_header(path: &Path) -> Result<ShardHeader> {
    use std::io::Read;
    let name = path.display().to_string();
    let mut b = Vec::with_capacity(HEADER_LEN);
    File::open(path)
        .and_then(|f| f.take(HEADER_LEN as u64).read_to_end(&mut b))
        .with_context(|| format!("{name}: cannot read shard"))?;
    ShardHeader::parse(&b, &name)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// One pass over a shard's bytes: its checksum (the checksum field read as 0) and the largest
/// token id, chunks hashed in parallel. `tokens` is the byte range of the token array.
fn scan(bytes: &[u8], tokens: std::ops::Range<usize>) -> (u64, Option<u32>) {
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&bytes[..HEADER_LEN]);
    header[CHECKSUM_AT..CHECKSUM_AT + 8].fill(0);
    let body = &bytes[HEADER_LEN..];
    let parts: Vec<(u64, Option<u32>)> = body
        .par_chunks(CHECKSUM_CHUNK)
        .enumerate()
        .map(|(k, chunk)| {
            let at = HEADER_LEN + k * CHECKSUM_CHUNK;
            let (lo, hi) = (tokens.start.max(at), tokens.end.min(at + chunk.len()));
            let max = (lo < hi).then(|| {
                chunk[lo - at..hi - at]
                    .chunks_exact(4)
                    .map(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")))
                    .max()
                    .unwrap_or(0)
            });
            (chunk_hash(chunk), max)
        })
        .collect();
    let mut h = fmix(chunk_hash(&header) ^ (bytes.len() as u64));
    let mut max = None;
    for (c, m) in parts {
        h = fold(h, c);
        max = max.max(m);
    }
    (h, max)
}

/// The checksum of a whole shard file (the checksum field read as 0).
pub fn checksum(bytes: &[u8]) -> u64 {
    assert!(bytes.len() >= HEADER_LEN, "a shard holds at least its header");
    scan(bytes, HEADER_LEN..HEADER_LEN).0
}

/// Stores the checksum of `bytes` in its header: for tools and tests that edit a shard on
/// purpose (the fuzz tests reach the structural checks behind the checksum this way).
pub fn seal(bytes: &mut [u8]) {
    let c = checksum(bytes);
    bytes[CHECKSUM_AT..CHECKSUM_AT + 8].copy_from_slice(&c.to_le_bytes());
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
        // Readable too: `finish` maps it to compute the checksum.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .with_context(|| format!("{}: cannot create shard", tmp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; HEADER_LEN]).with_context(|| format!("{}: write failed", tmp.display()))?;
        Ok(ShardWriter {
            path: path.to_path_buf(),
            tmp,
            out,
            header: ShardHeader { fingerprint, pad_id, ..Default::default() },
            offsets: vec![0],
            span_offsets: vec![0],
            spans: Vec::new(),
        })
    }

    /// Records the tokenizer's vocabulary size: opening then checks every id against it.
    pub fn with_vocab_size(mut self, vocab_size: u32) -> Self {
        self.header.vocab_size = vocab_size;
        self
    }

    /// Marks the shard as part of one `sft prepare` run.
    pub fn with_set_id(mut self, set_id: u64) -> Self {
        self.header.set_id = set_id;
        self
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

    /// Writes the offsets, spans, header and checksum, syncs, and renames the file into place.
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
        let mut file = self.out.into_inner().map_err(|e| e.into_error()).with_context(|| ctx(&self.tmp))?;
        // The checksum is read back from the page cache: one more pass over a file that was
        // just written, instead of a hash threaded through every write.
        let sum = {
            // SAFETY: the file is ours (a fresh temp file) and not changed while mapped.
            let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| ctx(&self.tmp))?;
            checksum(&map)
        };
        file.seek(SeekFrom::Start(CHECKSUM_AT as u64)).with_context(|| ctx(&self.tmp))?;
        file.write_all(&sum.to_le_bytes()).with_context(|| ctx(&self.tmp))?;
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
    /// The largest token id (None without tokens): compared with the tokenizer in use.
    max_token: Option<u32>,
}

impl Shard {
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let file = File::open(path).with_context(|| format!("{name}: cannot open shard"))?;
        // Every byte is read once below (checksum): populating the map up front faults the pages
        // in bulk, much faster than one page fault at a time.
        // SAFETY: shards are written once (temp file + rename) and never modified in place.
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }
            .with_context(|| format!("{name}: cannot map shard"))?;
        let header = ShardHeader::parse(&map, &name)?;
        match header.file_len() {
            Some(n) if n == map.len() as u64 => {}
            Some(n) => {
                bail!("{name}: shard is {} bytes, its header describes {n} (truncated or corrupt)", map.len())
            }
            None => bail!(
                "{name}: corrupt shard header: impossible counts (n_examples {}, n_tokens {}, n_spans {})",
                header.n_examples,
                header.n_tokens,
                header.n_spans
            ),
        }
        // The file exists in memory at this size, so every count below fits a usize.
        let offsets_at = HEADER_LEN + 4 * (header.n_tokens + header.n_tokens % 2) as usize;
        let span_offsets_at = offsets_at + 8 * (header.n_examples as usize + 1);
        let spans_at = span_offsets_at + 8 * (header.n_examples as usize + 1);
        let mut shard = Shard {
            path: path.to_path_buf(),
            map,
            header,
            offsets_at,
            span_offsets_at,
            spans_at,
            max_token: None,
        };
        shard.validate()?;
        let tokens = HEADER_LEN..HEADER_LEN + 4 * header.n_tokens as usize;
        let (sum, max_token) = scan(&shard.map, tokens);
        ensure!(
            sum == header.checksum,
            "{name}: checksum mismatch (the file says {:016x}, its bytes hash to {sum:016x}): the shard \
             is corrupt; re-run `sft prepare`",
            header.checksum
        );
        shard.max_token = max_token;
        if header.vocab_size > 0 {
            shard.check_vocab(header.vocab_size as usize, "the vocab_size field of its header")?;
        }
        Ok(shard)
    }

    /// Checks every offset and span, so that `example` can never index out of bounds.
    fn validate(&self) -> Result<()> {
        let name = self.path.display();
        let (offs, soffs) = (self.offsets(), self.span_offsets());
        let (n_tokens, n_spans) = (self.header.n_tokens, self.header.n_spans);
        let check = |table: &str, v: &[u64], total: u64, what: &str| -> Result<()> {
            ensure!(v[0] == 0, "{name}: corrupt {table}: {table}[0] = {}, expected 0", v[0]);
            for (i, w) in v.windows(2).enumerate() {
                ensure!(
                    w[1] <= total,
                    "{name}: corrupt {table}: {table}[{}] = {} is out of range (the shard holds {total} {what})",
                    i + 1,
                    w[1]
                );
                ensure!(
                    w[0] <= w[1],
                    "{name}: corrupt {table}: {table}[{}] = {} is below {table}[{i}] = {}",
                    i + 1,
                    w[1],
                    w[0]
                );
            }
            let last = v[v.len() - 1];
            ensure!(
                last == total,
                "{name}: corrupt {table}: the last entry is {last}, the header says {total} {what}"
            );
            Ok(())
        };
        check("token offsets", offs, n_tokens, "tokens")?;
        check("span offsets", soffs, n_spans, "spans")?;
        let spans = self.spans();
        for i in 0..self.header.n_examples as usize {
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

    /// Errors, naming the first example and position, when an id is not below `vocab_size`.
    pub fn check_vocab(&self, vocab_size: usize, what: &str) -> Result<()> {
        if self.max_token.is_none_or(|m| (m as usize) < vocab_size) {
            return Ok(());
        }
        let tokens = self.tokens();
        let at = tokens.iter().position(|&t| t as usize >= vocab_size).expect("the maximum is out of range");
        let offs = self.offsets();
        let i = offs.partition_point(|&o| o as usize <= at) - 1;
        bail!(
            "{}: example {i}: token id {} at position {} is outside the vocabulary of {vocab_size} ids ({what})",
            self.path.display(),
            tokens[at],
            at - offs[i] as usize
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &ShardHeader {
        &self.header
    }

    /// The largest token id of the shard (None when it holds no token).
    pub fn max_token(&self) -> Option<u32> {
        self.max_token
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
