#!/usr/bin/env bash
# `just microbench`: the divan microbenchmarks of the hot paths (issue 6, item 4), in release:
#   benches/micro/format.rs  L1/L2 entry decoding
#   benches/micro/alloc.rs   refcount get/set in several widths, lease take and release
#                                    (shared/exclusive, waiting and try forms, contended tries),
#                                    the allocator's search (empty, fragmented, nearly full)
#   benches/micro/engine.rs  a read's L2 lookup through the table cache (hit, miss),
#                                    and a whole 4 KiB read from memory
# Runs in a few seconds once built. Arguments go to divan: a filter (`benches/microbench.sh
# lease`), `--sample-count 500`, `--list`...; `--no-run` alone only builds them. `just bench`
# runs this too and puts the medians in docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
benches=(-p qcow2-benches --bench format --bench alloc --bench engine)
if [ "${1:-}" = --no-run ]; then
  exec cargo bench -q --no-run "${benches[@]}"
fi
exec cargo bench -q "${benches[@]}" -- "$@"
