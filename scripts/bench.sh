#!/usr/bin/env bash
# `just bench`: qcow2-engine (`qimg bench`, io_uring and the tokio file backend) against QEMU's
# qcow2 driver (`qemu-img bench -i io_uring`) and the raw file underneath (fio, or
# `qemu-img bench -f raw` as a stand-in when fio is not installed), same cells, same images,
# alternating runs, and the microbenchmarks of the hot paths (scripts/microbench.sh). Writes
# docs/BENCHMARKS.md; the work is done by scripts/bench.py.
#
# Environment (each also a flag of scripts/bench.py, see `scripts/bench.py --help`):
#   BENCH_RUNS=3        measured runs of each side per cell
#   BENCH_SCALE=1       multiplies every request count (0.25 for a quick look)
#   BENCH_DIR=target/bench   where the images live: must be a real disk, not tmpfs
#   BENCH_CELLS=REGEX   only the cells whose id matches (then the table is partial)
#   BENCH_OUT=docs/BENCHMARKS.md
#   BENCH_NOTE=TEXT     a note printed above the table (e.g. "machine busy")
#   BENCH_KEEP=1        keep the images afterwards
#   BENCH_NOLEASE_CELLS=REGEX  the cells that also run qimg built with --cfg qcow2_no_lease
#                       (default: the 4k cells; '' for none, '.' for all)
#   BENCH_MICRO=0       skip the microbenchmarks (then the document has none)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
command -v python3 >/dev/null 2>&1 || { echo "bench: python3 is needed" >&2; exit 1; }
cargo build --release -q -p qimg
# The no-lease build (every lease a no-op) for the ours/no-lease columns: its own target
# directory, since the cfg changes every crate's flags.
if [ "${BENCH_NOLEASE_CELLS-x}" != "" ]; then
  RUSTFLAGS="--cfg qcow2_no_lease" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/bench-nolease" \
    cargo build --release -q -p qimg
fi
[ "${BENCH_MICRO:-1}" = 0 ] || scripts/microbench.sh --no-run
exec python3 scripts/bench.py "$@"
