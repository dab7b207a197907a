//! Fuzz target: `parse` must not panic on any UTF-8 input with any combination of options,
//! and every address it accepts must normalize to a fixed point (its normalized form parses
//! again, to itself).
//!
//! Run from the crate root with a nightly toolchain: `cargo +nightly fuzz run parse`.

#![no_main]

use verigate::address::syntax::{Options, parse};
use libfuzzer_sys::fuzz_target;

/// Number of boolean fields in `Options`.
const OPTION_COUNT: u32 = 8;

fn options_from_bits(bits: u32) -> Options {
    let bit = |n: u32| bits & (1 << n) != 0;
    Options {
        allow_smtputf8: bit(0),
        allow_quoted_local: bit(1),
        allow_domain_literal: bit(2),
        allow_display_name: bit(3),
        allow_empty_local: bit(4),
        globally_deliverable: bit(5),
        test_environment: bit(6),
        strict: bit(7),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    for bits in 0..(1u32 << OPTION_COUNT) {
        let opts = options_from_bits(bits);
        if let Ok(addr) = parse(input, &opts) {
            match parse(&addr.normalized, &opts) {
                Ok(again) => assert_eq!(
                    again.normalized, addr.normalized,
                    "not idempotent: {input:?}"
                ),
                Err(e) => panic!(
                    "normalized form {:?} of {input:?} is invalid: {e}",
                    addr.normalized
                ),
            }
        }
    }
});
