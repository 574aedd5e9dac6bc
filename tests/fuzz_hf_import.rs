//! What users download, damaged: a Hugging Face model directory (config.json with the Llama
//! fields only, `model.safetensors.index.json`, shards in BF16, F16 and F32) through what `sft
//! train --init-from` does with it, and a PEFT adapter (`adapter_config.json`,
//! `adapter_model.safetensors`) through `sft merge`. Every file field by field and at random;
//! bytes anywhere in the shards; files removed. Every outcome is `Ok` with finite weights or a
//! clean `Err` naming the directory; a panic fails the test with the seed and the damage.
//!
//! Bounded in time: `SFT_FUZZ_SECONDS` (default 4, half for each target) for the random part,
//! after one pass over every field of each JSON file × every special value. `SFT_FUZZ_SEED`
//! replays a run.

mod common;

use common::fuzz::{self, Tally};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::Value;
use sft::backend::cpu::CpuBackend;
use sft::backend::RopeStyle;
use sft::checkpoint::hf_config::QK_ORDER_FIELD;
use sft::checkpoint::{self, hf_config_json, peft, to_hf, Checkpoint};
use sft::model::lora::{self, LoraConfig};
use sft::model::params::init_params;
use sft::model::{ModelConfig, NamedTensor};
use sft::rng::Rng;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The shards of the fixture model and the dtype each is stored in.
const SHARDS: [(&str, Dtype); 3] = [
    ("model-00001-of-00003.safetensors", Dtype::BF16),
    ("model-00002-of-00003.safetensors", Dtype::F16),
    ("model-00003-of-00003.safetensors", Dtype::F32),
];
const INDEX: &str = "model.safetensors.index.json";

/// A tensor as a shard stores it: name, shape, encoded bytes.
type Stored = (String, Vec<usize>, Vec<u8>);

