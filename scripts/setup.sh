#!/usr/bin/env bash
# Installs what the project needs and a fresh machine may lack: QEMU's tools (the oracle of
# the interop tests and the demo). Sourced by the other scripts; safe to run again.
set -euo pipefail

need_qemu=0
for t in qemu-img qemu-io qemu-nbd; do
  command -v "$t" >/dev/null 2>&1 || need_qemu=1
done
if [ "$need_qemu" = 1 ]; then
  echo "setup: installing qemu-utils (qemu-img, qemu-io, qemu-nbd)" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq qemu-utils >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo is missing (install Rust with rustup)" >&2; exit 1; }
