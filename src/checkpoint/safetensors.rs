//! f32 tensors to and from safetensors files (F32, BF16 and F16 read; F32 written, or BF16 for
//! values that are bf16 already: the bf16 AdamW moments).

use super::fsync::fsync_file;
use crate::model::params::NamedTensor;
use ::safetensors::{Dtype, SafeTensors, View};
use anyhow::{bail, ensure, Context, Result};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::Path;

/// Lets `safetensors::serialize_to_file` stream one tensor at a time, stored as `dtype` (F32, or
/// BF16 for values that are bf16 already).
struct TensorView<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    data: &'a [f32],
}

impl View for TensorView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(match self.dtype {
            Dtype::BF16 => self.data.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
            _ => self.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
    }
    fn data_len(&self) -> usize {
        self.data.len() * if self.dtype == Dtype::BF16 { 2 } else { 4 }
    }
}

/// Writes `tensors` (their lengths checked) as `dtype` and fsyncs the file.
fn write_as(path: &Path, tensors: &[NamedTensor], dtype: Dtype) -> Result<()> {
    let views =
        tensors.iter().map(|t| (t.name.as_str(), TensorView { dtype, shape: &t.shape, data: &t.data }));
    ::safetensors::serialize_to_file(views, None, path)
        .with_context(|| format!("writing {}", path.display()))?;
    fsync_file(path)
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
    Ok(st.tensors().into_iter().map(|(n, v)| (n, format!("{:?}", v.dtype()))).collect())
}

/// Writes tensors as f32 safetensors and fsyncs the file.
pub fn write_safetensors(path: &Path, tensors: &[NamedTensor]) -> Result<()> {
    for t in tensors {
        check_len(t)?;
    }
    write_as(path, tensors, Dtype::F32)
}

/// Reads exactly the tensors named in `expected` (name, shape) from a safetensors file, as f32
/// (F32, BF16 and F16 files are accepted). Missing, misshapen or unexpected tensors are errors
/// that name the file and the tensor.
pub fn read_safetensors(path: &Path, expected: &[(String, Vec<usize>)]) -> Result<Vec<NamedTensor>> {
    let mapped = map_file(path)?;
    let st = parse_safetensors(path, &mapped.map)?;
    let wanted: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut unexpected: Vec<&str> = st.names().into_iter().filter(|n| !wanted.contains(n)).collect();
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

pub(super) fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e:?}", path.display()))
}

/// One tensor of `st` (the file `path`) as f32, checked against `shape`.
///
/// The bytes are read from the file rather than through the mapping: touched mapped pages count
/// toward the process's resident memory until unmapped, so a 5 GB checkpoint would be held
/// twice (mapped bytes and f32 copies) while loading.
pub(super) fn tensor_f32(
    path: &Path,
    file: &MappedFile,
    st: &SafeTensors,
    name: &str,
    shape: &[usize],
) -> Result<NamedTensor> {
    let view =
        st.tensor(name).map_err(|_| anyhow::anyhow!("{}: tensor {name} is missing", path.display()))?;
    ensure!(
        view.shape() == shape,
        "{}: tensor {name} has shape {:?}, expected {:?}",
        path.display(),
        view.shape(),
        shape
    );
    // `data()` is a slice of the mapping; only its address is used, no page is touched.
    let offset = view.data().as_ptr() as usize - file.map.as_ptr() as usize;
    let mut bytes = vec![0u8; view.data_len()];
    std::os::unix::fs::FileExt::read_exact_at(&file.file, &mut bytes, offset as u64)
        .with_context(|| format!("{}: reading tensor {name}", path.display()))?;
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
    Ok(st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec())).collect())
}
