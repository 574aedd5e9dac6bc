//! Checkpoints: round trip, validation errors that name the file and tensor, rotation, the
//! `latest` pointer, and the `init`/`eval` commands.

mod common;

use common::train::{prepared_data, tiny_config};
use sft::backend::cpu::CpuBackend;
use sft::checkpoint::{self, list_checkpoints, write_safetensors, MODEL_FILE};
use sft::data::BatchMode;
use sft::data::TrainOn;
use sft::model::params::NamedTensor;
use sft::train::cli::{eval_with, init, EvalArgs, InitArgs, SplitArg};
use sft::train::{eval_loss, train_on, Schedule, TrainConfig};
use std::path::Path;

fn bits(ts: &[NamedTensor]) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    ts.iter()
        .map(|t| (t.name.clone(), t.shape.clone(), t.data.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

/// `sft init --model tiny` (seed 1, a vocabulary of 300) into `out`.
fn init_tiny(out: &Path) {
    init(InitArgs {
        model: "tiny".into(),
        out: out.to_path_buf(),
        seed: 1,
        tokenizer: None,
        vocab_size: Some(300),
    })
    .unwrap();
}

fn read_all(path: &Path) -> Vec<NamedTensor> {
    let shapes = checkpoint::tensor_shapes(path).unwrap();
    let expected: Vec<(String, Vec<usize>)> = shapes.into_iter().collect();
    checkpoint::read_safetensors(path, &expected).unwrap()
}

#[test]
fn checkpoint_round_trip_and_rotation() {
    let root = tempfile::tempdir().unwrap();
    let (data, tok) = prepared_data(root.path(), 48, 96);
    let out = root.path().join("run");
    let cfg = TrainConfig { max_steps: Some(5), ..tiny_config(&data, &tok, &out, BatchMode::Dynamic) };
    let (model, report) = train_on(CpuBackend::<f32>::new(), &cfg).unwrap();
    assert_eq!(report.steps, 5);

    // Saves at steps 2, 4 and 5 (the end); keep_checkpoints = 2 leaves the last two.
    let kept: Vec<u64> = list_checkpoints(&out).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(kept, vec![4, 5]);
    let latest = checkpoint::latest(&out).unwrap().unwrap();
    assert_eq!(latest, out.join("step-5"));
    assert_eq!(report.checkpoint.as_deref(), Some(latest.as_path()));
    for file in
        ["model.safetensors", "config.json", "tokenizer.json", "optimizer.safetensors", "trainer_state.json"]
    {
        assert!(latest.join(file).is_file(), "{file} missing");
    }

    // Weights come back bit for bit, under Hugging Face names.
    let loaded = checkpoint::load_training_model(&latest, CpuBackend::<f32>::new(), 256).unwrap();
    assert_eq!(bits(&loaded.read_params().unwrap()), bits(&model.read_params().unwrap()));
    let names: Vec<String> = read_all(&latest.join(MODEL_FILE)).into_iter().map(|t| t.name).collect();
    assert!(names.contains(&"model.embed_tokens.weight".to_string()), "{names:?}");
    assert!(names.iter().any(|n| n.ends_with("self_attn.q_proj.weight")), "{names:?}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(latest.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["hidden_size"], model.config().d_model);
    assert_eq!(checkpoint::read_model_config(&latest).unwrap(), *model.config());

    // So do the optimizer moments and the trainer state.
    let mut fresh = checkpoint::load_training_model(&latest, CpuBackend::<f32>::new(), 256).unwrap();
    checkpoint::load_optimizer_into(&latest, &mut fresh).unwrap();
    let (m0, v0) = model.read_optimizer_state().unwrap();
    let (m1, v1) = fresh.read_optimizer_state().unwrap();
    assert_eq!(bits(&m0), bits(&m1));
    assert_eq!(bits(&v0), bits(&v1));
    let state = sft::train::TrainerState::load(&latest).unwrap();
    assert_eq!(state.step, 5);
    assert_eq!(state.config, cfg);
    // JSON keeps f64 to within an ulp (serde_json's default parser is not always exact).
    assert!((state.lr - state.schedule.lr(4)).abs() <= 1e-15, "{} vs {}", state.lr, state.schedule.lr(4));
    let last = state.last_train_loss.unwrap();
    assert!((last - report.final_train_loss).abs() <= 1e-12 * last.abs(), "{last}");

    // The log's lr column follows the schedule, whose length is max_steps (as in Hugging Face
    // trainers) since no schedule_steps is given.
    assert_ne!(2 * report.steps_per_epoch, 5, "the epochs would give another length");
    assert_eq!(state.schedule.total_steps, 5);
    let schedule = Schedule { max_lr: 3e-3, min_lr: 3e-4, warmup_steps: 2, total_steps: 5 };
    let log = std::fs::read_to_string(out.join("log.csv")).unwrap();
    for (i, line) in log.lines().skip(1).enumerate() {
        let lr: f64 = line.split(',').nth(6).unwrap().parse().unwrap();
        assert!((lr - schedule.lr(i as u64)).abs() <= 1e-12, "step {}: lr {lr}", i + 1);
    }

    // A fresh run refuses to write over a run's checkpoints; --resume needs one.
    let err = train_on(CpuBackend::<f32>::new(), &cfg).map(|_| ()).unwrap_err();
    assert!(format!("{err:#}").contains("--resume"), "{err:#}");
    let empty = TrainConfig {
        resume: true,
        ..tiny_config(&data, &tok, &root.path().join("none"), BatchMode::Dynamic)
    };
    let err = train_on(CpuBackend::<f32>::new(), &empty).map(|_| ()).unwrap_err();
    assert!(format!("{err:#}").contains("no checkpoint"), "{err:#}");
}

/// Rewrites `model.safetensors` through `edit` and returns the load error.
fn load_error_after(edit: impl FnOnce(&mut Vec<NamedTensor>)) -> String {
    let root = tempfile::tempdir().unwrap();
    let ckpt = root.path().join("ckpt");
    init_tiny(&ckpt);
    let path = ckpt.join(MODEL_FILE);
    let mut tensors = read_all(&path);
    edit(&mut tensors);
    write_safetensors(&path, &tensors).unwrap();
    let err = checkpoint::load_generation_model(&ckpt, CpuBackend::<f32>::new()).map(|_| ()).unwrap_err();
    format!("{err:#}")
}

#[test]
fn missing_tensor_is_named_with_its_file() {
    let err = load_error_after(|ts| {
        ts.retain(|t| t.name != "model.norm.weight");
    });
    assert!(err.contains("model.safetensors") && err.contains("model.norm.weight is missing"), "{err}");
}

#[test]
fn misshapen_and_unexpected_tensors_are_named() {
    let err = load_error_after(|ts| {
        let t = ts.iter_mut().find(|t| t.name == "model.norm.weight").unwrap();
        t.data.push(1.0);
        t.shape = vec![t.data.len()];
    });
    assert!(err.contains("model.norm.weight has shape"), "{err}");
    let err = load_error_after(|ts| {
        ts.push(NamedTensor { name: "extra.weight".into(), shape: vec![2], data: vec![0.0, 1.0] })
    });
    assert!(err.contains("unexpected tensor extra.weight"), "{err}");
}

#[test]
fn truncated_weights_file_is_an_error_not_a_panic() {
    let root = tempfile::tempdir().unwrap();
    let ckpt = root.path().join("ckpt");
    init_tiny(&ckpt);
    let path = ckpt.join(MODEL_FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = checkpoint::load_generation_model(&ckpt, CpuBackend::<f32>::new()).map(|_| ()).unwrap_err();
    assert!(format!("{err:#}").contains("model.safetensors"), "{err:#}");
    std::fs::remove_file(&path).unwrap();
    let err = checkpoint::load_generation_model(&ckpt, CpuBackend::<f32>::new()).map(|_| ()).unwrap_err();
    assert!(format!("{err:#}").contains("model.safetensors"), "{err:#}");
}

/// A weight changed on disk after it was written (one bit, at rest or in a copy) loaded as a
/// slightly different model; the checksum each tensor carries in the header now refuses it. A
/// file without checksums (from elsewhere, or from sft before them) loads as it is, and two
/// saves of the same weights are the same bytes.
#[test]
fn a_tensor_changed_on_disk_is_refused_by_its_checksum() {
    let root = tempfile::tempdir().unwrap();
    let ckpt = root.path().join("ckpt");
    init_tiny(&ckpt);
    let path = ckpt.join(MODEL_FILE);
    let bytes = std::fs::read(&path).unwrap();
    // The same weights give the same bytes, header included (its metadata is written in order).
    let again = root.path().join("again");
    init_tiny(&again);
    assert!(std::fs::read(again.join(MODEL_FILE)).unwrap() == bytes, "two saves of one model differ");
    let header_len = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..header_len]).unwrap();
    let meta = header["__metadata__"].as_object().unwrap();
    assert_eq!(meta["format"], "pt", "transformers refuses a file without it");
    let tensor = "model.layers.1.mlp.down_proj.weight";
    assert!(meta.contains_key(&format!("sft.checksum.{tensor}")), "{meta:?}");
    // The low bit of one f32 weight: a finite value a hair off, which nothing else would notice.
    let at = header_len + header[tensor]["data_offsets"][0].as_u64().unwrap() as usize + 4 * 17;
    let mut changed = bytes.clone();
    changed[at] ^= 1;
    std::fs::write(&path, &changed).unwrap();
    let err = checkpoint::load_generation_model(&ckpt, CpuBackend::<f32>::new()).map(|_| ()).unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("model.safetensors") && err.contains(tensor) && err.contains("checksum"), "{err}");

    // The same weights with a header without metadata load, as a file from elsewhere does.
    let mut plain = header.clone();
    plain.as_object_mut().unwrap().remove("__metadata__");
    let mut text = plain.to_string().into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut file = (text.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&text);
    file.extend_from_slice(&bytes[header_len..]);
    std::fs::write(&path, &file).unwrap();
    checkpoint::load_generation_model(&ckpt, CpuBackend::<f32>::new()).unwrap();
}

/// Each file's tensor checksums catch changed bytes; a whole file copied in from another
/// checkpoint of the run carries valid ones of its own, and resumed as if it belonged. The
/// state now records each file's digest, and a resume refuses a file that is not the one saved.
#[test]
fn a_file_copied_in_from_another_checkpoint_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let (data, tok) = prepared_data(root.path(), 48, 96);
    let out = root.path().join("run");
    let cfg = TrainConfig { max_steps: Some(4), ..tiny_config(&data, &tok, &out, BatchMode::Dynamic) };
    train_on(CpuBackend::<f32>::new(), &cfg).unwrap();
    let state = std::fs::read_to_string(out.join("step-4").join("trainer_state.json")).unwrap();
    assert!(state.contains("\"checkpoint_files\"") && state.contains("optimizer.safetensors"), "{state}");
    std::fs::copy(out.join("step-2").join(MODEL_FILE), out.join("step-4").join(MODEL_FILE)).unwrap();
    let resume = TrainConfig { max_steps: Some(5), resume: true, ..cfg.clone() };
    let err = format!("{:#}", train_on(CpuBackend::<f32>::new(), &resume).map(|_| ()).unwrap_err());
    assert!(
        err.contains("step-4/model.safetensors") && err.contains("not the file this checkpoint"),
        "{err}"
    );
    // Its own file back, the run resumes.
    std::fs::remove_dir_all(out.join("step-4")).unwrap();
    std::fs::write(out.join("latest"), "step-2\n").unwrap();
    let resume = TrainConfig { max_steps: Some(3), resume: true, ..cfg };
    train_on(CpuBackend::<f32>::new(), &resume).unwrap();
}

