#!/usr/bin/env bash
# The main job: build a default image with qemu-img, read it with qcow2-engine from many
# tasks, verify every byte against qemu-img convert, print the throughput.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo run --release -q -p qcow2-engine --example demo -- "$@"
