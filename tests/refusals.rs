//! Issue 13, "nothing silently wrong": every command refuses what it cannot do right, with an
//! error naming the file and the field or tensor, and never a panic or a silent exit 0.
//!
//! The commands run through the binary; `SFT_BIN` runs them against another build (that is how
//! these tests were seen to fail before the fixes).

mod common;

use common::cli::{output_with_env, s};
use common::train::copy_dir;

use sft::backend::cpu::CpuBackend;
use sft::checkpoint::{read_safetensors, tensor_shapes, write_safetensors};
use sft::data::shard::{Shard, ShardWriter};
use sft::data::BatchMode;
use sft::train::cli::{init, InitArgs};
use sft::train::{train_on, TrainConfig};
use std::path::{Path, PathBuf};

struct Outcome {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn sft_env(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let out = output_with_env(args, env);
    Outcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

fn sft(args: &[&str]) -> Outcome {
    sft_env(args, &[])
}

/// `sft train` on the CPU: `train`, then `args`, then `--device cpu`.
fn train(args: &[&str]) -> Outcome {
    sft(&[&["train"], args, &["--device", "cpu"]].concat())
}

/// `sft train` from the weights of `init` into `out_dir`, with `extra` flags.
fn train_from(data: &Path, init: &Path, out_dir: &Path, extra: &[&str]) -> Outcome {
    train(&[&["--data", s(data), "--init-from", s(init), "--out-dir", s(out_dir)], extra].concat())
}

/// [`train_from`] on padded batches (`--batch-mode dynamic`) of `micro_batch` examples: the
/// fixture's small set fills too few packed rows for a micro-batch, and padded micro-batches
/// hold exactly `micro_batch` examples.
fn train_padded(data: &Path, init: &Path, out_dir: &Path, micro_batch: &str, extra: &[&str]) -> Outcome {
    let padded = ["--batch-mode", "dynamic", "--micro-batch", micro_batch];
    train_from(data, init, out_dir, &[&padded, extra].concat())
}

/// `sft eval` of `checkpoint` on `data` on the CPU, with `extra` flags.
fn eval(checkpoint: &Path, data: &Path, extra: &[&str]) -> Outcome {
    let args = ["eval", "--checkpoint", s(checkpoint), "--data", s(data)];
    sft(&[&args, extra, &["--device", "cpu"]].concat())
}

/// `sft generate` from `checkpoint` for `prompt` on the CPU, with `extra` flags.
fn generate(checkpoint: &Path, prompt: &str, extra: &[&str]) -> Outcome {
    let args = ["generate", "--checkpoint", s(checkpoint), "--prompt", prompt];
    sft(&[&args, extra, &["--device", "cpu"]].concat())
}

/// A refusal: non-zero exit, no panic, and every one of `needles` in the message.
#[track_caller]
fn assert_refused(out: &Outcome, needles: &[&str]) {
    assert!(!out.ok, "expected an error, got success:\nstdout: {}\nstderr: {}", out.stdout, out.stderr);
    assert!(!out.stderr.contains("panicked"), "a panic instead of an error:\n{}", out.stderr);
    for needle in needles {
        assert!(out.stderr.contains(needle), "{needle:?} not in the error:\n{}", out.stderr);
    }
}

/// Prepared data and its tokenizer, a tiny `sft init` checkpoint with that tokenizer, and a run
/// directory holding a 2-step run's checkpoint.
struct Fixture {
    _root: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    tok: PathBuf,
    ckpt: PathBuf,
    run: PathBuf,
}

fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().to_path_buf();
    let (data, tok) = common::train::prepared_data(&path, 48, 96);
    let ckpt = path.join("init");
    init(InitArgs {
        model: "tiny".into(),
        out: ckpt.clone(),
        seed: 3,
        tokenizer: Some(tok.clone()),
        vocab_size: None,
    })
    .unwrap();
    let run = path.join("run");
    let cfg = TrainConfig {
        max_steps: Some(2),
        ..common::train::tiny_config(&data, &tok, &run, BatchMode::Dynamic)
    };
    train_on(CpuBackend::<f32>::new(), &cfg).unwrap();
    Fixture { _root: root, root: path, data, tok, ckpt, run }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Vec<sft::model::params::NamedTensor>)) {
    let path = dir.join("model.safetensors");
    let expected: Vec<(String, Vec<usize>)> = tensor_shapes(&path).unwrap().into_iter().collect();
    let mut tensors = read_safetensors(&path, &expected).unwrap();
    edit(&mut tensors);
    write_safetensors(&path, &tensors).unwrap();
}

