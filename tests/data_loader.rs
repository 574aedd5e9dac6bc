//! Shards, prepare, and the padded/packed batches the trainer sees.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use common::data::{
    conv, simplellama_tokenizer, small_tokenizer, synthetic_conversations, write_simplellama_json,
};
use sft::data::format::training_text;
use sft::data::prepare::split_assignment;
use sft::data::shard::{Shard, ShardWriter};
use sft::data::{
    batches_from_examples, batches_in_order, prepare, tokenize_conversation, Batch, BatchMode, ChatTokenizer,
    Dataset, Example, Loader, LoaderConfig, LoaderState, NoSupervisedTokens, PrepareOptions, Split, TrainOn,
};

fn cfg(batch_size: usize, max_seq_len: usize, mode: BatchMode) -> LoaderConfig {
    LoaderConfig { batch_size, max_seq_len, mode, shuffle: false, seed: 1 }
}

fn ex(tokens: &[u32], supervised_from: usize) -> Example {
    Example { tokens: tokens.to_vec(), supervised: (0..tokens.len()).map(|i| i >= supervised_from).collect() }
}

/// SimpleLLaMA's `tokenize_and_pad_data` on ids: x, y with y a suffix of x.
fn reference_padded(
    xy: &[(Vec<u32>, Vec<u32>)],
    pad: u32,
    max_seq_len: usize,
    dynamic: bool,
) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let kept: Vec<_> = xy.iter().filter(|(x, _)| x.len() <= max_seq_len).collect();
    let len = if dynamic { kept.iter().map(|(x, _)| x.len()).max().unwrap() } else { max_seq_len };
    let mut xs = vec![];
    let mut ys = vec![];
    for (x, y) in kept {
        let mut xr = x.clone();
        xr.resize(len, pad);
        let mut yr = vec![pad; x.len() - y.len() - 1];
        yr.extend(y);
        yr.resize(len, pad);
        xs.push(xr);
        ys.push(yr);
    }
    (xs, ys)
}

fn rows(v: &[u32], b: &Batch) -> Vec<Vec<u32>> {
    v.chunks(b.seq_len).map(|r| r.to_vec()).collect()
}

#[test]
fn padded_batches_match_tokenize_and_pad_data_with_simplellama_tokenizer() {
    let Some(path) = simplellama_tokenizer() else { return };
    let tok = ChatTokenizer::from_file(&path).unwrap();
    let convs = synthetic_conversations(64, 3);
    let examples: Vec<Example> =
        convs.iter().map(|c| tokenize_conversation(&tok, c, TrainOn::FinalReply).unwrap()).collect();
    for dynamic in [true, false] {
        let mode = if dynamic { BatchMode::Dynamic } else { BatchMode::Fixed };
        let batches = batches_from_examples(&examples, tok.pad_id(), &cfg(8, 512, mode)).unwrap();
        assert_eq!(batches.len(), 8);
        for (b, group) in batches.iter().zip(convs.chunks(8)) {
            let xy: Vec<_> = group
                .iter()
                .map(|c| {
                    let y = format!("{}<EOA>", c.turns.last().unwrap().assistant);
                    (tok.encode(&training_text(c)).unwrap(), tok.encode(&y).unwrap())
                })
                .collect();
            let (xs, ys) = reference_padded(&xy, tok.pad_id(), 512, dynamic);
            assert_eq!(rows(&b.inputs, b), xs);
            assert_eq!(rows(&b.targets, b), ys);
            assert_eq!(b.n_segments(), b.rows);
        }
    }
}

