#!/usr/bin/env bash
# Proof that the race replay tests can see the race: with the lease compiled out
# (--cfg qcow2_no_lease, a test-only switch), every replay test must fail.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(RUSTFLAGS="--cfg qcow2_no_lease" CARGO_TARGET_DIR=target/nolease \
  cargo test -q -p qcow2-engine --test seed_race 2>&1 || true)
summary=$(printf '%s\n' "$out" | grep -E '^test result:' | tail -n 1)
echo "no-lease build: $summary"
passed=$(printf '%s\n' "$summary" | sed -nE 's/.* ([0-9]+) passed.*/\1/p')
failed=$(printf '%s\n' "$summary" | sed -nE 's/.* ([0-9]+) failed.*/\1/p')
if [ -z "$failed" ] || [ "$failed" = 0 ] || [ "$passed" != 0 ]; then
  printf '%s\n' "$out" | tail -n 40
  echo "FAIL: without leases every replay test must fail (passed=$passed failed=$failed)" >&2
  exit 1
fi
echo "ok: all $failed replay tests fail without leases"
