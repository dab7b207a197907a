#!/usr/bin/env python3
"""Times Python email-validator 2.4.0 on the corpus inputs, with each case's options, like
benches/syntax.rs does for the Rust port, and prints nanoseconds per address.

    pip install email-validator==2.4.0
    python3 benches/email_validator_bench.py [--rounds N]
"""
import argparse
import json
import os
import time

from email_validator import EmailNotValidError, validate_email

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "..", "shared", "corpus", "addresses.jsonl")


def load_cases():
    cases = []
    with open(CORPUS, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            # Skip the lone-surrogate inputs, as the Rust benchmark must.
            if any(0xD800 <= ord(c) <= 0xDFFF for c in row["input"]):
                continue
            cases.append((row["input"], row.get("options", {})))
    return cases


def run(cases):
    for text, options in cases:
        try:
            validate_email(text, check_deliverability=False, **options)
        except EmailNotValidError:
            pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="timed passes over the corpus (default 20)")
    args = ap.parse_args()
    cases = load_cases()
    run(cases)  # warm up: imports, regex compilation, idna data
    best = float("inf")
    total = 0.0
    for _ in range(args.rounds):
        start = time.perf_counter_ns()
        run(cases)
        elapsed = time.perf_counter_ns() - start
        best = min(best, elapsed)
        total += elapsed
    n = len(cases)
    print(f"email-validator 2.4.0: {n} cases x {args.rounds} rounds")
    print(f"mean {total / args.rounds / n:.0f} ns/address, best round {best / n:.0f} ns/address")


if __name__ == "__main__":
    main()