fn encode(data: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => data.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        Dtype::F16 => data.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        _ => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// A sharded Hugging Face Llama directory as transformers saves one: no "sft" section, tensors
/// spread over three shards of three dtypes, written by the `safetensors` crate (no checksums).
fn write_hf_model(dir: &Path, config: &ModelConfig, params: Vec<NamedTensor>) {
    std::fs::create_dir_all(dir).unwrap();
    let mut json = hf_config_json(config);
    let fields = json.as_object_mut().unwrap();
    fields.remove("sft");
    fields.remove(QK_ORDER_FIELD);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
    let mut shards: Vec<Vec<Stored>> = vec![Vec::new(); SHARDS.len()];
    let mut weight_map = serde_json::Map::new();
    for (i, t) in to_hf(config, params).into_iter().enumerate() {
        let k = i % SHARDS.len();
        weight_map.insert(t.name.clone(), SHARDS[k].0.into());
        shards[k].push((t.name, t.shape, encode(&t.data, SHARDS[k].1)));
    }
    for ((file, dtype), tensors) in SHARDS.iter().zip(&shards) {
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, s, b)| (n.clone(), TensorView::new(*dtype, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join(INDEX), serde_json::to_string_pretty(&index).unwrap()).unwrap();
}

/// What `sft train --init-from DIR` does with a model directory before its first batch.
fn load_like_init_from(dir: &Path) -> anyhow::Result<Vec<NamedTensor>> {
    let ckpt = Checkpoint::open(dir)?;
    // Rows of at most 32 tokens: the fuzz checks the logic, not the host's memory.
    let seq_len = ckpt.config().max_seq_len.min(32);
    let params = ckpt.read_params()?;
    drop(ckpt.training_model_for(CpuBackend::<f32>::new(), None, 2, seq_len)?);
    Ok(params)
}

/// A loaded model whose weights are not all finite is a silently wrong result.
fn non_finite(params: &[NamedTensor]) -> Option<&str> {
    params.iter().find(|t| t.data.iter().any(|x| !x.is_finite())).map(|t| t.name.as_str())
}

/// The fixture directory, copied afresh for each input, damaged by the caller, then tried.
struct Cases {
    fixture: PathBuf,
    case: PathBuf,
    tally: Tally,
}

impl Cases {
    /// A fresh copy of the fixture with `edit` applied; `try_it` must give finite weights or an
    /// error naming the copy; `must_fail` inputs must give the error.
    fn run(
        &mut self,
        what: &str,
        must_fail: bool,
        edit: impl FnOnce(&Path),
        try_it: impl FnOnce(&Path) -> anyhow::Result<Vec<NamedTensor>>,
    ) {
        let _ = std::fs::remove_dir_all(&self.case);
        common::train::copy_dir(&self.fixture, &self.case);
        edit(&self.case);
        let case = self.case.clone();
        let Some(params) = self.tally.run(what, case.to_str().unwrap(), || try_it(&case)) else { return };
        if must_fail {
            self.tally.failures.push(format!("{what}: loaded as if nothing happened"));
        } else if let Some(name) = non_finite(&params) {
            self.tally.failures.push(format!("{what}: loaded with non-finite values in {name}"));
        }
    }

    /// One pass over every field of the JSON file `name`: each special value, and removed.
    fn every_field(&mut self, name: &str, try_it: &dyn Fn(&Path) -> anyhow::Result<Vec<NamedTensor>>) {
        let saved: Value = serde_json::from_slice(&std::fs::read(self.fixture.join(name)).unwrap()).unwrap();
        for path in fuzz::paths(&saved) {
            for value in fuzz::special_values().into_iter().map(Some).chain([None]) {
                let what = format!("{name} {} = {value:?}", fuzz::show(&path));
                let mut json = saved.clone();
                fuzz::set(&mut json, &path, value);
                self.run(
                    &what,
                    false,
                    |dir| std::fs::write(dir.join(name), json.to_string()).unwrap(),
                    try_it,
                );
            }
        }
    }

    /// Random damage to the fixture's files until `deadline`: a safetensors file's header or
    /// bytes, a JSON file's text or one of its fields, a file removed. `checked` files record
    /// their checksums, so a flipped data byte in them must be refused.
    fn random(
        &mut self,
        rng: &mut Rng,
        seed: u64,
        deadline: Instant,
        (tensor_files, checked): (&[&str], bool),
        json_files: &[&str],
        try_it: &dyn Fn(&Path) -> anyhow::Result<Vec<NamedTensor>>,
    ) {
        let read = |f: &str| std::fs::read(self.fixture.join(f)).unwrap();
        let tensors: Vec<Vec<u8>> = tensor_files.iter().map(|f| read(f)).collect();
        let jsons: Vec<Vec<u8>> = json_files.iter().map(|f| read(f)).collect();
        while Instant::now() < deadline {
            let n = self.tally.inputs;
            match rng.below(8) {
                0..=3 => {
                    let k = rng.below(tensor_files.len());
                    let (bytes, damage) = fuzz::damage_safetensors(rng, &tensors[k]);
                    let what = format!("seed {seed} input {n}: {}: {}", tensor_files[k], damage.what);
                    let must_fail = checked && damage.must_fail;
                    let edit = |dir: &Path| std::fs::write(dir.join(tensor_files[k]), bytes).unwrap();
                    self.run(&what, must_fail, edit, try_it);
                }
                4 | 5 => {
                    let k = rng.below(json_files.len());
                    let mut bytes = jsons[k].clone();
                    let at = fuzz::edit_json_text(rng, &mut bytes);
                    let what = format!("seed {seed} input {n}: {} edited at byte {at}", json_files[k]);
                    self.run(
                        &what,
                        false,
                        |dir| std::fs::write(dir.join(json_files[k]), bytes).unwrap(),
                        try_it,
                    );
                }
                6 => {
                    let k = rng.below(json_files.len());
                    let mut json: Value = serde_json::from_slice(&jsons[k]).unwrap();
                    let paths = fuzz::paths(&json);
                    let path = &paths[rng.below(paths.len())];
                    let specials = fuzz::special_values();
                    let value = (rng.below(8) > 0).then(|| specials[rng.below(specials.len())].clone());
                    let what =
                        format!("seed {seed} input {n}: {} {} = {value:?}", json_files[k], fuzz::show(path));
                    fuzz::set(&mut json, path, value);
                    let edit =
                        |dir: &Path| std::fs::write(dir.join(json_files[k]), json.to_string()).unwrap();
                    self.run(&what, false, edit, try_it);
                }
                _ => {
                    let all: Vec<&str> = tensor_files.iter().chain(json_files).copied().collect();
                    let f = all[rng.below(all.len())];
                    let what = format!("seed {seed} input {n}: {f} removed");
                    self.run(&what, false, |dir| std::fs::remove_file(dir.join(f)).unwrap(), try_it);
                }
            }
        }
    }
}

fn report(what: &str, cases: &Cases, exhaustive: usize, seed: u64) {
    let t = &cases.tally;
    println!(
        "fuzzed {what}: {} inputs ({exhaustive} single-field, {} random): {} loaded, {} clean errors, {} failures",
        t.inputs,
        t.inputs - exhaustive,
        t.ok,
        t.errors,
        t.failures.len()
    );
    t.assert_clean(seed);
}

/// The tiny model in Hugging Face's RoPE convention, as a Llama from elsewhere would be.
fn hf_config() -> ModelConfig {
    ModelConfig { rope_style: RopeStyle::HalfSplit, ..ModelConfig::tiny(64) }
}

#[test]
fn a_damaged_hugging_face_model_loads_or_fails_cleanly() {
    let seconds = fuzz::seconds(4.0) / 2.0;
    let seed = fuzz::seed(seconds);
    let root = tempfile::tempdir().unwrap();
    let config = hf_config();
    let fixture = root.path().join("Llama-tiny");
    write_hf_model(&fixture, &config, init_params(&config, 5));
    let mut cases = Cases { fixture, case: root.path().join("case"), tally: Tally::default() };

    cases.run("the model as saved", false, |_| {}, load_like_init_from);
    assert_eq!(cases.tally.ok, 1, "the undamaged model does not load: {:?}", cases.tally.failures);
    cases.every_field("config.json", &load_like_init_from);
    cases.every_field(INDEX, &load_like_init_from);
    let exhaustive = cases.tally.inputs;

    let mut rng = Rng::new(seed);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let shards: Vec<&str> = SHARDS.iter().map(|(f, _)| *f).collect();
    cases.random(&mut rng, seed, deadline, (&shards, false), &["config.json", INDEX], &load_like_init_from);
    report("a Hugging Face model directory", &cases, exhaustive, seed);
}

#[test]
fn a_damaged_peft_adapter_merges_or_fails_cleanly() {
    let seconds = fuzz::seconds(4.0) / 2.0;
    let seed = fuzz::seed(seconds);
    let root = tempfile::tempdir().unwrap();
    // sft's own convention (adjacent pairs), so that the adapter's q/k rows are permuted on load.
    let config = ModelConfig::tiny(64);
    let base = root.path().join("base");
    checkpoint::save_weights(&base, &config, init_params(&config, 5), None).unwrap();
    let lora = LoraConfig::new(2, 4.0, 0.0, LoraConfig::parse_targets("q,k,v,o,gate,up,down").unwrap());
    let mut adapters = lora::init_adapters(&lora, &config, 6);
    let mut rng = Rng::new(7);
    for t in &mut adapters {
        for x in &mut t.data {
            *x = 0.1 * rng.normal() as f32;
        }
    }
    let fixture = root.path().join("adapter");
    std::fs::create_dir(&fixture).unwrap();
    peft::write_adapter(&fixture, &config, &lora, &adapters, base.to_str().unwrap()).unwrap();
    let ckpt = Checkpoint::open(&base).unwrap();
    let merge = |dir: &Path| peft::merged_params(&ckpt, dir);
    let mut cases = Cases { fixture, case: root.path().join("case"), tally: Tally::default() };

    cases.run("the adapter as saved", false, |_| {}, merge);
    assert_eq!(cases.tally.ok, 1, "the undamaged adapter does not merge: {:?}", cases.tally.failures);
    cases.every_field(peft::ADAPTER_CONFIG_FILE, &merge);
    let exhaustive = cases.tally.inputs;

    let mut rng = Rng::new(seed);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let files = ([peft::ADAPTER_FILE].as_slice(), true);
    cases.random(&mut rng, seed, deadline, files, &[peft::ADAPTER_CONFIG_FILE], &merge);
    report("a PEFT adapter", &cases, exhaustive, seed);
}
