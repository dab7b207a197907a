//! Benchmarks `address::syntax::parse` over every input of the email-validator corpus (with
//! each case's options), plus a few megabyte-sized adversarial inputs.
//!
//! Run: `cargo bench --bench syntax`. Compare with `python3 benches/email_validator_bench.py`,
//! which times email-validator 2.4.0 on the same cases; divide the corpus time by the number of
//! cases for nanoseconds per address.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use verigate::address::syntax::{Options, parse};

/// The daemon's allocator (src/main.rs), so `parse` is timed as it runs in the daemon.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The corpus shared with the daemon, relative to this crate.
const CORPUS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/corpus/addresses.jsonl"
);

#[derive(serde::Deserialize)]
struct Case {
    input: String,
    #[serde(default)]
    options: Options,
}

/// Every corpus case a Rust string can hold (two have a lone surrogate and are skipped, by
/// the Python benchmark too).
fn corpus_cases() -> Vec<Case> {
    let text = std::fs::read_to_string(CORPUS).expect("the corpus is readable");
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn bench_corpus(c: &mut Criterion) {
    let cases = corpus_cases();
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(cases.len() as u64));
    group.bench_function("corpus", |b| {
        b.iter(|| {
            for case in &cases {
                let _ = black_box(parse(black_box(&case.input), &case.options));
            }
        });
    });
    group.finish();
}

fn bench_adversarial(c: &mut Criterion) {
    const MEGABYTE: usize = 1 << 20;
    let opts = Options {
        allow_quoted_local: true,
        allow_display_name: true,
        ..Options::default()
    };
    let inputs = [
        (
            "huge_ascii",
            format!("{}@example.com", "a".repeat(MEGABYTE)),
        ),
        (
            "escaped_marks",
            format!("\"{}\"@example.com", "\\\u{301}".repeat(MEGABYTE / 4)),
        ),
        ("lt_with_solidus", "<\u{338}".repeat(MEGABYTE / 3)),
        (
            "long_display_name",
            format!("{} <a@example.com>", "a ".repeat(MEGABYTE / 2)),
        ),
    ];
    let mut group = c.benchmark_group("adversarial");
    group.sample_size(10);
    for (name, input) in &inputs {
        group.bench_function(*name, |b| {
            b.iter(|| black_box(parse(black_box(input), &opts)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_corpus, bench_adversarial);
criterion_main!(benches);
