//! f32 tensors to and from safetensors files (F32, BF16 and F16 read; F32 written, or BF16 for
//! values that are bf16 already: the bf16 AdamW moments, and exports).
//!
//! Every file sft writes records the checksum of each tensor's stored bytes in the header's
//! metadata (`sft.checksum.<tensor>`, beside `"format": "pt"`, which transformers asks of a
//! PyTorch file), and reading checks it: a tensor whose bytes changed after they were written
//! (a disk or copy error, an edit) is refused, naming the file and the tensor. Files from
//! elsewhere, and from sft before the checksums, carry none and are read as they are.

use crate::checksum;
use crate::model::params::NamedTensor;
use ::safetensors::{Dtype, SafeTensors};
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// The metadata key of a tensor's checksum is this prefix and the tensor's name.
const CHECKSUM_KEY: &str = "sft.checksum.";

fn bf16_bytes(xs: &[f32]) -> impl Iterator<Item = u8> + '_ {
    xs.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
}

#[cfg(not(target_endian = "little"))]
compile_error!("f32 tensors are written from memory as little-endian bytes");

/// The checksum of the bytes `t` is stored as: F32, or BF16 rounded to nearest even.
fn stored_checksum(t: &NamedTensor, dtype: Dtype) -> u64 {
    match dtype {
        Dtype::BF16 => checksum::of_encoded(&t.data, 2, |xs, out| out.extend(bf16_bytes(xs))),
        _ => checksum::of_bytes(bytemuck::cast_slice(&t.data)),
    }
}