#[test]
fn init_from_a_checkpoint_and_eval() {
    let root = tempfile::tempdir().unwrap();
    let (data, tok) = prepared_data(root.path(), 48, 96);
    let ckpt = root.path().join("init");
    init(InitArgs {
        model: "tiny".into(),
        out: ckpt.clone(),
        seed: 7,
        tokenizer: Some(tok.clone()),
        vocab_size: None,
    })
    .unwrap();
    assert!(ckpt.join("tokenizer.json").is_file());
    // `init` refuses to overwrite.
    assert!(init(InitArgs {
        model: "tiny".into(),
        out: ckpt.clone(),
        seed: 7,
        tokenizer: Some(tok.clone()),
        vocab_size: None
    })
    .is_err());

    let cfg = TrainConfig {
        init_from: Some(ckpt.clone()),
        from_scratch: false,
        max_steps: Some(2),
        ..tiny_config(&data, &tok, &root.path().join("run"), BatchMode::Dynamic)
    };
    let (mut model, report) = train_on(CpuBackend::<f32>::new(), &cfg).unwrap();
    assert_eq!(report.step_losses.len(), 2);

    // The initial loss of a random model is about ln(vocab); training from it lowers the loss.
    let val = sft::data::Dataset::open(&data, sft::data::Split::Val).unwrap();
    let lc = sft::data::LoaderConfig {
        batch_size: 4,
        max_seq_len: 64,
        mode: BatchMode::Dynamic,
        shuffle: false,
        seed: 0,
    };
    let batches = sft::data::batches_in_order(&val, &lc).unwrap();
    let mut initial = checkpoint::load_training_model(&ckpt, CpuBackend::<f32>::new(), 256).unwrap();
    let before = eval_loss(&mut initial, &batches).unwrap();
    let after = eval_loss(&mut model, &batches).unwrap();
    assert!(before.is_finite() && after < before, "before {before}, after {after}");
    assert!(report.final_val_loss.is_some());

    // `sft eval` on the prepared validation split measures the same; on the chat file, all of it.
    let args = EvalArgs {
        checkpoint: ckpt.clone(),
        data: data.clone(),
        tokenizer: None,
        split: Some(SplitArg::Val),
        train_on: Some(TrainOn::FinalReply),
        micro_batch: 4,
        max_seq_len: Some(96),
        batch_mode: BatchMode::Dynamic,
        device: "cpu".into(),
        adapter: None,
        chat: Default::default(),
    };
    assert_eq!(eval_with(CpuBackend::<f32>::new(), &args).unwrap().loss, before);
    let on_chat = eval_with(
        CpuBackend::<f32>::new(),
        &EvalArgs { data: root.path().join("chat.json"), split: None, ..args },
    )
    .unwrap();
    assert!(on_chat.loss.is_finite() && on_chat.supervised_tokens > 0, "{on_chat:?}");
    assert!(on_chat.batches > batches.len());
}
