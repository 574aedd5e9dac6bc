//! The embedded demo, shortened, and generation through the binary on the checkpoint it trains.

mod common;

use common::cli::run_with_stdin as sft;
use sft::backend::cpu::CpuBackend;
use sft::demo::{run_demo, DemoArgs};

#[test]
fn a_short_demo_learns_and_its_checkpoint_answers() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("demo");
    let args = DemoArgs {
        out: out.clone(),
        examples: 2000,
        heldout: 80,
        steps: 120,
        micro_batch: 32,
        seed: 89,
        device: "cpu".into(),
        lora: false,
    };
    let report = run_demo(CpuBackend::<f32>::new(), &args).unwrap();

    // The untrained model knows nothing; 120 steps teach at least the colour lookup.
    assert!(report.before.accuracy() < 0.05, "{:?}", report.before);
    assert!(
        report.after.accuracy() >= report.before.accuracy() + 0.2,
        "{:?} -> {:?}",
        report.before,
        report.after
    );
    assert!(report.after.val_loss < report.before.val_loss / 3.0, "{:?}", report);
    assert_eq!(report.before.total, 80);
    assert_eq!(report.samples.len(), 2);
    assert!(report.samples[1].example.history.len() == 1, "the second sample chat has two turns");
    assert_eq!(report.train.steps, 120);

    // A rerun may reuse its own directory, but never a foreign one.
    let foreign = root.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("keep.txt"), "mine").unwrap();
    let err =
        run_demo(CpuBackend::<f32>::new(), &DemoArgs { out: foreign.clone(), ..args.clone() }).unwrap_err();
    assert!(err.to_string().contains("not a demo directory"), "{err}");
    assert!(foreign.join("keep.txt").exists());

    // The trained checkpoint answers through `sft generate` and `sft chat`, with the arguments
    // the demo prints for chatting with it.
    let ckpt = sft::checkpoint::latest(&out.join("run")).unwrap().expect("the run saved a checkpoint");
    let ckpt = ckpt.to_str().unwrap();
    assert_eq!(
        report.chat_args,
        ["chat", "--checkpoint", ckpt, "--system", "Answer exactly.", "--temperature", "0"]
    );
    let chat: Vec<&str> = report.chat_args.iter().map(String::as_str).chain(["--device", "cpu"]).collect();
    let (ok, stdout, stderr) =
        sft(&[&["generate", "--prompt", "What color is the frog?"][..], &chat[1..]].concat(), "");
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "green", "{stderr}");

    let (ok, stdout, stderr) =
        sft(&chat, "What color is the crow?\n/reset\nWhat color is the swan?\n/quit\n");
    assert!(ok, "{stderr}");
    let replies: Vec<&str> = stdout.split("> ").map(str::trim).filter(|s| !s.is_empty()).collect();
    assert_eq!(replies, ["black", "white"], "{stdout}");

    // Sampling settings are checked.
    let (ok, _, stderr) =
        sft(&["generate", "--checkpoint", ckpt, "--prompt", "Hi", "--top-p", "0", "--device", "cpu"], "");
    assert!(!ok && stderr.contains("top_p"), "{stderr}");
    let (ok, _, stderr) = sft(&["generate", "--checkpoint", "/nonexistent/ckpt", "--prompt", "Hi"], "");
    assert!(!ok && stderr.contains("/nonexistent/ckpt"), "{stderr}");
}

#[test]
fn a_short_lora_demo_teaches_a_frozen_base_the_task_it_lacks() {
    let root = tempfile::tempdir().unwrap();
    let args = DemoArgs {
        out: root.path().join("demo"),
        examples: 2000,
        heldout: 80,
        steps: 200,
        micro_batch: 32,
        seed: 89,
        device: "cpu".into(),
        lora: true,
    };
    let report = run_demo(CpuBackend::<f32>::new(), &args).unwrap();
    let lookup = |s: &sft::demo::Score| s.per_task.iter().find(|t| t.task == "lookup").unwrap().correct;
    // The base never saw a colour lookup; the adapters teach it, the base frozen.
    // (200 steps each: the full demo's 1000 go much further; the run is deterministic. At 120
    // steps lookup was learned by 1 reply of 20, and a change of rounding order in the forward
    // flipped it to 0; at 200 it is 19 of 20.)
    assert_eq!(lookup(&report.before), 0, "{:?}", report.before);
    assert!(lookup(&report.after) > 0, "{:?} -> {:?}", report.before, report.after);
    assert!(report.after.accuracy() > report.before.accuracy(), "{:?} -> {:?}", report.before, report.after);
    assert!(report.after.val_loss < 0.6 * report.before.val_loss, "{report:?}");
    // The run's checkpoint is a PEFT adapter over the base run's checkpoint.
    let step = sft::checkpoint::latest(&args.out.join("run")).unwrap().unwrap();
    assert!(step.join("adapter_model.safetensors").is_file() && !step.join("model.safetensors").exists());
    // The chat the demo offers is the base with the adapter, and it knows the colours.
    let base = sft::checkpoint::latest(&args.out.join("base-run")).unwrap().unwrap();
    let (base, step) = (base.to_str().unwrap(), step.to_str().unwrap());
    assert_eq!(report.chat_args[1..5], ["--checkpoint", base, "--adapter", step]);
    let chat: Vec<&str> = report.chat_args.iter().map(String::as_str).chain(["--device", "cpu"]).collect();
    let (ok, stdout, stderr) = common::cli::run_with_stdin(&chat, "What color is the frog?\n/quit\n");
    assert!(ok, "{stderr}");
    assert!(stdout.contains("> "), "{stdout}");
}