#[test]
fn dynamic_and_fixed_padding() {
    let examples = vec![ex(&[10, 11, 12, 13], 2), ex(&[20, 21, 22, 23, 24, 25], 4)];
    let dynamic = batches_from_examples(&examples, 2, &cfg(2, 8, BatchMode::Dynamic)).unwrap();
    let fixed = batches_from_examples(&examples, 2, &cfg(2, 8, BatchMode::Fixed)).unwrap();
    let d = &dynamic[0];
    assert_eq!((d.rows, d.seq_len), (2, 6));
    assert_eq!(d.inputs, vec![10, 11, 12, 13, 2, 2, 20, 21, 22, 23, 24, 25]);
    // targets[i] = next token where it is supervised: tokens 12,13 and 24,25.
    assert_eq!(d.targets, vec![2, 12, 13, 2, 2, 2, 2, 2, 2, 24, 25, 2]);
    assert_eq!(d.positions, vec![0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]);
    assert_eq!(d.cu_seqlens, vec![0, 6, 12]);
    let f = &fixed[0];
    assert_eq!((f.rows, f.seq_len), (2, 8));
    assert_eq!(&f.inputs[..8], &[10, 11, 12, 13, 2, 2, 2, 2]);
    assert_eq!(&f.targets[8..], &[2, 2, 2, 24, 25, 2, 2, 2]);
    assert_eq!(d.n_supervised(), f.n_supervised());
}

#[test]
fn long_examples_are_skipped_within_their_batch_and_an_all_skipped_batch_is_an_error() {
    let examples = vec![ex(&[1, 3, 4], 1), ex(&[1; 10], 5), ex(&[5, 6], 1), ex(&[7, 8, 9], 2)];
    let b = batches_from_examples(&examples, 0, &cfg(2, 4, BatchMode::Dynamic)).unwrap();
    assert_eq!(b.len(), 2);
    assert_eq!(b[0].rows, 1, "the 10-token example is skipped inside its batch");
    assert_eq!(b[1].rows, 2);
    let all_long = vec![ex(&[1; 10], 5), ex(&[1; 9], 5)];
    let err =
        format!("{:#}", batches_from_examples(&all_long, 0, &cfg(2, 4, BatchMode::Dynamic)).unwrap_err());
    assert!(err.contains("all 2 examples") && err.contains("max_seq_len=4"), "{err}");
}

/// Collects (example, position, target) of every supervised target, from segment structure.
fn supervised_targets(batches: &[Batch]) -> BTreeSet<(Vec<u32>, usize, u32)> {
    let mut out = BTreeSet::new();
    for b in batches {
        for w in b.cu_seqlens.windows(2) {
            let (s, e) = (w[0] as usize, w[1] as usize);
            let tokens: Vec<u32> = b.inputs[s..e].iter().copied().filter(|&t| t != b.pad_id).collect();
            for i in s..e {
                if b.targets[i] != b.pad_id {
                    out.insert((tokens.clone(), i - s, b.targets[i]));
                }
            }
        }
    }
    out
}

#[test]
fn packed_rows_never_cross_examples_and_supervise_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let tok = small_tokenizer(dir.path());
    let convs = synthetic_conversations(40, 5);
    let examples: Vec<Example> =
        convs.iter().map(|c| tokenize_conversation(&tok, c, TrainOn::AllAssistant).unwrap()).collect();
    let max = examples.iter().map(|e| e.len()).max().unwrap() + 7;
    let packed = batches_from_examples(&examples, tok.pad_id(), &cfg(3, max, BatchMode::Packed)).unwrap();
    let padded = batches_from_examples(&examples, tok.pad_id(), &cfg(4, max, BatchMode::Dynamic)).unwrap();
    let mut seen = Vec::new();
    for b in &packed {
        assert_eq!(b.seq_len, max);
        assert_eq!(*b.cu_seqlens.last().unwrap() as usize, b.n_tokens());
        for w in b.cu_seqlens.windows(2) {
            let (s, e) = (w[0] as usize, w[1] as usize);
            assert!(s < e);
            assert_eq!(s / max, (e - 1) / max, "a segment never crosses a row");
            assert!(b.positions[s..e].iter().copied().eq(0..(e - s) as u32), "positions restart at 0");
            assert_eq!(b.targets[e - 1], b.pad_id, "the last token of a segment predicts nothing");
            let seg = &b.inputs[s..e];
            if seg.iter().all(|&t| t == b.pad_id) {
                assert_eq!(e % max, 0, "a padding segment is a row's tail");
            } else {
                seen.push(seg.to_vec());
            }
        }
    }
    let all: Vec<Vec<u32>> = examples.iter().map(|e| e.tokens.clone()).collect();
    assert_eq!(seen, all, "every example once, whole, in order");
    assert!(supervised_targets(&packed) == supervised_targets(&padded), "same supervised targets");
    let n: usize = packed.iter().map(|b| b.n_supervised()).sum();
    let m: usize = padded.iter().map(|b| b.n_supervised()).sum();
    assert_eq!(n, m);
}