/// Issue 13.1: `n_heads` 0 panicked (division by zero) in `train --init-from` and `--resume`.
#[test]
fn zero_or_inconsistent_config_dims_are_refused_by_every_command() {
    let f = fixture();
    for (field, value, named) in [
        ("n_heads", 0, "n_heads must be positive"),
        ("n_kv_heads", 0, "n_kv_heads must be positive"),
        ("n_kv_heads", 3, "divisible by n_kv_heads"),
        ("n_heads", 3, "divisible by n_heads"),
        ("d_model", 0, "d_model must be positive"),
        ("n_layers", 0, "n_layers must be positive"),
    ] {
        let bad = f.root.join(format!("bad-{field}-{value}"));
        copy_dir(&f.ckpt, &bad);
        edit_config(&bad, |json| json["sft"][field] = value.into());
        let out_dir = f.root.join(format!("out-{field}-{value}"));
        let extra = ["--max-steps", "1", "--micro-batch", "2", "--grad-accum", "1"];
        assert_refused(&train_from(&f.data, &bad, &out_dir, &extra), &["config.json", named]);
        assert_refused(&eval(&bad, &f.data, &[]), &["config.json", named]);
        assert_refused(&generate(&bad, "Hi", &[]), &["config.json", named]);
    }

    // --resume reads the latest checkpoint's config.
    let latest = sft::checkpoint::latest(&f.run).unwrap().unwrap();
    edit_config(&latest, |json| json["sft"]["n_heads"] = 0.into());
    let resume = train(&[
        "--data",
        s(&f.data),
        "--tokenizer",
        s(&f.tok),
        "--out-dir",
        s(&f.run),
        "--resume",
        "--max-steps",
        "3",
    ]);
    assert_refused(&resume, &["config.json", "n_heads must be positive"]);
}