/// Writes `tensors` (their lengths checked) stored as `dtype` (F32, or BF16 rounded to nearest
/// even as torch's `.to(torch.bfloat16)` does), each tensor's checksum in the header, and fsyncs
/// the file.
///
/// The layout is the `safetensors` crate's (tensors by name, offsets in that order, the header
/// padded with spaces to 8 bytes), but the header is written here: the crate writes its metadata
/// map in hash order, so two saves of the same weights would differ in their bytes.
pub(super) fn write_as(path: &Path, tensors: &[NamedTensor], dtype: Dtype) -> Result<()> {
    let (dtype_name, width) = match dtype {
        Dtype::F32 => ("F32", 4),
        Dtype::BF16 => ("BF16", 2),
        other => bail!("writing {}: tensors are written as F32 or BF16, not {other:?}", path.display()),
    };
    for t in tensors {
        check_len(t)?;
    }
    let mut order: Vec<&NamedTensor> = tensors.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = order.windows(2).find(|w| w[0].name == w[1].name) {
        bail!("writing {}: two tensors are named {}", path.display(), w[0].name);
    }
    let sums: Vec<u64> = order.par_iter().map(|t| stored_checksum(t, dtype)).collect();
    let mut metadata = serde_json::Map::new();
    metadata.insert("format".into(), "pt".into());
    for (t, sum) in order.iter().zip(&sums) {
        metadata.insert(format!("{CHECKSUM_KEY}{}", t.name), checksum::to_hex(*sum).into());
    }
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), metadata.into());
    let mut offset = 0;
    for t in &order {
        let end = offset + t.data.len() * width;
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": dtype_name, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut text = serde_json::to_vec(&serde_json::Value::Object(header))?;
    text.resize(text.len().next_multiple_of(8), b' ');

    let write = || -> std::io::Result<()> {
        let mut out = BufWriter::with_capacity(1 << 22, File::create(path)?);
        out.write_all(&(text.len() as u64).to_le_bytes())?;
        out.write_all(&text)?;
        for t in &order {
            match dtype {
                Dtype::BF16 => {
                    for part in t.data.chunks(1 << 16) {
                        out.write_all(&bf16_bytes(part).collect::<Vec<u8>>())?;
                    }
                }
                _ => out.write_all(bytemuck::cast_slice(&t.data))?,
            }
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    write().with_context(|| format!("writing {}", path.display()))
}

/// Writes tensors as bf16 safetensors and fsyncs the file. Every value must be a bf16 value
/// already (an f32 with the low 16 bits zero), so that reading the file back gives exactly
/// what was written; anything else is an error naming the tensor, not a silent rounding.
pub fn write_safetensors_bf16(path: &Path, tensors: &[NamedTensor]) -> Result<()> {
    for t in tensors {
        check_len(t)?;
        if let Some(i) =
            t.data.iter().position(|&x| half::bf16::from_f32(x).to_f32().to_bits() != x.to_bits())
        {
            bail!(
                "writing {}: tensor {} holds {} at index {i}, which is not a bf16 value",
                path.display(),
                t.name,
                t.data[i]
            );
        }
    }
    write_as(path, tensors, Dtype::BF16)
}

fn check_len(t: &NamedTensor) -> Result<()> {
    ensure!(
        t.shape.iter().product::<usize>() == t.data.len(),
        "tensor {} has {} values for shape {:?}",
        t.name,
        t.data.len(),
        t.shape
    );
    Ok(())
}

/// The dtype of every tensor in a safetensors file (`F32`, `BF16`, ...), by name.
pub fn tensor_dtypes(path: &Path) -> Result<BTreeMap<String, String>> {
    let mapped = map_file(path)?;
    let st = parse_safetensors(path, &mapped.map)?;
    Ok(st.tensors.tensors().into_iter().map(|(n, v)| (n, format!("{:?}", v.dtype()))).collect())
}

/// Writes tensors as f32 safetensors and fsyncs the file.
pub fn write_safetensors(path: &Path, tensors: &[NamedTensor]) -> Result<()> {
    write_as(path, tensors, Dtype::F32)
}

/// Reads exactly the tensors named in `expected` (name, shape) from a safetensors file, as f32
/// (F32, BF16 and F16 files are accepted). Missing, misshapen or unexpected tensors are errors
/// that name the file and the tensor.
pub fn read_safetensors(path: &Path, expected: &[(String, Vec<usize>)]) -> Result<Vec<NamedTensor>> {
    let mapped = map_file(path)?;
    let st = parse_safetensors(path, &mapped.map)?;
    let wanted: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut unexpected: Vec<&str> = st.tensors.names().into_iter().filter(|n| !wanted.contains(n)).collect();
    unexpected.sort_unstable();
    if let Some(name) = unexpected.first() {
        bail!(
            "{}: unexpected tensor {name} ({} unexpected in all): does the config match the weights?",
            path.display(),
            unexpected.len()
        );
    }
    expected.iter().map(|(name, shape)| tensor_f32(path, &mapped, &st, name, shape)).collect()
}

/// A safetensors file, memory-mapped for its header and index. Tensor data is read with
/// `pread` instead of through the mapping (see [`tensor_f32`]).
pub(super) struct MappedFile {
    file: File,
    pub(super) map: memmap2::Mmap,
}

pub(super) fn map_file(path: &Path) -> Result<MappedFile> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: the file is only read; a checkpoint is not modified while it is loaded.
    let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
    Ok(MappedFile { file, map })
}

/// A parsed safetensors file: its tensors, and the checksums its header records by tensor name.
pub(super) struct Parsed<'a> {
    pub(super) tensors: SafeTensors<'a>,
    checksums: HashMap<String, String>,
}

pub(super) fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<Parsed<'a>> {
    let invalid = |e| anyhow::anyhow!("{}: not a valid safetensors file: {e:?}", path.display());
    let tensors = SafeTensors::deserialize(bytes).map_err(invalid)?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(invalid)?;
    let checksums = header
        .metadata()
        .iter()
        .flatten()
        .filter_map(|(key, sum)| Some((key.strip_prefix(CHECKSUM_KEY)?.to_string(), sum.clone())))
        .collect();
    Ok(Parsed { tensors, checksums })
}