fn write_shard(path: &Path, examples: &[Example]) {
    let mut w = ShardWriter::create(path, 0xABCD, 2).unwrap();
    for e in examples {
        w.push_example(e).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn shard_round_trip_and_corruption_detected() {
    let dir = tempfile::tempdir().unwrap();
    let examples = vec![ex(&[5, 6, 7], 1), ex(&[8], 1), ex(&[9, 10, 11, 12, 13], 3), Example::default()];
    let p = dir.path().join("train-00000.bin");
    write_shard(&p, &examples);
    assert!(!dir.path().join("train-00000.bin.tmp").exists());
    let s = Shard::open(&p).unwrap();
    assert_eq!(s.len(), 4);
    assert_eq!(s.header().fingerprint, 0xABCD);
    for (i, e) in examples.iter().enumerate() {
        assert_eq!(&s.example(i).to_example(), e);
    }
    let bytes = std::fs::read(&p).unwrap();
    let check = |name: &str, data: &[u8], needle: &str| {
        let q = dir.path().join(name);
        std::fs::write(&q, data).unwrap();
        let err = format!("{:#}", Shard::open(&q).err().expect("must fail"));
        assert!(err.contains(name) && err.contains(needle), "{err}");
    };
    check("truncated.bin", &bytes[..bytes.len() - 4], "truncated");
    check("short.bin", &bytes[..10], "bad magic");
    check(
        "foreign.bin",
        b"{\"this is\": \"json, not a shard\"} padding padding padding padding padding",
        "bad magic",
    );
    let mut v = bytes.clone();
    v[8] = 9;
    check("version.bin", &v, "version 9");
    // Structural damage behind a valid checksum (re-sealed) is caught by the offset checks...
    let mut v = bytes.clone();
    let tokens_end = sft::data::shard::HEADER_LEN + 4 * 10; // 9 tokens + 1 padding
    v[tokens_end + 8] = 200; // second offset
    sft::data::shard::seal(&mut v);
    check("offsets.bin", &v, "corrupt token offsets");
    let mut v = bytes.clone();
    let n = v.len();
    v[n - 4] = 99; // end of the last span
    sft::data::shard::seal(&mut v);
    check("span.bin", &v, "corrupt supervised span");
    // ...and a changed token (structurally fine) by the checksum.
    let mut v = bytes.clone();
    v[sft::data::shard::HEADER_LEN] ^= 1;
    check("sum.bin", &v, "checksum mismatch");
}

#[test]
fn dataset_reads_every_shard_and_loader_reshuffles_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let examples: Vec<Example> = (0..20u32).map(|i| ex(&[100 + i, 3, 4, 200 + i], 2)).collect();
    write_shard(&dir.path().join("train-00000.bin"), &examples[..7]);
    write_shard(&dir.path().join("train-00001.bin"), &examples[7..]);
    sft::data::prepare::record_shards(dir.path()).unwrap();
    let ds = Arc::new(Dataset::open(dir.path(), Split::Train).unwrap());
    assert_eq!((ds.len(), ds.n_shards(), ds.pad_id()), (20, 2, 2));
    assert_eq!(ds.example(19).to_example(), examples[19]);
    let in_order = batches_in_order(&ds, &cfg(6, 16, BatchMode::Dynamic)).unwrap();
    assert_eq!(in_order.len(), 4, "evaluation keeps the last partial batch");
    assert_eq!(in_order[3].rows, 2);

    let c = LoaderConfig { batch_size: 6, max_seq_len: 16, mode: BatchMode::Dynamic, shuffle: true, seed: 7 };
    let mut loader = Loader::new(ds.clone(), c.clone()).unwrap();
    assert_eq!(loader.batches_per_epoch(), 3, "last partial batch dropped");
    let first = |b: &Batch| rows(&b.inputs, b).iter().map(|r| r[0]).collect::<Vec<_>>();
    let epoch0: Vec<Vec<u32>> = (0..3).map(|_| first(&loader.next_batch().unwrap())).collect();
    let saved = loader.state();
    let epoch1: Vec<Vec<u32>> = (0..3).map(|_| first(&loader.next_batch().unwrap())).collect();
    assert_eq!(saved.epoch, 0);
    assert_eq!(loader.state().epoch, 1);
    assert_ne!(epoch0, epoch1, "reshuffled each epoch");
    let distinct: BTreeSet<u32> = epoch0.iter().flatten().copied().collect();
    assert_eq!(distinct.len(), 18);
    assert!(distinct.iter().any(|&t| t >= 107), "examples of the second shard are read");
    let mut again = Loader::new(ds.clone(), c.clone()).unwrap();
    again.restore(&saved).unwrap();
    let resumed: Vec<Vec<u32>> = (0..3).map(|_| first(&again.next_batch().unwrap())).collect();
    assert_eq!(resumed, epoch1);
    let mut fresh = Loader::new(ds.clone(), c.clone()).unwrap();
    assert_eq!(first(&fresh.next_batch().unwrap()), epoch0[0], "deterministic");
    // Skipping (a data-parallel rank passing over the others' batches) moves as reading does,
    // across the epoch's end: batches 3 and 5 of the two epochs read after skipping the rest.
    let mut skipping = Loader::new(ds.clone(), c).unwrap();
    for _ in 0..2 {
        skipping.skip_batch();
    }
    assert_eq!(first(&skipping.next_batch().unwrap()), epoch0[2]);
    skipping.skip_batch();
    assert_eq!(skipping.state(), LoaderState { epoch: 1, batch_in_epoch: 1 });
    assert_eq!(first(&skipping.next_batch().unwrap()), epoch1[1]);

    let packed =
        LoaderConfig { batch_size: 2, max_seq_len: 9, mode: BatchMode::Packed, shuffle: true, seed: 7 };
    let mut pl = Loader::new(ds, packed).unwrap();
    assert_eq!(pl.batches_per_epoch(), 5); // 10 rows of two 4-token examples
    let b = pl.next_batch().unwrap();
    assert_eq!(b.cu_seqlens, vec![0, 4, 8, 9, 13, 17, 18]);
}

/// The examples of a batch, in order, by their first token (100 + the example's index; a packed
/// row holds several).
fn firsts(b: &Batch) -> Vec<u32> {
    b.cu_seqlens[..b.cu_seqlens.len() - 1]
        .iter()
        .map(|&s| b.inputs[s as usize])
        .filter(|&t| t >= 100)
        .collect()
}

/// A run resumed with another micro-batch, batch mode or row length goes on at the same place
/// in the epoch's order (or a little before it, never past it): `Loader::restore_from`.
#[test]
fn a_position_moves_to_the_same_place_in_the_data_under_another_batch_shape() {
    let dir = tempfile::tempdir().unwrap();
    let examples: Vec<Example> = (0..20u32).map(|i| ex(&[100 + i, 3, 4, 200 + i], 2)).collect();
    write_shard(&dir.path().join("train-00000.bin"), &examples);
    sft::data::prepare::record_shards(dir.path()).unwrap();
    let ds = Arc::new(Dataset::open(dir.path(), Split::Train).unwrap());
    let shape = |batch_size, max_seq_len, mode| LoaderConfig {
        batch_size,
        max_seq_len,
        mode,
        shuffle: true,
        seed: 7,
    };
    let epoch_order = {
        let mut one = Loader::new(ds.clone(), shape(1, 16, BatchMode::Dynamic)).unwrap();
        (0..20).flat_map(|_| firsts(&one.next_batch().unwrap())).collect::<Vec<u32>>()
    };
    // Packed rows of two examples, two rows a batch: 3 batches read 12 examples.
    let was = shape(2, 9, BatchMode::Packed);
    let mut first = Loader::new(ds.clone(), was.clone()).unwrap();
    let read: Vec<u32> = (0..3).flat_map(|_| firsts(&first.next_batch().unwrap())).collect();
    assert_eq!(read, epoch_order[..12]);
    let at = first.state();
    assert_eq!(at, LoaderState { epoch: 0, batch_in_epoch: 3 });
    // (new shape, batch it goes on at, examples seen again)
    for (now, batch, again) in [
        (shape(2, 9, BatchMode::Packed), 3, 0),   // unchanged
        (shape(1, 9, BatchMode::Packed), 6, 0),   // half the rows a batch
        (shape(4, 9, BatchMode::Packed), 1, 4),   // 6 rows are not whole batches of 4: back to 4
        (shape(3, 16, BatchMode::Dynamic), 4, 0), // an example a row
        (shape(5, 16, BatchMode::Dynamic), 2, 2),
        (shape(1, 13, BatchMode::Packed), 4, 0), // three examples a row: rows 0..4 hold 12
    ] {
        let mut loader = Loader::new(ds.clone(), now.clone()).unwrap();
        let seen_again = loader.restore_from(&was, &at).unwrap();
        assert_eq!((loader.state().batch_in_epoch, seen_again), (batch, again), "{now:?}");
        let next = firsts(&loader.next_batch().unwrap());
        assert_eq!(next[0], epoch_order[12 - again], "{now:?}");
    }
    // A position the old shape never had is still refused.
    let mut loader = Loader::new(ds, shape(3, 16, BatchMode::Dynamic)).unwrap();
    let err = loader.restore_from(&was, &LoaderState { epoch: 0, batch_in_epoch: 9 }).unwrap_err();
    assert!(err.to_string().contains("batch 9 of epoch 0 does not exist"), "{err}");
}

/// `Loader::restore_from` over random shapes, data and positions: the batch it goes on at starts
/// at the epoch's example that the old shape had reached, less the examples it says are seen
/// again.
#[test]
fn restore_from_lands_where_it_says_for_any_two_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = sft::rng::Rng::new(17);
    // Unique first tokens; lengths 2..=12, so that rows of 8 leave some examples out.
    let examples: Vec<Example> = (0..30u32)
        .map(|i| {
            let len = 2 + rng.below(11) as u32;
            ex(&(0..len).map(|j| if j == 0 { 100 + i } else { 3 + j % 4 }).collect::<Vec<_>>(), 1)
        })
        .collect();
    write_shard(&dir.path().join("train-00000.bin"), &examples);
    sft::data::prepare::record_shards(dir.path()).unwrap();
    let ds = Arc::new(Dataset::open(dir.path(), Split::Train).unwrap());
    let shape = |rng: &mut sft::rng::Rng| {
        let (mode, max_seq_len) = match rng.below(2) {
            0 => (BatchMode::Packed, 8 + rng.below(17)),
            _ => (BatchMode::Dynamic, 16),
        };
        LoaderConfig { batch_size: 1 + rng.below(5), max_seq_len, mode, shuffle: true, seed: 3 }
    };
    for case in 0..300 {
        let (was, now) = (shape(&mut rng), shape(&mut rng));
        let epoch = rng.below(3) as u64;
        let mut old = Loader::new(ds.clone(), was.clone()).unwrap();
        old.restore(&LoaderState { epoch, batch_in_epoch: 0 }).unwrap();
        let at = LoaderState { epoch, batch_in_epoch: rng.below(old.batches_per_epoch() + 1) as u64 };
        // The epoch's order, one example a batch.
        let mut each = Loader::new(ds.clone(), shape_of_one()).unwrap();
        each.restore(&LoaderState { epoch, batch_in_epoch: 0 }).unwrap();
        let order: Vec<u32> = (0..30).flat_map(|_| firsts(&each.next_batch().unwrap())).collect();
        old.restore(&at).unwrap();
        let reached = if at.batch_in_epoch as usize == old.batches_per_epoch() {
            order.len()
        } else {
            let first = firsts(&old.next_batch().unwrap())[0];
            order.iter().position(|&t| t == first).unwrap()
        };
        let mut new = Loader::new(ds.clone(), now.clone()).unwrap();
        let again = new.restore_from(&was, &at).unwrap();
        let what = format!("case {case}: {was:?} at {at:?} -> {now:?}, reached {reached}, again {again}");
        assert!(again <= reached, "{what}");
        if was == now {
            assert_eq!((new.state(), again), (at.clone(), 0), "{what}");
        }
        if (new.state().batch_in_epoch as usize) < new.batches_per_epoch() {
            let first = firsts(&new.next_batch().unwrap())[0];
            assert!(reached - again < order.len(), "{what}");
            assert_eq!(first, order[reached - again], "{what}");
        }
    }
}