/// Issue 13.2: a NaN weight gave "mean masked loss NaN" (exit 0) and replies decoded from NaN
/// logits (exit 0).
#[test]
fn non_finite_weights_and_outputs_are_errors_naming_the_tensor() {
    let f = fixture();
    let nan = f.root.join("nan");
    copy_dir(&f.ckpt, &nan);
    let tensor = "model.layers.1.mlp.down_proj.weight";
    edit_weights(&nan, |ts| ts.iter_mut().find(|t| t.name == tensor).unwrap().data[7] = f32::NAN);
    let non_finite = ["model.safetensors", tensor, "non-finite"];
    assert_refused(&eval(&nan, &f.data, &[]), &non_finite);
    assert_refused(&generate(&nan, "Hi", &[]), &non_finite);
    let trained = train_padded(&f.data, &nan, &f.root.join("nan-run"), "4", &["--grad-accum", "1"]);
    assert_refused(&trained, &non_finite);

    // Finite weights so large that the logits overflow: the outputs are checked too.
    let huge = f.root.join("huge");
    copy_dir(&f.ckpt, &huge);
    edit_weights(&huge, |ts| {
        ts.iter_mut().find(|t| t.name == "lm_head.weight").unwrap().data.iter_mut().for_each(|x| *x = 3e38)
    });
    assert_refused(&generate(&huge, "Hi", &[]), &["logits are not finite", "activations overflowed"]);
    let evaluated = eval(&huge, &f.data, &[]);
    assert_refused(&evaluated, &["evaluation loss is"]);
    assert!(!evaluated.stdout.contains("mean masked loss"), "{}", evaluated.stdout);

    // One weight with a flipped exponent bit (finite, about -6e33) inside a layer: the residual's
    // squares overflow f32 in the next RMSNorm, whose rsqrt(inf) = 0 used to zero every row, so
    // eval printed ln(vocab) and training ran on zero gradients. Now it is NaN, refused with the
    // culprit named.
    let flipped = f.root.join("flipped");
    copy_dir(&f.ckpt, &flipped);
    let tensor = "model.layers.0.self_attn.o_proj.weight";
    edit_weights(&flipped, |ts| {
        let w = &mut ts.iter_mut().find(|t| t.name == tensor).unwrap().data[100];
        *w = f32::from_bits(w.to_bits() ^ (1 << 30));
        assert!(w.is_finite() && w.abs() > 1e25, "{w}");
    });
    let culprit = ["activations overflowed", "the largest weight", "layers.0.o at index 100"];
    assert_refused(&eval(&flipped, &f.data, &[]), &culprit);
    assert_refused(&generate(&flipped, "Hi", &[]), &culprit);
    let trained = train_padded(&f.data, &flipped, &f.root.join("flipped-run"), "4", &["--grad-accum", "1"]);
    assert_refused(&trained, &["gradient norm is NaN", "layers.0.o at index 100"]);
}

/// Issue 13.3: `sft train` without `--init-from` trained a random 1.3B model until the kernel
/// killed it. Random weights must be asked for, and the CPU's memory is planned like a GPU's.
#[test]
fn training_from_random_weights_must_be_asked_for_and_fit_in_memory() {
    let f = fixture();
    let base =
        ["train", "--data", s(&f.data), "--tokenizer", s(&f.tok), "--grad-accum", "1", "--device", "cpu"];
    let out = f.root.join("scratch");
    let mut args: Vec<&str> = base.to_vec();
    args.extend(["--out-dir", s(&out), "--model", "tiny", "--micro-batch", "4", "--max-steps", "1"]);
    let refused = sft(&args);
    assert_refused(&refused, &["no starting weights", "--init-from", "--from-scratch", "--resume"]);
    assert!(!out.join("log.csv").exists(), "nothing was started");
    // A pretrained model given as --model: the refusal says how to load its weights.
    let mut pointed = args.clone();
    let at = pointed.iter().position(|a| *a == "tiny").unwrap();
    pointed[at] = s(&f.ckpt);
    let refused = sft(&pointed);
    let how =
        format!("--model takes only the shape of {}: --init-from {0} loads its weights", f.ckpt.display());
    assert_refused(&refused, &["no starting weights", &how]);
    args.push("--from-scratch");
    let trained = sft(&args);
    assert!(trained.ok, "{}", trained.stderr);
    assert!(trained.stdout.contains("done: 1 steps"), "{}", trained.stdout);

    // Far beyond any host's memory: refused at once with the sizes, not grown into the OOM killer.
    let huge = f.root.join("huge.json");
    let mut config = sft::model::ModelConfig::tiny(320);
    (config.d_model, config.n_heads, config.n_kv_heads, config.ffn_hidden, config.n_layers) =
        (16384, 128, 128, 44032, 200);
    std::fs::write(&huge, serde_json::to_string(&config).unwrap()).unwrap();
    let mut args: Vec<&str> = base.to_vec();
    let huge_out = f.root.join("huge-run");
    args.extend(["--out-dir", s(&huge_out), "--model", s(&huge), "--from-scratch", "--micro-batch", "2"]);
    let start = std::time::Instant::now();
    let refused = sft(&args);
    assert_refused(
        &refused,
        &["out of memory on cpu", "GiB of host memory are free", "not even micro_batch 1"],
    );
    assert!(start.elapsed().as_secs() < 30, "the refusal took {:?}", start.elapsed());
}

