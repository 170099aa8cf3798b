#!/usr/bin/env bash
# Seeds the cargo-fuzz corpora (fuzz/corpus/<target>/) with small images made by qemu-img and
# qemu-io: every cluster size class, compressed (zlib, zstd), extended L2, v2, refcount widths,
# lazy refcounts, internal snapshots, bitmaps, a backing file and a data file (by relative
# names the fuzz targets provide in memory). Generated at run time; nothing binary is
# committed. Safe to run again (adds missing files only).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
root=$PWD
orw=$root/fuzz/corpus/open_read_write
fmt=$root/fuzz/corpus/format_parse
mkdir -p "$orw" "$fmt"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"

img() { # name size options...
  local name=$1 size=$2
  shift 2
  qemu-img create -q -f qcow2 "$@" "$name.qcow2" "$size"
}
fill() { # name [qemu-io commands...]
  local name=$1
  shift
  local args=()
  for c in "$@"; do args+=(-c "$c"); done
  qemu-io -f qcow2 "${args[@]}" "$name.qcow2" >/dev/null
}
mix="write -P 0x11 0 3k|write -P 0x22 5k 1k|write -z 8k 4k|discard 12k 2k|write -P 0x33 60k 8k"
IFS='|' read -r -a writes <<<"$mix"

img c512 1M -o cluster_size=512 && fill c512 "${writes[@]}"
img c4k 2M -o cluster_size=4k && fill c4k "${writes[@]}"
img c64k 4M && fill c64k "${writes[@]}"
img ext16k 2M -o cluster_size=16k,extended_l2=on && fill ext16k "${writes[@]}" "write -P 0x44 17k 1k"
img v2 1M -o compat=0.10,cluster_size=512 && fill v2 "${writes[@]}"
img rc1 1M -o cluster_size=512,refcount_bits=1 && fill rc1 "${writes[@]}"
img rc64 1M -o cluster_size=512,refcount_bits=64 && fill rc64 "${writes[@]}"
img lazy 1M -o cluster_size=512,lazy_refcounts=on && fill lazy "${writes[@]}"
img snap 1M -o cluster_size=512 && fill snap "${writes[@]}"
qemu-img snapshot -c s1 snap.qcow2 && fill snap "write -P 0x55 0 1k"
img bm 1M -o cluster_size=4k && qemu-img bitmap --add bm.qcow2 b0 && fill bm "${writes[@]}"
head -c 65536 /dev/zero | tr '\0' '\141' >src.raw
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4k src.raw comp.qcow2
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4k,compression_type=zstd src.raw zstd.qcow2
truncate -s 1M backing.raw
img back 1M -o cluster_size=512 -b backing.raw -F raw && fill back "write -P 0x66 1k 1k"
img data 1M -o cluster_size=512,data_file=data.raw && fill data "${writes[@]}"

for f in *.qcow2; do
  [ -e "$orw/$f" ] || cp "$f" "$orw/$f"
  # The format target reads its first bytes as a geometry and a count; a header is the most
  # interesting thing for its header parser, and the rest of the file for the table parsers.
  dd if="$f" of="$fmt/header-$f" bs=4096 count=1 status=none
  dd if="$f" of="$fmt/tables-$f" bs=4096 skip=1 count=2 status=none
done
echo "fuzz corpus: $(ls "$orw" | wc -l) images in $orw, $(ls "$fmt" | wc -l) inputs in $fmt"