/// A digest of the tensor checksums that the file at `path` records in its header (`None` for
/// a file without them): it tells a checkpoint's own file from another one of the same shapes,
/// reading the header only.
pub(super) fn recorded_digest(path: &Path) -> Result<Option<String>> {
    let mapped = map_file(path)?;
    let (_, header) = SafeTensors::read_metadata(&mapped.map)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e:?}", path.display()))?;
    let sums: BTreeMap<&str, &str> = header
        .metadata()
        .iter()
        .flatten()
        .filter(|(key, _)| key.starts_with(CHECKSUM_KEY))
        .map(|(key, sum)| (key.as_str(), sum.as_str()))
        .collect();
    if sums.is_empty() {
        return Ok(None);
    }
    let listed: String = sums.iter().map(|(key, sum)| format!("{key}={sum}\n")).collect();
    Ok(Some(checksum::to_hex(checksum::of_bytes(listed.as_bytes()))))
}

/// Checks `bytes`, the stored bytes of tensor `name`, against the checksum `file` records for it.
fn check_recorded_sum(path: &Path, file: &Parsed, name: &str, bytes: &[u8]) -> Result<()> {
    if file.checksums.is_empty() {
        // A file from elsewhere, or from sft before the checksums.
        return Ok(());
    }
    let recorded = file.checksums.get(name).with_context(|| {
        format!(
            "{}: tensor {name} has no checksum in the header, where the file's other tensors have one:              the header was edited",
            path.display()
        )
    })?;
    let recorded = checksum::from_hex(recorded).with_context(|| {
        format!("{}: metadata {CHECKSUM_KEY}{name} = {recorded:?} is not a checksum", path.display())
    })?;
    let sum = checksum::of_bytes(bytes);
    ensure!(
        sum == recorded,
        "{}: tensor {name}: its bytes do not match the checksum written with them ({}, recorded {}): the          file changed after it was written (a disk or copy error, or an edit); use another copy of it",
        path.display(),
        checksum::to_hex(sum),
        checksum::to_hex(recorded)
    );
    Ok(())
}

/// One tensor of `st` (the file `path`) as f32, checked against `shape` and against the
/// checksum the file records for it.
///
/// The bytes are read from the file rather than through the mapping: touched mapped pages count
/// toward the process's resident memory until unmapped, so a 5 GB checkpoint would be held
/// twice (mapped bytes and f32 copies) while loading.
pub(super) fn tensor_f32(
    path: &Path,
    file: &MappedFile,
    st: &Parsed,
    name: &str,
    shape: &[usize],
) -> Result<NamedTensor> {
    let view = st
        .tensors
        .tensor(name)
        .map_err(|_| anyhow::anyhow!("{}: tensor {name} is missing", path.display()))?;
    ensure!(
        view.shape() == shape,
        "{}: tensor {name} has shape {:?}, expected {:?}",
        path.display(),
        view.shape(),
        shape
    );
    // `data()` is a slice of the mapping; only its address is used, no page is touched.
    let offset = view.data().as_ptr() as usize - file.map.as_ptr() as usize;
    let mut bytes = vec![0u8; view.data().len()];
    std::os::unix::fs::FileExt::read_exact_at(&file.file, &mut bytes, offset as u64)
        .with_context(|| format!("{}: reading tensor {name}", path.display()))?;
    check_recorded_sum(path, st, name, &bytes)?;
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::BF16 => {
            bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        }
        Dtype::F16 => {
            bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        }
        other => bail!("{}: tensor {name} has dtype {other:?}; expected F32, BF16 or F16", path.display()),
    };
    // One pass while the tensor is in cache: a NaN or infinite weight would otherwise surface
    // as a NaN loss, or as replies decoded from NaN logits, with nothing to say where it came from.
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        bail!("{}: tensor {name} holds a non-finite value ({}) at index {i}", path.display(), data[i]);
    }
    Ok(NamedTensor { name: name.to_string(), shape: shape.to_vec(), data })
}

/// Names of the tensors in a safetensors file with their shapes, sorted (for inspection).
pub fn tensor_shapes(path: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = parse_safetensors(path, &bytes)?;
    Ok(st.tensors.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec())).collect())
}
