//! The devices the cost model knows, as data: datasheet peaks, memory, and the fraction of peak
//! each kind of kernel is assumed to reach — the plan's only assumptions, all in this file.
//!
//! The efficiencies come from public measurements of the same kinds of kernels on each device
//! (cited per field below), not from this project's targets. They change only through
//! calibration on a GPU (calibration.json, factors measured/estimated per op family); never to
//! make an estimate reach a goal.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};

use super::counting::Family;

/// The fraction of a peak each kind of kernel reaches.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Efficiencies {
    /// cuBLASLt bf16 GEMMs (fp32 accumulate) of training shapes (thousands of rows, widths of
    /// 2k–8k), against the dense bf16 tensor peak.
    pub gemm: f64,
    /// Flash attention forward+backward (FlashAttention-2 style, mma.sync, head_dim 64, causal),
    /// against the dense bf16 tensor peak.
    pub attention: f64,
    /// Bandwidth-bound kernels (elementwise, reductions, copies, AdamW), against the datasheet
    /// memory bandwidth.
    pub memory: f64,
    /// CUDA-core FLOPs of the elementwise kernels, against the fp32 non-tensor peak.
    pub fp32: f64,
}

/// One GPU model.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct DeviceSpec {
    /// The `--gpu` name.
    pub key: &'static str,
    pub name: &'static str,
    /// Dense bf16 tensor-core peak with fp32 accumulation, FLOP/s (datasheet, no sparsity).
    pub bf16_peak: f64,
    /// fp32 non-tensor peak, FLOP/s (datasheet).
    pub fp32_peak: f64,
    /// Memory bandwidth, bytes/s (datasheet).
    pub bandwidth: f64,
    /// Device memory as the driver reports it (`nvidia-smi` total), bytes.
    pub memory: usize,
    /// Effective host↔device bandwidth for the small pageable copies of a step, bytes/s:
    /// about 0.8 of the PCIe link's rate (Gen5 x16 64 GB/s, Gen4 x16 32 GB/s).
    pub host_bandwidth: f64,
    pub efficiency: Efficiencies,
}

const MIB: usize = 1 << 20;

/// Launch cost per kernel, memset or copy on one stream without CUDA graphs, seconds: the gap
/// between back-to-back small kernels measured on Ampere and Hopper is 2–5 µs (llm.c and
/// PyTorch profiler traces). Added per launch, since many of a step's kernels are short.
pub const LAUNCH_OVERHEAD_S: f64 = 3e-6;
/// A download waits for the stream and returns to the host: a round trip of about 10 µs
/// (cudaMemcpy device→host latency measured on PCIe systems), on top of its launch.
pub const SYNC_OVERHEAD_S: f64 = 10e-6;
/// The memory a CUDA context, cuBLASLt and the loaded modules take before the model allocates,
/// bytes (typically 0.3–0.6 GiB on these devices; an estimate).
pub const CONTEXT_BYTES: usize = 512 * MIB;

