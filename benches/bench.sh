#!/usr/bin/env bash
# `just bench`: qcow2-engine (`qimg bench`, io_uring and the tokio file backend) against QEMU's
# qcow2 driver (`qemu-img bench -i io_uring`) and the raw file underneath (fio, or
# `qemu-img bench -f raw` as a stand-in when fio is not installed), same cells, same images,
# alternating runs, and the microbenchmarks of the hot paths (benches/microbench.sh). Writes
# docs/BENCHMARKS.md; the work is done by benches/bench.py.
#
# Environment (each also a flag of benches/bench.py, see `benches/bench.py --help`):
#   BENCH_RUNS=3        measured runs of each side per cell
#   BENCH_SCALE=1       multiplies every request count (0.25 for a quick look)
#   BENCH_DIR=target/bench   where the images live: must be a real disk, not tmpfs
#   BENCH_CELLS=REGEX   only the cells whose id matches (then the table is partial)
#   BENCH_OUT=docs/BENCHMARKS.md
#   BENCH_NOTE=TEXT     a note printed above the table (e.g. "machine busy")
#   BENCH_KEEP=1        keep the images afterwards
#   BENCH_NOLEASE_CELLS=REGEX  the cells that also run qimg built with --cfg qcow2_no_lease
#                       (default: the 4k cells; '' for none, '.' for all)
#   BENCH_QUEUE_CELLS=REGEX  the cells that also run `qimg bench --queues N`, N = 1, 2, 4
#                       (default: the QD32 4k rewrite and read cells; '' for none)
#   BENCH_MICRO=0       skip the microbenchmarks (then the document has none)
#   BENCH_NO_FIO=1      do not install fio (the raw column then uses the qemu-img stand-in)
#   BENCH_PEERS=1       also run the other Rust qcow2 implementations, imago and qcow2-rs
#                       (benches/peers, its own workspace: built here in release mode, into
#                       target/peers, only when 1; 0 leaves them out and unbuilt)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
command -v python3 >/dev/null 2>&1 || { echo "bench: python3 is needed" >&2; exit 1; }
# fio gives the raw file's figure (the physical limit); without it bench.py falls back to
# `qemu-img bench -f raw`, a stand-in. Installed like qemu-utils when missing (BENCH_NO_FIO=1
# keeps the stand-in).
if [ "${BENCH_NO_FIO:-0}" != 1 ] && ! command -v fio >/dev/null 2>&1; then
  echo "bench: installing fio (the raw file's reference)" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq fio >/dev/null; } ||
    echo "bench: could not install fio; the raw column uses the qemu-img stand-in" >&2
fi
cargo build --release -q -p qimg
# The no-lease build (every lease a no-op) for the ours/no-lease columns: its own target
# directory, since the cfg changes every crate's flags.
if [ "${BENCH_NOLEASE_CELLS-x}" != "" ]; then
  RUSTFLAGS="--cfg qcow2_no_lease" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/bench-nolease" \
    cargo build --release -q -p qimg
fi
# The Rust peers (crates.io dependencies the main workspace never builds).
export BENCH_PEERS="${BENCH_PEERS:-1}"
if [ "$BENCH_PEERS" = 1 ]; then
  CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/peers" \
    cargo build --release -q --manifest-path benches/peers/Cargo.toml
fi
[ "${BENCH_MICRO:-1}" = 0 ] || benches/microbench.sh --no-run
exec python3 benches/bench.py "$@"