/// Issue 13.4: `eval` accepted a max_seq_len past the model's context and a tokenizer larger than
/// its vocabulary, which `train` and `generate` refused: one check for every command now.
#[test]
fn every_command_checks_tokenizer_and_context_alike() {
    let f = fixture();
    // A model whose vocabulary (100) is smaller than the tokenizer's (320).
    let small = f.root.join("small-vocab");
    init(InitArgs {
        model: "tiny".into(),
        out: small.clone(),
        seed: 1,
        tokenizer: None,
        vocab_size: Some(100),
    })
    .unwrap();
    let vocab_error = ["tokenizer.json", "has 320 tokens but the model's vocabulary holds 100"];
    assert_refused(&eval(&small, &f.data, &["--tokenizer", s(&f.tok)]), &vocab_error);
    assert_refused(&generate(&small, "Hi", &["--tokenizer", s(&f.tok)]), &vocab_error);
    assert_refused(&train_from(&f.data, &small, &f.root.join("small-run"), &[]), &vocab_error);

    // A context past the model's (tiny: 512).
    let context_error = ["max_seq_len 600 exceeds the model's max_seq_len 512"];
    assert_refused(&eval(&f.ckpt, &f.data, &["--max-seq-len", "600"]), &context_error);
    let trained = train_from(&f.data, &f.ckpt, &f.root.join("long-run"), &["--max-seq-len", "600"]);
    assert_refused(&trained, &context_error);
    let ids = vec!["5"; 513].join(",");
    let logits = sft(&["logits", "--checkpoint", s(&f.ckpt), "--ids", &ids]);
    assert_refused(&logits, &["max_seq_len 513 exceeds the model's max_seq_len 512"]);
    // Within bounds, eval works.
    let evaluated = eval(&f.ckpt, &f.data, &["--max-seq-len", "512"]);
    assert!(evaluated.ok && evaluated.stdout.contains("mean masked loss"), "{}", evaluated.stderr);
}

/// Issue 13.5: `generate` cut a long prompt to the model's context without a word.
#[test]
fn generate_says_how_many_prompt_tokens_it_dropped() {
    let f = fixture();
    let ckpt = tiny_with_context(&f, "short", 24);
    let tok = sft::data::ChatTokenizer::from_file(&f.tok).unwrap();
    let prompt = "What is seven plus two? ".repeat(6);
    let n_prompt = tok.encode_prompt(sft::data::DEFAULT_SYSTEM_PROMPT, &[], &prompt).unwrap().len();
    assert!(n_prompt > 23, "the prompt must be longer than the context: {n_prompt} tokens");
    let out = generate(&ckpt, &prompt, &["--max-new-tokens", "1", "--temperature", "0"]);
    assert!(out.ok, "{}", out.stderr);
    let expected = format!("the prompt has {n_prompt} tokens");
    assert!(out.stderr.contains(&expected), "{expected:?} not in:\n{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("its first {} tokens were dropped", n_prompt - 23)),
        "{}",
        out.stderr
    );
    // A prompt that fits gets no note.
    let out = generate(&f.ckpt, "Hi", &["--max-new-tokens", "1"]);
    assert!(out.ok && !out.stderr.contains("dropped"), "{}", out.stderr);
    // The same prompt (its last 23 tokens) leaves room for two new tokens: unless one is the stop
    // token, the reply runs into the end of the context and says it was cut.
    let out = generate(&ckpt, &prompt, &["--max-new-tokens", "5", "--temperature", "0"]);
    assert!(out.ok, "{}", out.stderr);
    if !out.stdout.trim().is_empty() {
        assert!(out.stderr.contains("the reply was cut after 2 tokens"), "{}", out.stderr);
    }
    // A context of one token leaves no room for a reply: an error, not "needs at least one token".
    let ckpt1 = tiny_with_context(&f, "one", 1);
    assert_refused(&generate(&ckpt1, "Hi", &[]), &["max_seq_len 1", "no room for a prompt and a reply"]);
}

