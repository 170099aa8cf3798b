#!/usr/bin/env bash
# The test suite: unit, conformance, QEMU-interop and hostile-input tests of every crate.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo test --workspace "$@"
