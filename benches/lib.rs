//! The benchmarks of qcow2-engine live here, beside the crates they measure: `micro/` holds
//! the divan microbenchmarks of the hot paths (L2 entry decoding, the L2 lookup through the
//! table cache, refcounts, leases, the allocator's search, a whole 4 KiB read), run by
//! `just microbench` (microbench.sh); `bench.sh` and `bench.py` (`just bench`) measure `qimg
//! bench` against QEMU's `qemu-img bench` and the raw file, and write docs/BENCHMARKS.md.