/// One example a batch, every example kept: the epoch's order itself.
fn shape_of_one() -> LoaderConfig {
    LoaderConfig { batch_size: 1, max_seq_len: 16, mode: BatchMode::Dynamic, shuffle: true, seed: 3 }
}

#[test]
fn a_batch_without_supervised_tokens_is_an_error_the_trainer_can_skip() {
    let dir = tempfile::tempdir().unwrap();
    let examples = vec![ex(&[5, 6], 2), ex(&[7, 8], 2), ex(&[9, 10], 1), ex(&[11, 12], 1)];
    write_shard(&dir.path().join("train-00000.bin"), &examples);
    sft::data::prepare::record_shards(dir.path()).unwrap();
    let ds = Arc::new(Dataset::open(dir.path(), Split::Train).unwrap());
    let mut loader = Loader::new(ds, cfg(2, 8, BatchMode::Dynamic)).unwrap();
    let err = loader.next_batch().unwrap_err();
    let e = err.downcast_ref::<NoSupervisedTokens>().expect("typed error");
    assert_eq!((e.epoch, e.batch_in_epoch), (0, 0));
    assert_eq!(loader.next_batch().unwrap().n_supervised(), 2, "the loader moved past it");
}

#[test]
fn prepare_splits_skips_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let tok = small_tokenizer(dir.path());
    let mut convs = synthetic_conversations(300, 9);
    convs.push(conv("long", &[(&"gravity ".repeat(300), "x")]));
    let data = dir.path().join("chat.json");
    write_simplellama_json(&data, &convs);
    let out = dir.path().join("prep");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("train-00007.bin"), b"stale").unwrap();
    let mut opts = PrepareOptions::new(&data, &dir.path().join("tok.json"), &out);
    opts.max_seq_len = 256;
    opts.train_share = 0.9;
    let r = prepare(&opts).unwrap();
    let examples: Vec<Example> =
        convs.iter().map(|c| tokenize_conversation(&tok, c, TrainOn::FinalReply).unwrap()).collect();
    let kept: Vec<&Example> = examples.iter().filter(|e| e.len() <= 256).collect();
    assert_eq!(r.n_skipped, examples.len() - kept.len());
    assert!(r.n_skipped >= 1);
    assert_eq!(r.n_train + r.n_val, kept.len());
    assert_eq!(r.n_train, (kept.len() as f64 * 0.9).round() as usize);
    assert!(!out.join("train-00007.bin").exists(), "stale shards removed");
    let train = Dataset::open(&out, Split::Train).unwrap();
    let val = Dataset::open(&out, Split::Val).unwrap();
    assert_eq!((train.len(), val.len()), (r.n_train, r.n_val));
    let is_val = split_assignment(kept.len(), 0.9, opts.seed);
    let (mut t, mut v) = (0, 0);
    for (e, &to_val) in kept.iter().zip(&is_val) {
        let got = if to_val {
            v += 1;
            val.example(v - 1)
        } else {
            t += 1;
            train.example(t - 1)
        };
        assert_eq!(&got.to_example(), *e);
    }
    assert_eq!(r.n_tokens, kept.iter().map(|e| e.len() as u64).sum::<u64>());
    // A split without examples is an empty dataset, not a missing one.
    opts.train_share = 1.0;
    let r = prepare(&opts).unwrap();
    assert_eq!(r.n_val, 0);
    let val = Dataset::open(&out, Split::Val).unwrap();
    assert!(val.is_empty());
    assert!(batches_in_order(&val, &cfg(4, 256, BatchMode::Dynamic)).unwrap().is_empty());
    // Too-short max_seq_len: nothing left is an error.
    opts.max_seq_len = 8;
    let err = format!("{:#}", prepare(&opts).unwrap_err());
    assert!(err.contains("chat.json") && err.contains("max_seq_len=8"), "{err}");
}