/// An `sft init` checkpoint `root/name` of the tiny preset with a context of `max_seq_len` tokens
/// and the fixture's tokenizer.
fn tiny_with_context(f: &Fixture, name: &str, max_seq_len: usize) -> PathBuf {
    let config = f.root.join(format!("{name}.json"));
    let tiny = sft::model::ModelConfig { max_seq_len, ..sft::model::ModelConfig::tiny(320) };
    std::fs::write(&config, serde_json::to_string(&tiny).unwrap()).unwrap();
    let ckpt = f.root.join(name);
    let args = InitArgs {
        model: s(&config).into(),
        out: ckpt.clone(),
        seed: 1,
        tokenizer: Some(f.tok.clone()),
        vocab_size: None,
    };
    init(args).unwrap();
    ckpt
}

/// Issue 13.6: a run whose batches had no supervised target at all exited 0 after skipping them.
#[test]
fn a_run_that_trained_on_nothing_is_an_error() {
    let f = fixture();
    // The same examples with every supervised mark of the train split removed. Both splits are
    // rewritten by the same writer, so that they still read as one prepared set.
    let data = f.root.join("unsupervised");
    std::fs::create_dir_all(&data).unwrap();
    for entry in std::fs::read_dir(&f.data).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let train = name.starts_with("train-");
        if (train || name.starts_with("val-")) && name.ends_with(".bin") {
            let shard = Shard::open(&path).unwrap();
            let header = *shard.header();
            let mut w = ShardWriter::create(&data.join(&name), header.fingerprint, header.pad_id).unwrap();
            for i in 0..shard.len() {
                let mut ex = shard.example(i).to_example();
                if train {
                    ex.supervised.iter_mut().for_each(|s| *s = false);
                }
                w.push_example(&ex).unwrap();
            }
            w.finish().unwrap();
        } else if name == "tokenizer.json" {
            // prepare.json stays behind: it describes the original shards, not these.
            std::fs::copy(&path, data.join(&name)).unwrap();
        }
    }
    sft::data::prepare::record_shards(&data).unwrap();
    // Padded batches, so that the step counts below are those of 4-example micro-batches.
    let extra = ["--grad-accum", "2", "--max-steps", "3"];
    let out = train_padded(&data, &f.ckpt, &f.root.join("nothing"), "4", &extra);
    assert_refused(&out, &[s(&data), "no supervised target", "all 6 micro-batches were skipped"]);
}

/// Issue 13.7: with RUST_BACKTRACE=1 every input error printed a backtrace after its message.
#[test]
fn user_errors_print_their_message_chain_without_a_backtrace() {
    let f = fixture();
    let missing = f.root.join("missing");
    for env in [[("RUST_BACKTRACE", "1")], [("RUST_BACKTRACE", "full")], [("RUST_LIB_BACKTRACE", "1")]] {
        let out =
            sft_env(&["eval", "--checkpoint", s(&missing), "--data", s(&f.data), "--device", "cpu"], &env);
        assert_refused(&out, &["error: ", "missing/config.json", "  caused by: "]);
        assert_eq!(out.stderr.lines().next().map(|l| l.starts_with("error: ")), Some(true), "{}", out.stderr);
        assert!(!out.stderr.contains("backtrace") && !out.stderr.contains("Backtrace"), "{}", out.stderr);
        assert!(out.stderr.lines().count() <= 4, "more than the message chain:\n{}", out.stderr);
    }
}

