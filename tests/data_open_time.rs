//! The open time of a ~100 MB shard (issue 13: validation and the checksum must keep opening
//! fast). Ignored by default (it writes 100 MB); run with
//! `cargo test --release --test data_open_time -- --ignored --nocapture`. It prints timings and
//! asserts only what was read.

use std::time::Instant;

use sft::data::shard::{Shard, ShardWriter};

#[test]
#[ignore = "writes a 100 MB shard; prints its open time"]
fn open_time_of_a_100_mb_shard() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train-00000.bin");
    let mut w = ShardWriter::create(&path, 7, 2).unwrap();
    let example: Vec<u32> = (0..500u32).map(|i| (i * 7919) % 8192).collect();
    for _ in 0..50_000 {
        w.push(&example, &[[300, 500]]).unwrap();
    }
    let t = Instant::now();
    w.finish().unwrap();
    let finish_s = t.elapsed().as_secs_f64();
    let bytes = std::fs::metadata(&path).unwrap().len();
    for round in 0..3 {
        let t = Instant::now();
        let s = Shard::open(&path).unwrap();
        let open_s = t.elapsed().as_secs_f64();
        assert_eq!(s.len(), 50_000);
        eprintln!(
            "round {round}: open {:.1} MB in {:.1} ms ({:.2} GB/s); finish (write tail, sync) {:.1} ms",
            bytes as f64 / 1e6,
            open_s * 1e3,
            bytes as f64 / open_s / 1e9,
            finish_s * 1e3
        );
    }
}
