# Recipes for qcow2-engine. Every recipe is a thin wrapper: the scripts work without `just`.

# The main job: demo on a default image, verified against qemu-img.
demo *ARGS:
    scripts/demo.sh {{ARGS}}

# Every test.
test *ARGS:
    scripts/test.sh {{ARGS}}

# What CI runs: fmt, clippy, the tests, the race replays and lease models with and without
# their guards (no lease, no keep), 60 s of fuzzing per target, more random schedules.
ci:
    .ci/run

# Formatting and lints.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Benchmarks: qcow2-engine against QEMU's qcow2 driver and the raw file, every cell of issue 6,
# and against itself built without leases on the 4k cells, and the Rust peers imago and
# qcow2-rs (benches/peers); then the microbenchmarks. Writes docs/BENCHMARKS.md. Env:
# BENCH_RUNS (3), BENCH_SCALE (1), BENCH_CELLS, BENCH_NOLEASE_CELLS, BENCH_MICRO, BENCH_NOTE,
# BENCH_PEERS (1; 0 neither builds nor runs the peers) (benches/bench.sh lists them).
bench *ARGS:
    benches/bench.sh {{ARGS}}

# Microbenchmarks of the hot paths (divan, a few seconds once built): L2 entry decoding, a read's
# L2 lookup through the table cache, refcount get/set, lease take and release, the allocator's
# search. Arguments go to divan (a name filter, --sample-count N). `just bench` runs them too.
microbench *ARGS:
    benches/microbench.sh {{ARGS}}

# The lease models under loom: every interleaving within the preemption bound
# (LOOM_MAX_PREEMPTIONS, default 3), then the no-lease and no-keep builds, which must report
# violations.
loom:
    scripts/models.sh loom

# The lease models under shuttle: random and PCT schedules (QCOW2_SHUTTLE_ITERATIONS per
# scenario and scheduler, default 10000), then the no-lease and no-keep builds, which must
# report violations.
shuttle:
    scripts/models.sh shuttle

# Long runs: SEEDS random schedules from a new first seed each time (printed; a failing seed
# prints its replay command), then ROUNDS runs of the step-by-step race replay.
soak SEEDS="10000" ROUNDS="200":
    QCOW2_SCHEDULE_FIRST_SEED="${QCOW2_SCHEDULE_FIRST_SEED:-$(date +%s)000}" QCOW2_SCHEDULE_SEEDS={{SEEDS}} cargo test -q -p qcow2-engine --test random_schedules -- --nocapture
    for i in $(seq {{ROUNDS}}); do cargo test -q -p qcow2-engine --test seed_race >/dev/null || { echo "seed_race failed in round $i" >&2; exit 1; }; done; echo "seed_race: {{ROUNDS}} rounds passed"
    HOSTILE_CASES="${HOSTILE_CASES:-50000}" HOSTILE_CRAFTED_ALL=1 HOSTILE_BASE="${HOSTILE_BASE:-$(date +%s)}" cargo test -q -p qcow2-tests --test hostile_images -- --nocapture

# Fuzz with cargo-fuzz (docs/FUZZING.md): TARGET open_read_write, format_parse or all, for
# SECONDS each; works with the stable toolchain (RUSTC_BOOTSTRAP=1). Extra libFuzzer options after.
# CI runs `FUZZ_BUILD_FLAGS="-s none --codegen-units 16" scripts/fuzz.sh all 60` (no ASan).
fuzz TARGET="all" SECONDS="300" *ARGS:
    scripts/fuzz.sh {{TARGET}} {{SECONDS}} {{ARGS}}