/// Fine-tuning or resuming on data tokenized with another vocabulary than the starting weights'
/// trained each embedding row on another token's text, silently (eval already refused it).
#[test]
fn training_on_data_of_another_tokenizer_than_the_weights_is_refused() {
    let f = fixture();
    let other_tok = f.root.join("tok300.json");
    let chat = f.root.join("chat.json");
    let made =
        sft(&["tokenizer", "train", "--data", s(&chat), "--vocab-size", "300", "--out", s(&other_tok)]);
    assert!(made.ok, "{}", made.stderr);
    let other_data = f.root.join("data300");
    let prepared = sft(&[
        "prepare",
        "--data",
        s(&chat),
        "--tokenizer",
        s(&other_tok),
        "--out",
        s(&other_data),
        "--max-seq-len",
        "96",
    ]);
    assert!(prepared.ok, "{}", prepared.stderr);
    let needles = ["is not the tokenizer of the weights", "tokenizer.json", "sft prepare --tokenizer"];
    // --init-from a checkpoint of the first tokenizer.
    assert_refused(
        &train_padded(&other_data, &f.ckpt, &f.root.join("mixed"), "4", &["--max-steps", "1"]),
        &needles,
    );
    // eval and generate with that tokenizer given: another vocabulary of the same kind, whose
    // loss was computed without a word (only the size was checked).
    assert_refused(&eval(&f.ckpt, &other_data, &["--tokenizer", s(&other_tok)]), &needles);
    assert_refused(&generate(&f.ckpt, "Hi", &["--tokenizer", s(&other_tok)]), &needles);
    // --resume a run of the first tokenizer on the other data.
    let run = f.root.join("resumed");
    copy_dir(&f.run, &run);
    let resumed = train(&[
        "--data",
        s(&other_data),
        "--tokenizer",
        s(&other_tok),
        "--out-dir",
        s(&run),
        "--resume",
        "--max-steps",
        "3",
    ]);
    assert_refused(&resumed, &needles);
    // With the data alone, the run keeps its own tokenizer, which is not the data's.
    let resumed = train(&["--data", s(&other_data), "--out-dir", s(&run), "--resume", "--max-steps", "3"]);
    assert_refused(&resumed, &["data300", "was made with the tokenizer", "re-run `sft prepare`"]);
    // The checkpoint's tokenizer re-saved (other bytes, the same ids) is the same vocabulary.
    let resaved = f.root.join("resaved");
    copy_dir(&f.ckpt, &resaved);
    let tok_json = resaved.join("tokenizer.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tok_json).unwrap()).unwrap();
    std::fs::write(&tok_json, serde_json::to_string(&json).unwrap()).unwrap();
    let same = train_padded(
        &f.data,
        &resaved,
        &f.root.join("same"),
        "4",
        &["--max-steps", "1", "--grad-accum", "1"],
    );
    assert!(same.ok, "{}", same.stderr);
}

/// What a resume would silently do elsewhere than the checkpoint is refused: a
/// trainer_state.json whose step is not its directory's, another --model (the checkpoint's
/// config is the model), a LoRA run's adapters on another base. A run already at its end says so.
#[test]
fn a_resume_that_would_not_continue_the_checkpoint_is_refused() {
    let f = fixture();
    let resume = |run: &Path, extra: &[&str]| {
        train(
            &[&["--data", s(&f.data), "--out-dir", s(run), "--resume", "--batch-mode", "dynamic"], extra]
                .concat(),
        )
    };
    // The fixture's run saved step 2.
    let edited = f.root.join("edited");
    copy_dir(&f.run, &edited);
    let state_file = edited.join("step-2").join("trainer_state.json");
    let text = std::fs::read_to_string(&state_file).unwrap();
    std::fs::write(&state_file, text.replacen("\"step\": 2", "\"step\": 1", 1)).unwrap();
    // Any change to the file's text is refused by the checksum it ends with...
    assert_refused(
        &resume(&edited, &["--max-steps", "4"]),
        &["trainer_state.json", "not what was saved", "delete the \"state_checksum\" field"],
    );
    // ...and with that field deleted, as the error says to accept an edit, the step is checked.
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    state.as_object_mut().unwrap().remove("state_checksum").expect("the save recorded its checksum");
    std::fs::write(&state_file, state.to_string()).unwrap();
    assert_refused(
        &resume(&edited, &["--max-steps", "4"]),
        &["trainer_state.json", "\"step\" is 1", "step 2"],
    );

    let run = f.root.join("again");
    copy_dir(&f.run, &run);
    // A run already at its end (a job relaunched after it finished): nothing to do, said plainly
    // (it printed "train loss NaN"), and exit 0 so that a relaunch is harmless.
    let done = resume(&run, &["--max-steps", "2", "--micro-batch", "4", "--grad-accum", "2"]);
    assert!(
        done.ok && done.stdout.contains("is already at step 2: nothing to train"),
        "{}{}",
        done.stdout,
        done.stderr
    );
    assert!(!done.stdout.contains("NaN"), "{}", done.stdout);
    let fresh = train_padded(&f.data, &f.ckpt, &f.root.join("zero"), "4", &["--max-steps", "0"]);
    assert_refused(&fresh, &["max_steps must be at least 1"]);
    let other_model = f.root.join("model.json");
    std::fs::write(&other_model, serde_json::to_string(&sft::model::ModelConfig::tiny(320)).unwrap())
        .unwrap();
    assert_refused(
        &resume(&run, &["--model", s(&other_model), "--max-steps", "3"]),
        &["--resume continues the model"],
    );
    // Resuming without --model continues it, and the saved state still names the run's model.
    let resumed = resume(&run, &["--max-steps", "3", "--micro-batch", "4", "--grad-accum", "2"]);
    assert!(resumed.ok, "{}", resumed.stderr);
    let saved = std::fs::read_to_string(run.join("step-3").join("trainer_state.json")).unwrap();
    assert!(saved.contains("\"model\": \"tiny\""), "{saved}");

    // LoRA: adapters trained on the fixture's init checkpoint, resumed on another base.
    let lora = f.root.join("lora");
    let lora_flags = ["--lora", "--max-steps", "2", "--save-every", "2", "--grad-accum", "1"];
    let trained = train_padded(&f.data, &f.ckpt, &lora, "4", &lora_flags);
    assert!(trained.ok, "{}", trained.stderr);
    let more = ["--lora", "--max-steps", "3", "--micro-batch", "4", "--grad-accum", "1"];
    let other_base = f.run.join("step-2");
    let swapped = resume(&lora, &[&more[..], &["--init-from", s(&other_base)]].concat());
    assert_refused(&swapped, &["trains adapters on the base", "drop --init-from"]);
    // The same base by another path is the same base.
    let same_base = f.root.join(".").join("init");
    let continued = resume(&lora, &[&more[..], &["--init-from", s(&same_base)]].concat());
    assert!(continued.ok, "{}", continued.stderr);
}

/// A weight past bfloat16's range was exported as infinity, which every loader then refuses.
#[test]
fn a_bf16_export_refuses_a_weight_that_would_round_to_infinity() {
    let f = fixture();
    let big = f.root.join("big");
    copy_dir(&f.ckpt, &big);
    let tensor = "model.layers.1.mlp.up_proj.weight";
    edit_weights(&big, |ts| ts.iter_mut().find(|t| t.name == tensor).unwrap().data[3] = 3.4e38);
    let exported = sft(&["export", "--checkpoint", s(&big), "--out", s(&f.root.join("big-hf"))]);
    assert_refused(&exported, &[tensor, "index 3", "largest bfloat16", "--dtype f32"]);
    assert!(!f.root.join("big-hf").exists());
    let f32_out = f.root.join("big-f32");
    let exported = sft(&["export", "--checkpoint", s(&big), "--out", s(&f32_out), "--dtype", "f32"]);
    assert!(exported.ok, "{}", exported.stderr);
}

/// A negative AdamW second moment (a flipped sign bit) was accepted and turned into a NaN
/// gradient norm a step later, far from the file.
#[test]
fn a_negative_second_moment_is_refused_at_load() {
    let f = fixture();
    let run = f.root.join("negative-v");
    copy_dir(&f.run, &run);
    let path = run.join("step-2").join("optimizer.safetensors");
    let expected: Vec<(String, Vec<usize>)> = tensor_shapes(&path).unwrap().into_iter().collect();
    let mut tensors = read_safetensors(&path, &expected).unwrap();
    // Internal names in the optimizer file: m.NAME and v.NAME.
    let name = "v.layers.0.gate_up";
    let t = tensors.iter_mut().find(|t| t.name == name).unwrap();
    t.data[5] = -1.0;
    write_safetensors(&path, &tensors).unwrap();
    let resume_flags = [
        "--resume",
        "--batch-mode",
        "dynamic",
        "--max-steps",
        "3",
        "--micro-batch",
        "4",
        "--grad-accum",
        "2",
    ];
    let resume = || train(&[&["--data", s(&f.data), "--out-dir", s(&run)], &resume_flags[..]].concat());
    // The rewritten file is no longer the one the state records (a file from elsewhere, as far
    // as the record can tell).
    assert_refused(&resume(), &["optimizer.safetensors", "not the file this checkpoint was saved with"]);
    // Without the record (a checkpoint saved before it existed), the moment itself is refused.
    let state_file = run.join("step-2").join("trainer_state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    let fields = state.as_object_mut().unwrap();
    fields.remove("checkpoint_files").expect("the save recorded its files");
    fields.remove("state_checksum").expect("the save recorded its checksum");
    std::fs::write(&state_file, state.to_string()).unwrap();
    assert_refused(&resume(), &["optimizer.safetensors", name, "index 5", "cannot be negative"]);
}

/// A reader that closes the pipe early (`sft logits ... | head -c 1`) made the next print panic
/// ("failed printing to stdout: Broken pipe"); now the process ends quietly, as Unix tools do.
#[test]
fn a_closed_stdout_ends_the_command_quietly_not_with_a_panic() {
    let f = fixture();
    let ids = (1..400).map(|i| (i % 300).to_string()).collect::<Vec<_>>().join(",");
    let bin = env!("CARGO_BIN_EXE_sft");
    let script = format!(
        "'{bin}' logits --checkpoint '{}' --ids {ids} --device cpu | head -c 1 >/dev/null",
        s(&f.ckpt)
    );
    let out = std::process::Command::new("sh").args(["-c", &script]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{stderr}");
}

/// Flags the input cannot honour were ignored: `--train-on all-assistant` on a directory
/// prepared for the final reply gave the final reply's loss, `--split val` on a chat file showed
/// the whole file.
#[test]
fn flags_the_input_cannot_honour_are_refused_not_ignored() {
    let f = fixture();
    let refused = eval(&f.ckpt, &f.data, &["--train-on", "all-assistant"]);
    assert_refused(&refused, &["--train-on all-assistant", "was prepared with --train-on final-reply"]);
    let inspected = sft(&["inspect", "--data", s(&f.data), "--train-on", "all-assistant"]);
    assert_refused(&inspected, &["--train-on all-assistant", "was prepared with"]);
    let same = eval(&f.ckpt, &f.data, &["--train-on", "final-reply"]);
    assert!(same.ok, "{}", same.stderr);
    let chat = f.root.join("chat.json");
    let inspected = sft(&["inspect", "--data", s(&chat), "--tokenizer", s(&f.tok), "--split", "val"]);
    assert_refused(&inspected, &["--split", "is a chat file, which has no splits"]);
    let evaluated = eval(&f.ckpt, &chat, &["--split", "train"]);
    assert_refused(&evaluated, &["--split", "has no splits"]);
}
