# Recipes for qcow2-engine. Every recipe is a thin wrapper: the scripts work without `just`.

# The main job: demo on a default image, verified against qemu-img.
demo *ARGS:
    scripts/demo.sh {{ARGS}}

# Every test.
test *ARGS:
    scripts/test.sh {{ARGS}}

# What CI runs.
ci:
    .ci/run

# Formatting and lints.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Read throughput of the engine against the demo image (benchmarks proper come with `qimg bench`).
bench:
    scripts/demo.sh