/// The devices, one table. Efficiency sources:
/// - gemm: cuBLASLt bf16 GEMMs of m = 16k rows and n, k of 2k–6k reach ~70% of the dense peak
///   on H100/H200 SXM (public cuBLAS/Transformer Engine GEMM sweeps, 600–750 TFLOP/s), ~80% on
///   A100 (250–270 of 312 TFLOP/s) and ~85% on the RTX 4090 (140–150 of 165 TFLOP/s).
/// - attention: FlashAttention-2's published fwd+bwd throughput at head_dim 64, causal, long
///   sequences: ~35% of peak on H100 (mma.sync kernels without Hopper's wgmma/TMA), ~50% on A100,
///   a similar ~50% on Ada.
/// - memory: STREAM-like copy and elementwise kernels reach 80–90% of the datasheet bandwidth
///   (nvbandwidth / BabelStream results); HBM3e on the H200 a little less.
/// - fp32: elementwise kernels' arithmetic is never near the peak; half is a generous bound that
///   keeps them bandwidth-bound, as they are.
pub const DEVICES: [DeviceSpec; 4] = [
    DeviceSpec {
        key: "h100",
        name: "NVIDIA H100 SXM 80GB",
        bf16_peak: 989.4e12,
        fp32_peak: 66.9e12,
        bandwidth: 3.35e12,
        memory: 81_559 * MIB,
        host_bandwidth: 50e9,
        efficiency: Efficiencies { gemm: 0.70, attention: 0.35, memory: 0.85, fp32: 0.5 },
    },
    DeviceSpec {
        key: "h200",
        name: "NVIDIA H200 SXM 141GB",
        bf16_peak: 989.4e12,
        fp32_peak: 66.9e12,
        bandwidth: 4.8e12,
        memory: 143_771 * MIB,
        host_bandwidth: 50e9,
        efficiency: Efficiencies { gemm: 0.70, attention: 0.35, memory: 0.80, fp32: 0.5 },
    },
    DeviceSpec {
        key: "a100",
        name: "NVIDIA A100 SXM 80GB",
        bf16_peak: 312e12,
        fp32_peak: 19.5e12,
        bandwidth: 2.039e12,
        memory: 81_920 * MIB,
        host_bandwidth: 25e9,
        efficiency: Efficiencies { gemm: 0.80, attention: 0.50, memory: 0.85, fp32: 0.5 },
    },
    DeviceSpec {
        key: "rtx4090",
        name: "NVIDIA GeForce RTX 4090 24GB",
        // Ada's dense bf16 tensor rate with fp32 accumulation (the GeForce parts run it at the
        // full rate of fp16 with fp32 accumulate: 165.2, not 330.3, which is with sparsity).
        bf16_peak: 165.2e12,
        fp32_peak: 82.6e12,
        bandwidth: 1.008e12,
        memory: 24_564 * MIB,
        host_bandwidth: 25e9,
        efficiency: Efficiencies { gemm: 0.85, attention: 0.50, memory: 0.85, fp32: 0.5 },
    },
];

/// The interconnect of a data-parallel step's gradient all-reduce, as its NCCL bus bandwidth per
/// GPU (bytes/s; nccl-tests' `busbw`, which a ring all-reduce of `b` bytes over `n` GPUs moves
/// `2·(n − 1)/n · b` at). Assumed, uncalibrated: 80% of the link's per-direction rate.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Link {
    pub name: String,
    pub bus_bandwidth: f64,
}

/// Seconds per step of a ring all-reduce beyond the bytes (a kernel and a hop; nccl-tests'
/// small-message times are 10–30 µs per all-reduce on 8 GPUs): `2·(n − 1)` steps of it.
pub const ALL_REDUCE_HOP_S: f64 = 5e-6;

/// `--link` on `device`: `nvlink` (NVLink 4 through NVSwitch on H100/H200 SXM, 450 GB/s per
/// direction; NVLink 3 on A100 SXM, 300 GB/s), `pcie` (the host link of `host_bandwidth`, already
/// 0.8 of its rate; GPU to GPU through the CPU's root complex can be slower), `infiniband` (one
/// 400 Gb/s NDR port per GPU, 50 GB/s: several nodes), or a bus bandwidth in GB/s.
pub fn link(device: &DeviceSpec, key: &str) -> Result<Link> {
    const EFFICIENCY: f64 = 0.8;
    let k = key.to_ascii_lowercase().replace(['-', '_', ' '], "");
    let (name, bus_bandwidth) = match k.as_str() {
        "nvlink" => match device.key {
            "h100" | "h200" => {
                ("NVLink 4 (NVSwitch), 450 GB/s per direction".to_string(), 450e9 * EFFICIENCY)
            }
            "a100" => ("NVLink 3 (NVSwitch), 300 GB/s per direction".to_string(), 300e9 * EFFICIENCY),
            _ => bail!(
                "--link nvlink: the {} has no NVLink; use --link pcie (or a bandwidth in GB/s)",
                device.name
            ),
        },
        "pcie" => (
            format!("PCIe, {:.0} GB/s effective (the host link)", device.host_bandwidth / 1e9),
            device.host_bandwidth,
        ),
        "infiniband" | "ib" => ("InfiniBand NDR, 400 Gb/s per GPU".to_string(), 50e9 * EFFICIENCY),
        // A number as written: the names' folding above would turn "-5" into 5 and "1e-3" into 1000.
        _ => match key.trim().parse::<f64>() {
            Ok(gbs) if gbs.is_finite() && (0.001..=1e6).contains(&gbs) => {
                (format!("{gbs} GB/s bus bandwidth (given)"), gbs * 1e9)
            }
            _ => bail!(
                "--link {key:?}: expected nvlink, pcie, infiniband or a bus bandwidth in GB/s (0.001 to 1000000)"
            ),
        },
    };
    Ok(Link { name, bus_bandwidth })
}

/// Seconds of a ring all-reduce of `bytes` over `gpus` GPUs on `link`.
pub fn all_reduce_seconds(bytes: f64, gpus: usize, link: &Link) -> f64 {
    if gpus <= 1 {
        return 0.0;
    }
    let n = gpus as f64;
    2.0 * (n - 1.0) / n * bytes / link.bus_bandwidth + 2.0 * (n - 1.0) * ALL_REDUCE_HOP_S
}

/// Seconds of ZeRO-1's collectives over `gpus` GPUs on `link`: a ring reduce-scatter of
/// `grad_bytes` and a ring all-gather of `weight_bytes`, each moving `(n − 1)/n` of its buffer
/// per GPU in `n − 1` hops.
pub fn reduce_scatter_all_gather_seconds(
    grad_bytes: f64,
    weight_bytes: f64,
    gpus: usize,
    link: &Link,
) -> f64 {
    if gpus <= 1 {
        return 0.0;
    }
    let n = gpus as f64;
    (n - 1.0) / n * (grad_bytes + weight_bytes) / link.bus_bandwidth + 2.0 * (n - 1.0) * ALL_REDUCE_HOP_S
}

/// Seconds of one ring pass over `gpus` GPUs on `link` — a reduce-scatter or an all-gather of a
/// `bytes` buffer: `(n − 1)/n` of it per GPU in `n − 1` hops. A bucket of ZeRO-1's gradient
/// reduce into the owners is timed as the reduce-scatter, its weight all-gather as the other.
pub fn ring_pass_seconds(bytes: f64, gpus: usize, link: &Link) -> f64 {
    if gpus <= 1 {
        return 0.0;
    }
    let n = gpus as f64;
    (n - 1.0) / n * bytes / link.bus_bandwidth + (n - 1.0) * ALL_REDUCE_HOP_S
}

/// The device named `key` (`h100`, `h200`, `a100`, `rtx4090`; a few spellings accepted).
pub fn device(key: &str) -> Result<&'static DeviceSpec> {
    let k = key.to_ascii_lowercase().replace(['-', '_', ' '], "");
    let k = match k.as_str() {
        "h100sxm" | "h100sxm5" => "h100",
        "h200sxm" => "h200",
        "a10080gb" | "a100sxm" | "a100sxm80gb" => "a100",
        "4090" | "geforcertx4090" => "rtx4090",
        other => other,
    };
    match DEVICES.iter().find(|d| d.key == k) {
        Some(d) => Ok(d),
        None => {
            let known: Vec<&str> = DEVICES.iter().map(|d| d.key).collect();
            bail!("--gpu {key:?} is not a known device (known: {})", known.join(", "))
        }
    }
}

/// The calibration file, embedded so that the binary and the repository agree.
pub const CALIBRATION_PATH: &str = "src/plan/calibration.json";
const CALIBRATION_JSON: &str = include_str!("calibration.json");

/// One device's calibration: measured/estimated time per op family.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    /// Where the factors came from (None: no GPU measurement yet, every factor 1.0).
    pub source: Option<String>,
    pub factors: BTreeMap<Family, f64>,
}

impl Calibration {
    pub fn factor(&self, family: Family) -> f64 {
        self.factors.get(&family).copied().unwrap_or(1.0)
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CalibrationFile {
    #[allow(dead_code)]
    note: String,
    devices: BTreeMap<String, DeviceCalibration>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceCalibration {
    /// Device, date, commit and command of the measurement; null when uncalibrated.
    source: Option<String>,
    factors: BTreeMap<String, f64>,
}

/// Parses a calibration file's text (`path` names it in errors) and returns `device`'s entry.
pub fn parse_calibration(text: &str, path: &str, device: &str) -> Result<Calibration> {
    let file: CalibrationFile = serde_json::from_str(text).with_context(|| format!("parsing {path}"))?;
    for key in file.devices.keys() {
        ensure!(DEVICES.iter().any(|d| d.key == key), "{path}: devices.{key} is not a known device");
    }
    let Some(entry) = file.devices.get(device) else {
        bail!("{path}: devices.{device} is missing");
    };
    let mut factors = BTreeMap::new();
    for (name, &f) in &entry.factors {
        let family = Family::parse(name)
            .with_context(|| format!("{path}: devices.{device}.factors.{name} is not an op family"))?;
        ensure!(
            f.is_finite() && f > 0.0,
            "{path}: devices.{device}.factors.{name} must be a positive number (got {f})"
        );
        factors.insert(family, f);
    }
    ensure!(
        entry.source.is_some() || factors.values().all(|&f| f == 1.0),
        "{path}: devices.{device} has factors other than 1.0 but no source (they come only from a GPU measurement)"
    );
    Ok(Calibration { source: entry.source.clone(), factors })
}

/// The embedded calibration of `device`.
pub fn calibration(device: &str) -> Result<Calibration> {
    parse_calibration(CALIBRATION_JSON, CALIBRATION_PATH, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_device_has_a_calibration_entry_and_names_resolve() {
        for d in &DEVICES {
            let cal = calibration(d.key).unwrap();
            assert!(cal.factors.values().all(|f| *f > 0.0));
            assert_eq!(device(d.key).unwrap().key, d.key);
        }
        assert_eq!(device("H100-SXM").unwrap().key, "h100");
        assert_eq!(device("4090").unwrap().key, "rtx4090");
        let err = device("tpu").unwrap_err().to_string();
        assert!(err.contains("tpu") && err.contains("h100"), "{err}");
    }

    #[test]
    fn bad_calibration_files_name_the_field() {
        let bad_family = r#"{"note": "", "devices": {"h100": {"source": null, "factors": {"gemm": 1.0}}}}"#;
        let err = format!("{:#}", parse_calibration(bad_family, "cal.json", "h100").unwrap_err());
        assert!(err.contains("cal.json") && err.contains("factors.gemm"), "{err}");
        let unsourced = r#"{"note": "", "devices": {"h100": {"source": null, "factors": {"matmul": 0.8}}}}"#;
        let err = format!("{:#}", parse_calibration(unsourced, "cal.json", "h100").unwrap_err());
        assert!(err.contains("no source"), "{err}");
        let negative = r#"{"note": "", "devices": {"h100": {"source": "x", "factors": {"matmul": -1}}}}"#;
        let err = format!("{:#}", parse_calibration(negative, "cal.json", "h100").unwrap_err());
        assert!(err.contains("devices.h100.factors.matmul"), "{err}");
        let missing = r#"{"note": "", "devices": {}}"#;
        let err = format!("{:#}", parse_calibration(missing, "cal.json", "a100").unwrap_err());
        assert!(err.contains("devices.a100 is missing"), "{err}");
    }
}
