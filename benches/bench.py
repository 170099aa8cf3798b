#!/usr/bin/env python3
"""The `just bench` harness (run through benches/bench.sh, which builds qimg first).

Every cell runs its sides on the same image, alternating A B C D A B C D ... so that drift of
the machine (other builds, page cache, the disk's own state) spreads over all sides alike:

  ours     qimg bench -i io_uring           (qcow2-engine, io_uring backend)
  nolease  the same, qimg built with --cfg qcow2_no_lease (every lease a no-op), on the cells
           matching --nolease-cells only (the 4k cells by default)
  qemu     qemu-img bench -f qcow2 -i io_uring
  threads  qimg bench -i threads            (qcow2-engine, tokio file backend)
  raw      the file underneath: fio (ioengine=io_uring) when installed, otherwise
           qemu-img bench -f raw on a preallocated raw file of the image's size (a stand-in)
  imago    with --peers: the other Rust qcow2 implementations, through benches/peers'
  qcow2-rs peer-bench (the same options, the same images; PEER_SKIPS lists the cells a peer
           cannot run and why)
  q1 q2 q4 qimg bench -i io_uring --queues N: one image shared by N threads, each with its
           own runtime and ring, the requests in flight spread over them (on the cells
           matching --queue-cells only)

The QD1 cells run every side pinned (taskset) to the CPU that takes the interrupts of the
disk under the bench directory, when one CPU takes them all (--qd1-cpu): a request at a time
goes as fast as the thread waiting for it and the interrupt meet, and an unpinned thread's
place is the scheduler's choice, not the engine's (a side polling its ring stays where it
started; one sleeping in a system call is pulled to the CPU that wakes it).

qimg bench and qemu-img bench get the same options, so they send the same requests in the
same order; the time is theirs ("Run completed in X seconds.", the request loop only) and
IOPS = requests / time. After every run of our engine (either build) that wrote, `qemu-img
check` must find no error and no leak, else the harness stops at once and keeps the image. On
the first round of every cell that allocates, the images written by our engine and by QEMU
must also compare equal (`qemu-img compare`). The peers get the same checks, but a peer's
failure only marks that peer's column in the cell (the other sides go on): `qemu-img check`
after every write run, and on the first round of an allocating cell `qemu-img compare` with
QEMU's image and a `qemu-io` read-back of the last block written.

Before the cells, the divan microbenchmarks of the hot paths run (benches/microbench.sh, a few
seconds) and their medians go into the same document.

Results go to docs/BENCHMARKS.md above the marker line; whatever is below the marker is kept.
Standard library only (Python 3.11).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
IMG_SIZE = 4 * GiB
CLUSTER = 64 * KiB
# An odd multiple of 4 KiB: request i goes to (i * STEP) mod 4 GiB, a permutation of the 2^20
# 4 KiB units (consecutive requests are 48 MiB apart), the closest qemu-img bench gets to
# random I/O. Both tools wrap modulo the image size.
PERM_STEP = 12345 * 4 * KiB
SPAN_VIRT = 1 * TiB
SPAN_ALLOC = 64 * GiB
PATTERN = 0xAA  # written by the cells; not zero, so no zero detection can shortcut a write
PREP_PATTERN = 0x55
MARKER = "<!-- bench.sh: everything above this line is rewritten by `just bench`; hand-written sections below it are kept -->"
SIDES = ("ours", "nolease", "qemu", "threads", "raw", "q1", "q2", "q4", "imago", "qcow2-rs")
# `qimg bench --queues N` (side -> N), on the cells matching --queue-cells.
QUEUES = {"q1": 1, "q2": 2, "q4": 4}
# The cells that also run with several queues: the QD32 4k cells of a prepared image, where
# one thread's CPU time is what limits a run; and, with one queue only (the depth is not
# split below 1), the O_DIRECT 4k cells at QD1, where a queue's polling (32 µs, as QEMU's
# I/O threads) shows against tokio-uring's sleep and wake-up.
QUEUE_CELLS = r"^((rewrite4k|read4k)-(none|writeback)-qd32|(alloc4k|rewrite4k|read4k)-none-qd1)$"
# The other Rust qcow2 implementations (--peers), run by benches/peers' peer-bench.
PEERS = ("imago", "qcow2-rs")
# (peer, regex of cell ids) -> why the peer does not run those cells.
# Empty: imago 0.2.6 and qcow2-rs 0.1.6 run every cell (allocating writes, O_DIRECT, flushes,
# the 1 TiB image).
PEER_SKIPS: dict[tuple[str, str], str] = {}
# What benches/peers/Cargo.toml pins.
PEER_VERSIONS = "imago 0.2.6, qcow2-rs 0.1.6"
# The sides that run our engine (checked after writing, never run again after a crash).
OURS = ("ours", "nolease", "threads") + tuple(QUEUES)
# The cells that also run the no-lease build (--nolease-cells): the 4k cells, where a lease per
# request weighs most. All cells would add a fifth of the run and more than `just bench`'s
# budget allows on a busy machine.
NOLEASE_CELLS = r"^(alloc4k|rewrite4k|read4k)-"
VERBOSE = False
ROOT = Path(__file__).resolve().parent.parent
# Where bench.sh's cargo builds go (CARGO_TARGET_DIR, relative to the repository, or target/).
TARGET = ROOT / os.environ.get("CARGO_TARGET_DIR", "target")


@dataclasses.dataclass
class Cell:
    id: str
    title: str
    kind: str  # alloc (fresh image each run), rewrite / read (prepared 4 GiB image), span
    size: int
    step: int
    write: bool
    depth: int
    cache: str
    count: int
    flush: int | None = None

    def bench_args(self) -> list[str]:
        a = ["-c", str(self.count), "-d", str(self.depth), "-s", str(self.size),
             "-S", str(self.step), "-t", self.cache]
        if self.write:
            a += ["-w", "--pattern", str(PATTERN)]
        if self.flush:
            a += ["--flush-interval", str(self.flush)]
        return a

    @property
    def pattern_name(self) -> str:
        if self.kind == "span":
            return "stride"
        if self.step == self.size:
            return "seq"
        if self.count * self.step <= IMG_SIZE:
            return "stride"
        return "perm"


# Requests per run at BENCH_SCALE=1, chosen on the 2-core reference machine so that the
# slowest side of each cell runs for about 0.5-1.5 s: (kind, cache, depth) -> count. The
# other allocating 4k cells are kept smaller: each run needs a fresh image, removed after it
# (0.05-0.4 s for 4,000 allocations on the reference machine's discard-mounted ext4; more
# where the host file is fragmented). The O_DIRECT QD1 one runs 4,000 requests: with 800
# (~40 ms), the sides that print milliseconds were quantised to 2.5%.
COUNTS = {
    ("alloc4k", "none", 1): 4000, ("alloc4k", "none", 32): 1600,
    ("alloc4k", "writeback", 1): 1600, ("alloc4k", "writeback", 32): 3200,
    ("rewrite4k", "none", 1): 6000, ("rewrite4k", "none", 32): 12000,
    ("rewrite4k", "writeback", 1): 15000, ("rewrite4k", "writeback", 32): 30000,
    ("read4k", "none", 1): 6000, ("read4k", "none", 32): 30000,
    ("read4k", "writeback", 1): 40000, ("read4k", "writeback", 32): 60000,
    ("seq64k", "none", 1): 1500, ("seq64k", "none", 32): 2500,
    ("seq64k", "writeback", 1): 4000, ("seq64k", "writeback", 32): 4000,
    ("seq1M", "none", 1): 400, ("seq1M", "none", 32): 600,
    ("seq1M", "writeback", 1): 1500, ("seq1M", "writeback", 32): 2000,
    ("flush64", "none", 32): 1024, ("flush64", "writeback", 32): 1536,
    ("span", "none", 1): 30000, ("span", "none", 32): 40000,
    ("span", "writeback", 1): 40000, ("span", "writeback", 32): 60000,
}


def make_cells(scale: float) -> list[Cell]:
    def n(key, cap=None):
        c = max(16, int(COUNTS[key] * scale))
        return min(c, cap) if cap else c

    clusters = IMG_SIZE // CLUSTER
    cells = []
    for cache in ("none", "writeback"):
        for d in (1, 32):
            sfx = f"{cache}-qd{d}"
            cells += [
                # Step = cluster size on a fresh image: every write allocates a new cluster
                # (capped at one pass, so no request ever lands on an allocated one).
                Cell(f"alloc4k-{sfx}", "4k allocating writes", "alloc", 4 * KiB, CLUSTER,
                     True, d, cache, n(("alloc4k", cache, d), clusters)),
                Cell(f"rewrite4k-{sfx}", "4k rewrites of allocated data", "rewrite", 4 * KiB,
                     PERM_STEP, True, d, cache, n(("rewrite4k", cache, d))),
                Cell(f"read4k-{sfx}", "4k reads of allocated data", "read", 4 * KiB,
                     PERM_STEP, False, d, cache, n(("read4k", cache, d))),
                Cell(f"seq64k-{sfx}", "64k sequential allocating writes", "alloc", 64 * KiB,
                     64 * KiB, True, d, cache, n(("seq64k", cache, d), clusters)),
                Cell(f"seq1M-{sfx}", "1M sequential reads", "read", MiB, MiB, False, d, cache,
                     n(("seq1M", cache, d), IMG_SIZE // MiB)),
            ]
    for cache in ("none", "writeback"):
        cells.append(Cell(f"flush64-{cache}-qd32", "4k allocating writes, flush every 64",
                          "alloc", 4 * KiB, CLUSTER, True, 32, cache,
                          max(64, n(("flush64", cache, 32), clusters) // 64 * 64), flush=64))
    for cache in ("none", "writeback"):
        for d in (1, 32):
            c = n(("span", cache, d), SPAN_ALLOC // CLUSTER)
            # qemu-img bench has only a linear stride, and no stride can scatter over 64 GiB of
            # a 1 TiB image (it wraps modulo 1 TiB): walk the span once, every request in a
            # fresh cluster, all 128 L2 tables (8 MiB of L2) loaded in one run.
            step = max(CLUSTER, SPAN_ALLOC // c // (4 * KiB) * (4 * KiB))
            cells.append(Cell(f"span1T-{cache}-qd{d}",
                              "1 TiB image: 4k reads striding over 64 GiB allocated", "span",
                              4 * KiB, step, False, d, cache, c))
    return cells


# ---------------------------------------------------------------------------------------------


class PeerError(Exception):
    """A peer's run that failed or left an image QEMU finds wrong: that peer fails the cell."""


def peer_skip(peer: str, cell: Cell) -> str:
    """Why `peer` does not run `cell` ('' when it does)."""
    for (p, pat), why in PEER_SKIPS.items():
        if p == peer and re.search(pat, cell.id):
            return why
    return ""


def die(msg: str, code: int = 1):
    print(f"\nbench: FAILED: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def sh(cmd: list[str], timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if VERBOSE:
        print(f"  ({time.time() - t:5.2f} s  {' '.join(cmd)})", flush=True)
    if check and p.returncode != 0:
        die(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout}{p.stderr}")
    return p


def cpu_list(text: str) -> set[int]:
    """The CPUs of a kernel CPU list ("0-2,5")."""
    cpus = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def irq_cpu(path: Path) -> tuple[int | None, str]:
    """The one CPU that takes the I/O interrupts of the disk holding `path`, and what was
    found: None when the disk has no interrupts of its own (device mapper, loop) or several
    CPUs take them (a queue per CPU: every CPU completes its own requests)."""
    st = os.stat(path)
    sysdev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
    if (sysdev / "partition").exists():
        sysdev = sysdev.parent
    if not (sysdev / "device").exists():
        return None, f"{sysdev.name} has no device of its own"
    dev = (sysdev / "device").resolve().name  # virtio1, nvme0, ...
    cpus: set[int] = set()
    irqs = []
    for line in Path("/proc/interrupts").read_text().splitlines()[1:]:
        fields = line.split()
        name = fields[-1] if fields else ""
        if re.match(rf"{re.escape(dev)}(-|q|$)", name) and "config" not in name:
            irq = fields[0].rstrip(":")
            aff = Path(f"/proc/irq/{irq}/effective_affinity_list")
            if aff.exists():
                irqs.append(name)
                cpus |= cpu_list(aff.read_text())
    what = f"{sysdev.name} ({dev}): interrupts {', '.join(irqs) or 'none found'}"
    if len(cpus) == 1:
        cpu = min(cpus)
        return cpu, f"{what} on CPU {cpu}"
    return None, f"{what} on CPUs {sorted(cpus)}"


class Bench:
    def __init__(self, args):
        self.args = args
        self.dir = Path(args.dir).resolve()
        self.qimg = args.qimg
        self.fio = shutil.which("fio")
        self.results: dict[str, dict[str, list[float]]] = {}
        self.errors: dict[str, str] = {}
        self.oddities: list[str] = []
        self.checks = 0
        self.compares = 0
        # cell id -> peer -> why that peer failed the cell (the cell itself goes on).
        self.peer_errors: dict[str, dict[str, str]] = {}
        self.peer_checks = 0
        self.peer_compares = 0
        self.readbacks = 0
        self.rm_secs = 0.0
        # The CPU the QD1 cells run on (None: unpinned), and why.
        self.pin: int | None = None
        self.pin_why = "not pinned (--qd1-cpu none)"

    # --- images ------------------------------------------------------------------------------
    def p(self, name: str) -> str:
        return str(self.dir / name)

    def prepare(self, cells: list[Cell]):
        self.dir.mkdir(parents=True, exist_ok=True)
        kinds = {c.kind for c in cells}
        reuse = self.args.reuse
        raw = self.p("raw.img")
        have_raw = reuse and os.path.exists(raw) and os.path.getsize(raw) == IMG_SIZE
        if kinds - {"span"} and not have_raw:
            t = time.time()
            self.rm(raw)
            # Written in full (not fallocate): the physical limit of rewriting real blocks.
            sh(["qemu-img", "create", "-q", "-f", "raw", "-o", "preallocation=full", raw,
                str(IMG_SIZE)])
            print(f"prepared raw.img (4 GiB, preallocation=full) in {time.time() - t:.1f} s",
                  flush=True)
        if kinds & {"rewrite", "read"}:
            data = self.p("data.qcow2")
            ok = reuse and os.path.exists(data) and self.check(data, quiet=True)
            if not ok:
                t = time.time()
                self.rm(data)
                sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"cluster_size={CLUSTER}", data, str(IMG_SIZE)])
                # The first pass: QEMU writes every cluster once (1M sequential writes), so
                # the cells read and rewrite allocated clusters holding real blocks.
                sh(["qemu-img", "bench", "-q", "-f", "qcow2", "-i", "io_uring", "-t", "none",
                    "-w", "--pattern", str(PREP_PATTERN), "-s", str(MiB), "-c",
                    str(IMG_SIZE // MiB), "-d", "16", data])
                out = sh(["qemu-img", "check", "-f", "qcow2", data]).stdout
                if f"{IMG_SIZE // CLUSTER}/{IMG_SIZE // CLUSTER} = 100.00% allocated" not in out:
                    die(f"data.qcow2 is not fully allocated after the first pass:\n{out}")
                print(f"prepared data.qcow2 (4 GiB, every cluster written) in "
                      f"{time.time() - t:.1f} s", flush=True)
        if "span" in kinds:
            span = self.p("span.qcow2")
            if not (reuse and os.path.exists(span) and self.check(span, quiet=True)):
                self.rm(span)
                # L2 tables and refcounts for the first 64 GiB without writing 64 GiB of data:
                # metadata preallocation points every L2 entry of that range at a host cluster
                # (plain allocated entries, not zero flags) and only sizes the host file, which
                # stays sparse (~10 MiB on disk); growing the virtual disk to 1 TiB afterwards
                # only enlarges the L1 table. Reads then go through L2 to host holes.
                sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"cluster_size={CLUSTER},preallocation=metadata", span, str(SPAN_ALLOC)])
                sh(["qemu-img", "resize", "-q", "-f", "qcow2", span, str(SPAN_VIRT)])
            rawspan = self.p("rawspan.img")
            self.rm(rawspan)
            with open(rawspan, "wb") as f:
                f.truncate(SPAN_VIRT)  # sparse, like the data clusters of span.qcow2

    def rm(self, path: str):
        t = time.time()
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        self.rm_secs += time.time() - t

    def fresh(self, side: str) -> str:
        img = self.p(f"fresh-{side}.qcow2")
        self.rm(img)
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", img,
            str(IMG_SIZE)])
        return img

    def check(self, img: str, quiet: bool = False) -> bool:
        p = sh(["qemu-img", "check", "-f", "qcow2", img], check=False)
        if quiet:
            return p.returncode == 0
        self.checks += 1
        if p.returncode != 0 or "No errors were found" not in p.stdout:
            die(f"qemu-img check found errors ({p.returncode}) on {img}, written by our "
                f"engine; image kept for inspection:\n{p.stdout}{p.stderr}", code=2)
        return True

    def check_peer(self, cell: Cell, side: str, img: str):
        """A peer's write run: `qemu-img check` clean, else the peer fails this cell."""
        p = sh(["qemu-img", "check", "-f", "qcow2", img], check=False)
        self.peer_checks += 1
        if p.returncode != 0 or "No errors were found" not in p.stdout:
            raise PeerError(f"qemu-img check found errors ({p.returncode}) on {img} after "
                            f"{side} wrote it:\n{p.stdout}{p.stderr}")

    def read_back(self, cell: Cell, side: str, img: str):
        """The last block a peer's allocating run wrote holds the pattern (read by qemu-io)."""
        off = min((cell.count - 1) * cell.step % IMG_SIZE, IMG_SIZE - cell.size)
        p = sh(["qemu-io", "-f", "qcow2", "-r", "-c", f"read -P {PATTERN} {off} {cell.size}",
                img], check=False)
        self.readbacks += 1
        if p.returncode != 0 or "verification failed" in p.stdout + p.stderr:
            raise PeerError(f"{side}: the block written at offset {off} does not read back "
                            f"as pattern {PATTERN} (qemu-io):\n{p.stdout}{p.stderr}")

    # --- one run -----------------------------------------------------------------------------
    def command(self, cell: Cell, side: str, img: str) -> list[str]:
        cmd = self.side_command(cell, side, img)
        if cell.depth == 1 and self.pin is not None:
            return ["taskset", "-c", str(self.pin)] + cmd
        return cmd

    def side_command(self, cell: Cell, side: str, img: str) -> list[str]:
        if side in OURS:
            qimg = self.args.qimg_nolease if side == "nolease" else self.qimg
            aio = "threads" if side == "threads" else "io_uring"
            queues = ["--queues", str(QUEUES[side])] if side in QUEUES else []
            return [qimg, "bench", "-f", "qcow2", "-i", aio] + queues + cell.bench_args() + [img]
        if side == "qemu":
            return ["qemu-img", "bench", "-f", "qcow2", "-i", "io_uring"] + cell.bench_args() + [img]
        if side in PEERS:
            return [self.args.peer_bench, side] + cell.bench_args() + [img]
        if self.fio:
            region = SPAN_ALLOC if cell.kind == "span" else IMG_SIZE
            mode = "write" if cell.write else "read"
            pat = cell.pattern_name
            rw = {"seq": mode, "stride": f"{mode}:{cell.step - cell.size}",
                  "perm": f"rand{mode}"}[pat]
            cmd = ["fio", "--name=raw", f"--filename={img}", "--ioengine=io_uring",
                   f"--direct={1 if cell.cache == 'none' else 0}", f"--bs={cell.size}",
                   f"--iodepth={cell.depth}", f"--size={region}", f"--number_ios={cell.count}",
                   f"--rw={rw}", "--invalidate=0", "--randrepeat=1", "--output-format=json"]
            if cell.flush:
                cmd.append(f"--fsync={cell.flush}")
            return cmd
        return ["qemu-img", "bench", "-f", "raw", "-i", "io_uring"] + cell.bench_args() + [img]

    def run(self, cell: Cell, side: str, keep: bool) -> tuple[float, str, str]:
        """Returns (IOPS, first output line, image)."""
        if side == "raw":
            img = self.p("rawspan.img" if cell.kind == "span" else "raw.img")
        elif cell.kind == "alloc":
            img = self.fresh(side)
        elif cell.kind == "span":
            img = self.p("span.qcow2")
        else:
            img = self.p("data.qcow2")
        cmd = self.command(cell, side, img)
        for attempt in range(3):
            t = time.time()
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if self.args.verbose:
                print(f"  {side:8} {time.time() - t:6.2f} s  {' '.join(cmd)}", flush=True)
            # QEMU's crashes are QEMU's: note them and run again (on the same image; a fresh
            # one for allocating cells). Our engine's are not retried.
            if p.returncode >= 0 or side in OURS + PEERS or attempt == 2:
                break
            self.oddities.append(f"`{' '.join(cmd)}` was killed by signal {-p.returncode} "
                                 f"(run again){': ' + p.stderr.strip() if p.stderr.strip() else ''}")
            print(f"  {side}: killed by signal {-p.returncode}, running again", flush=True)
            if cell.kind == "alloc" and side != "raw":
                img = self.fresh(side)
                cmd = self.command(cell, side, img)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}{p.stderr}")
        if side == "raw" and self.fio:
            job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
            iops = job["write" if cell.write else "read"]["iops"]
            first = ""
        else:
            m = re.search(r"Run completed in\s+([0-9.]+) seconds\.", p.stdout)
            if not m:
                raise RuntimeError(f"{' '.join(cmd)}: no 'Run completed' line:\n{p.stdout}")
            secs = float(m.group(1))
            if secs <= 0:
                raise RuntimeError(f"{' '.join(cmd)}: zero time; raise the count")
            iops = cell.count / secs
            first = p.stdout.splitlines()[0] if p.stdout else ""
        if side in OURS and cell.write:
            self.check(img)
        if side in PEERS and cell.write:
            self.check_peer(cell, side, img)
        if cell.kind == "alloc" and side != "raw" and not keep:
            self.rm(img)
        return iops, first, img

    # --- one cell ----------------------------------------------------------------------------
    def sides(self, cell: Cell) -> list[str]:
        nolease = bool(self.args.nolease_cells) and re.search(self.args.nolease_cells, cell.id)
        queues = bool(self.args.queue_cells) and re.search(self.args.queue_cells, cell.id)
        return [s for s in SIDES if (s != "nolease" or nolease)
                and (s not in QUEUES or (queues and QUEUES[s] <= cell.depth))
                and (s not in PEERS or (self.args.peers and not peer_skip(s, cell)))]

    def cell(self, cell: Cell):
        sides = self.sides(cell)
        res = {s: [] for s in sides}
        self.results[cell.id] = res
        t0 = time.time()
        try:
            if cell.cache == "writeback" and not cell.write:
                # Unmeasured warm-up: the first reader would otherwise pay for the page cache.
                for side in ("qemu", "raw"):
                    self.run(cell, side, keep=False)
            for r in range(self.args.runs):
                firsts, imgs = {}, {}
                first_round = r == 0 and cell.kind == "alloc"
                for side in sides:
                    if side in self.peer_errors.get(cell.id, {}):
                        continue
                    if side in PEERS:
                        try:
                            iops, firsts[side], imgs[side] = self.run(cell, side,
                                                                      keep=first_round)
                            if first_round:
                                self.read_back(cell, side, imgs[side])
                        except (RuntimeError, PeerError, subprocess.TimeoutExpired) as e:
                            self.peer_errors.setdefault(cell.id, {})[side] = str(e)
                            print(f"  {cell.id}: {side} FAILED: {str(e)[:300]}", flush=True)
                            imgs.pop(side, None)
                            continue
                    else:
                        iops, firsts[side], imgs[side] = self.run(cell, side, keep=first_round)
                    res[side].append(iops)
                if r == 0 and firsts["ours"] != firsts["qemu"]:
                    self.oddities.append(f"{cell.id}: qimg printed `{firsts['ours']}`, "
                                         f"qemu-img printed `{firsts['qemu']}`")
                if first_round:
                    for side in [s for s in sides if s in OURS]:
                        p = sh(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2",
                                imgs[side], imgs["qemu"]], check=False)
                        self.compares += 1
                        if p.returncode != 0:
                            die(f"{cell.id}: the image written by our engine ({side}) differs "
                                f"from QEMU's after the same requests (qemu-img compare "
                                f"{p.returncode}); images kept in {self.dir}\n{p.stdout}"
                                f"{p.stderr}", code=2)
                    for side in [s for s in sides if s in PEERS and s in imgs]:
                        p = sh(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2",
                                imgs[side], imgs["qemu"]], check=False)
                        self.peer_compares += 1
                        if p.returncode != 0:
                            self.peer_errors.setdefault(cell.id, {})[side] = (
                                f"the image {side} wrote differs from QEMU's after the same "
                                f"requests (qemu-img compare {p.returncode}):\n{p.stdout}"
                                f"{p.stderr}")
                    for side in sides:
                        if side != "raw" and side in imgs:
                            self.rm(imgs[side])
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            self.errors[cell.id] = str(e)
            print(f"\n{cell.id}: FAILED: {e}", file=sys.stderr, flush=True)
            return
        med = {s: statistics.median(v) for s, v in res.items() if v}
        nolease = (f"  no-lease {med['nolease']:9.0f}  ours/no-lease "
                   f"{med['ours'] / med['nolease']:5.2f}" if "nolease" in med else "")
        failed = self.peer_errors.get(cell.id, {})
        peers = "".join(f"  {s} {'failed':>9}" if s in failed else f"  {s} {med[s]:9.0f}"
                        for s in PEERS if s in sides)
        peers += "".join(f"  {s} {med[s]:9.0f}" for s in QUEUES if s in med)
        print(f"{cell.id:24} ours {med['ours']:9.0f}  qemu {med['qemu']:9.0f}  "
              f"threads {med['threads']:9.0f}  raw {med['raw']:9.0f}  "
              f"ours/qemu {med['ours'] / med['qemu']:5.2f}{nolease}{peers}  "
              f"({time.time() - t0:.0f} s)", flush=True)


# --- microbenchmarks ------------------------------------------------------------------------

# What each divan benchmark measures, for the document (the bench files say more).
MICRO_WHAT = {
    "format::l1_entry_l2_offset": "an L1 entry's L2 table offset, checked",
    "format::l2_entry_read_decode": "one L2 entry read from a table and decoded, by entry kind",
    "engine::l2_lookup_hit": "a read's mapping before its I/O (metadata lock, L1, cached L2 "
                             "table, entries decoded, a lease per cluster), by read length",
    "engine::l2_lookup_miss": "the same for 4 KiB, missing the L2 cache every time (a 64 KiB "
                              "table copied in from memory, one evicted), by cache size in tables",
    "engine::read_4k_hit": "a whole 4 KiB read of an in-memory image, for scale",
    "alloc::refcount_get": "a cluster's refcount from the loaded blocks, by width in bits",
    "alloc::refcount_set": "setting a cluster's refcount, by width in bits",
    "alloc::lease_try_shared_release": "a read's lease: try_shared and drop, nobody else on "
                                       "the cluster (its entry made and removed)",
    "alloc::lease_try_shared_release_joined": "the same while another reader holds the cluster",
    "alloc::lease_shared_release": "shared (the waiting form), uncontended, and drop",
    "alloc::lease_try_exclusive_release": "a free's lease: try_exclusive and drop, uncontended",
    "alloc::lease_exclusive_release": "exclusive (the waiting form), uncontended, and drop",
    "alloc::lease_try_exclusive_contended": "try_exclusive failing: a reader holds the cluster",
    "alloc::lease_try_shared_contended": "try_shared failing: the cluster is being freed",
    "alloc::allocate_empty": "allocating N clusters in a fresh 4 GiB image (the search starts "
                             "at cluster 0, as after open)",
    "alloc::allocate_fragmented": "the same with 7 of every 8 clusters in use: a run of 8 is "
                                  "only found past the end of the file",
    "alloc::allocate_nearly_full": "the same with all but the last 16 of 65,536 clusters in use",
}
TIME_UNITS = {"ps": 1e-3, "ns": 1.0, "µs": 1e3, "us": 1e3, "ms": 1e6, "s": 1e9}


def parse_divan(out: str) -> list[dict]:
    """divan's tree tables -> [{name, fastest, median, mean, samples, iters}] (times in ns).

    Each binary prints a header ("alloc   fastest │ slowest │ ...") and a tree of benchmarks
    and their arguments ("├─ ", "│  ", "╰─ ": three characters a level); the columns are cut at
    the header's "│" positions (the tree uses the same character)."""
    rows, path, seps = [], [], []
    time_re = re.compile(r"^([0-9.]+) (ps|ns|µs|us|ms|s)$")
    for line in out.splitlines():
        if "fastest" in line and "median" in line:
            seps = [i for i, ch in enumerate(line) if ch == "│"]
            path = [line.split()[0]]
            continue
        if len(seps) != 5 or len(line) <= seps[-1]:
            continue
        bounds = [0] + seps + [len(line)]
        cols = [line[bounds[i] + (i > 0):bounds[i + 1]].strip() for i in range(6)]
        m = re.match(r"^([│├╰─ ]*)(\S+)\s*(.*)$", line[:seps[0]])
        if not m:
            continue
        depth = len(m.group(1)) // 3
        path = path[:depth] + [m.group(2)]
        if not m.group(3).strip():
            continue  # a group: its arguments follow
        times = []
        for t in (m.group(3).strip(), cols[2], cols[3]):
            tm = time_re.match(t)
            if not tm:
                raise ValueError(f"cannot read a time in divan's line: {line!r}")
            times.append(float(tm.group(1)) * TIME_UNITS[tm.group(2)])
        rows.append({"name": "::".join(path[:2]) + "".join(f"/{p}" for p in path[2:]),
                     "fastest": times[0], "median": times[1], "mean": times[2],
                     "samples": int(cols[4]), "iters": int(cols[5])})
    return rows


def microbench() -> tuple[list[dict], float, str]:
    """Runs benches/microbench.sh (built by bench.sh): (rows, seconds, error or '')."""
    t = time.time()
    p = subprocess.run([str(ROOT / "benches" / "microbench.sh"), "--color", "never"],
                       capture_output=True, text=True, timeout=600)
    secs = time.time() - t
    if p.returncode != 0:
        return [], secs, f"benches/microbench.sh exited {p.returncode}:\n{p.stdout}{p.stderr}"
    try:
        rows = parse_divan(p.stdout)
    except ValueError as e:
        return [], secs, str(e)
    m = re.search(r"Timer precision: (.+)", p.stdout + p.stderr)
    for r in rows:
        r["precision"] = m.group(1).strip() if m else "?"
    return rows, secs, "" if rows else f"no benchmark in the output:\n{p.stdout}"


def fmt_ns(ns: float) -> str:
    for unit, scale in (("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


# --- the report ----------------------------------------------------------------------------


def fmt_iops(v: list[float]) -> str:
    if not v:
        return "–"
    return f"{statistics.median(v):,.0f} [{min(v):,.0f}–{max(v):,.0f}]"


def ratio(a: list[float], b: list[float]) -> str:
    if not a or not b:
        return "–"
    return f"{statistics.median(a) / statistics.median(b):.2f}"


def first_line(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0].strip()
    except (OSError, IndexError):
        return "?"


def machine(bench: Bench) -> list[tuple[str, str]]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    fs = " ".join(first_line(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(bench.dir)]).split())
    # The commit measured; "-dirty" when files other than the document this run rewrites differ.
    git = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no",
                              "--", ".", ":(exclude)docs/BENCHMARKS.md"],
                             capture_output=True, text=True).stdout.strip()
    if changed:
        git += "-dirty"
    raw = (f"{first_line(['fio', '--version'])}, ioengine=io_uring, direct=1 (cache none) / "
           "direct=0 (writeback)" if bench.fio else
           "**fio not installed**: `qemu-img bench -f raw -i io_uring` on a preallocated raw "
           "file of the same size stands in")
    peers = ([("Rust peers", f"{PEER_VERSIONS} (`benches/peers`, release build)")]
             if bench.args.peers else [])
    return peers + [
        ("CPUs (nproc)", first_line(["nproc"])),
        ("CPU", cpu),
        ("memory", f"{mem_kb / (1 << 20):.1f} GiB"),
        ("kernel", first_line(["uname", "-r"])),
        ("bench directory", f"`{os.path.relpath(bench.dir, ROOT)}` on {fs}"),
        ("qemu-img", first_line(["qemu-img", "--version"])),
        ("raw reference", raw),
        ("QD1 cells", f"every side pinned to CPU {bench.pin}: {bench.pin_why}"
         if bench.pin is not None else f"not pinned: {bench.pin_why}"),
        ("qimg", f"`{git}` (release build); no lease: the same with `RUSTFLAGS=\"--cfg "
                 f"qcow2_no_lease\"` in `{os.path.relpath(bench.args.qimg_nolease, ROOT)}`"),
    ]


def micro_section(micro: tuple[list[dict], float, str] | None) -> list[str]:
    L = ["## Microbenchmarks", ""]
    if micro is None:
        return L + ["Not run (`BENCH_MICRO=0`); `just microbench` runs them alone.", ""]
    rows, secs, err = micro
    if err:
        return L + ["**Failed**:", "", "```", err.strip()[:2000], "```", ""]
    order = list(MICRO_WHAT)
    rows = sorted(rows, key=lambda r: order.index(r["name"].split("/")[0])
                  if r["name"].split("/")[0] in order else len(order))
    L += ["The divan benchmarks of the hot paths (`benches/micro`; `just microbench` runs them alone), in the same run as the "
          f"cells: {len(rows)} benchmarks in {secs:.0f} s (divan's timer precision: "
          f"{rows[0]['precision']}). Time per iteration: the median of "
          "divan's samples, the fastest sample and the mean beside it; one thread, nothing "
          "contended unless the name says so. The engine's lookups run on an image in memory "
          "(`MemoryOpener`), polled to completion without a runtime.", "",
          "| benchmark | argument | median | fastest | mean | samples × iterations | what |",
          "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    last = None
    for r in rows:
        group, _, arg = r["name"].partition("/")
        what = MICRO_WHAT.get(group, "") if group != last else "〃"
        last = group
        L.append(f"| `{group}` | {arg} | {fmt_ns(r['median'])} | {fmt_ns(r['fastest'])} | "
                 f"{fmt_ns(r['mean'])} | {r['samples']} × {r['iters'] // r['samples']} | {what} |")
    return L + [""]


def peer_cell(bench: Bench, c: Cell, peer: str) -> str:
    if peer in bench.peer_errors.get(c.id, {}):
        return "**failed** (below)"
    if peer_skip(peer, c):
        return "skipped (below)"
    return fmt_iops(bench.results[c.id].get(peer, []))


def peers_section(bench: Bench, cells: list[Cell]) -> list[str]:
    L = ["### The Rust peers", "",
         "*imago* and *qcow2-rs* are the other Rust qcow2 implementations on crates.io, run "
         f"by `benches/peers` (`peer-bench`, its own Cargo workspace: {PEER_VERSIONS}) with "
         "qemu-img bench's options on the same images, alternating with the other sides. "
         "Each through its own async API at its best: imago's native async `FormatAccess` "
         "over `Qcow2<File>` (its only file backend does blocking `preadv`/`pwritev` inside "
         "its futures, which are not `Send`, so QD requests run in parallel from QD threads, "
         "each with a current-thread tokio runtime, on the one image, as QEMU's thread pool "
         "would); qcow2-rs on its tokio-uring backend (`qcow2_setup_dev_uring`, one thread, "
         "one ring, QD local tasks). Both open with O_DIRECT for cache `none`. The time is "
         "the request loop's, like qemu-img bench's: their final flush (imago's `flush` and "
         "`sync`, qcow2-rs's `flush_meta` and `fsync_range`: both keep metadata updates in "
         "memory until then) is not in it, nor is QEMU's.", "",
         f"Verification: {bench.peer_checks} `qemu-img check` runs after the peers' write "
         f"runs, {bench.readbacks} `qemu-io` read-backs (`read -P {PATTERN}`) of the last "
         f"block a peer's allocating run wrote, {bench.peer_compares} `qemu-img compare` runs "
         "of a peer's freshly allocated image against QEMU's after the same requests (first "
         "round of every allocating cell). A failure marks only that peer's column (listed "
         "below).", ""]
    skips = {(p, why) for c in cells for p in PEERS if (why := peer_skip(p, c))}
    if skips:
        L += ["Skipped:", ""] + [f"- {p}: {why}" for p, why in sorted(skips)] + [""]
    failed = [(c, p, e) for c, m in bench.peer_errors.items() for p, e in m.items()]
    if failed:
        L += ["Failed:", ""]
        for c, p, e in failed:
            L += [f"- `{c}`, {p}:", "", "```", e.strip()[:1500], "```", ""]
    return L


def queues_section(bench: Bench, cells: list[Cell]) -> list[str]:
    """The cells run with `--queues N`: IOPS by number of queues."""
    rows = [c for c in cells if c.id not in bench.errors
            and any(bench.results.get(c.id, {}).get(s) for s in QUEUES)]
    if not rows:
        return []
    ncpu = os.cpu_count() or 1
    L = ["### One image, several queues", "",
         "`qimg bench -i io_uring --queues N`: one image shared by N threads, each running a "
         "current-thread tokio runtime with its own ring (`blockio::RingOpener`) and, with "
         "no more queues than CPUs, polling it for up to 32 µs before sleeping with requests "
         "in flight (`RingOpener::park_hook`, as QEMU's I/O threads poll), taking requests from one stream, the cell's requests "
         "in flight spread over them (as a VMM serves several virtio queues from several I/O "
         "threads; at QD1 one queue only). *ours* is the same cell without `--queues` (one "
         "thread, tokio-uring, no polling); the best of the Rust peers in the same cell "
         "beside them, and the best of our figures (either column) against it. "
         f"This machine has {ncpu} CPUs: beyond {ncpu} queues the threads share them, so the "
         "figures show what sharing one image costs more than how far it scales.", "",
         "| cell | cache | QD | ours | " + " | ".join(
             f"{n} queue{'s' if n > 1 else ''}" for n in QUEUES.values())
         + f" | {max(QUEUES.values())} / 1 | best peer | best of ours / best peer |",
         "| --- | --- | ---: | ---: |" + " ---: |" * (len(QUEUES) + 3)]
    for c in rows:
        r = bench.results[c.id]
        top = max(QUEUES, key=QUEUES.get)
        failed = bench.peer_errors.get(c.id, {})
        peers = [(statistics.median(r[p]), p) for p in PEERS if r.get(p) and p not in failed]
        mine = [r[s] for s in ("ours",) + tuple(QUEUES) if r.get(s)]
        best = max(mine, key=statistics.median) if mine else []
        vs_peer = (f"{peers and max(peers)[1]} {max(peers)[0]:,.0f}" if peers else "–",
                   ratio(best, [max(peers)[0]]) if peers else "–")
        L.append(f"| {c.title} | {c.cache} | {c.depth} | {fmt_iops(r['ours'])} | "
                 + " | ".join(fmt_iops(r.get(s, [])) for s in QUEUES)
                 + f" | {ratio(r.get(top, []), r.get('q1', []))} | {vs_peer[0]} | "
                 f"**{vs_peer[1]}** |")
    return L + [""]


def report(bench: Bench, cells: list[Cell], started: str, elapsed: float, load0: str,
           load1: str, micro: tuple[list[dict], float, str] | None) -> str:
    a = bench.args
    raw_hdr = "raw (fio)" if bench.fio else "raw (stand-in†)"
    L = ["# Benchmarks", "",
         "Generated by `just bench` (benches/bench.sh → benches/bench.py). qcow2-engine's "
         "`qimg bench` against QEMU's qcow2 driver (`qemu-img bench`) and the raw file "
         "underneath, the same cells on the same images in the same run, sides alternating "
         "(ours, ours without leases, QEMU, ours on the tokio file backend, raw, the Rust "
         "peers imago and qcow2-rs; repeated); "
         "and, run first, the microbenchmarks of the hot paths.", "",
         f"- date: {started}",
         f"- runs per side and cell: {a.runs}; request counts × {a.scale:g}"
         f"{' (reduced)' if a.scale < 1 else ''}",
         f"- the whole run took {elapsed / 60:.1f} min (images prepared, every cell, checks; "
         f"without the cargo build), {bench.rm_secs / 60:.1f} min of it removing images",
         f"- load average (1, 5, 15 min) before: {load0}; after: {load1}"]
    if a.note:
        L.append(f"- note: {a.note}")
    if a.cells:
        L.append(f"- **partial run**: only the cells matching `{a.cells}`")
    L += ["", "## Machine", "", "| | |", "| --- | --- |"]
    L += [f"| {k} | {v} |" for k, v in machine(bench)]
    L += ["", "## Results", "",
          "IOPS, median [min–max] of the runs; ratios of medians. *ours* is qcow2-engine on "
          "io_uring, *threads* the same engine on the tokio file backend (`-i threads`). "
          "*no lease* is *ours* built with `--cfg qcow2_no_lease`, which makes every lease a "
          "no-op (the build the race tests use to show that they see the race; never one to "
          "run), alternating with the other sides on the cells matching "
          f"`{a.nolease_cells or '(none)'}`: where *ours/no-lease* is near 1.00 and the two "
          "[min–max] ranges overlap, taking a lease on every host cluster a request touches "
          "costs nothing measurable against the run-to-run noise (issue 6, item 5).", "",
          f"| cell | cache | QD | requests | ours | QEMU | {raw_hdr} | ours/QEMU | ours/raw "
          "| threads | threads/ours | no lease | ours/no-lease |"
          + ("".join(f" {s} | ours/{s} |" for s in PEERS) if a.peers else ""),
          "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
          "| ---: |" + (" ---: |" * 2 * len(PEERS) if a.peers else "")]
    for c in cells:
        r = bench.results.get(c.id)
        if r is None:
            continue
        name = c.title
        if c.id in bench.errors:
            L.append(f"| {name} | {c.cache} | {c.depth} | {c.count} | **failed** (below) "
                     "| | | | | | | | |" + (" |" * 2 * len(PEERS) if a.peers else ""))
            continue
        L.append(f"| {name} | {c.cache} | {c.depth} | {c.count:,} | {fmt_iops(r['ours'])} | "
                 f"{fmt_iops(r['qemu'])} | {fmt_iops(r['raw'])} | "
                 f"**{ratio(r['ours'], r['qemu'])}** | {ratio(r['ours'], r['raw'])} | "
                 f"{fmt_iops(r['threads'])} | {ratio(r['threads'], r['ours'])} | "
                 f"{fmt_iops(r.get('nolease', []))} | {ratio(r['ours'], r.get('nolease', []))} |"
                 + ("".join(f" {peer_cell(bench, c, s)} | {ratio(r['ours'], r.get(s, []))} |"
                            for s in PEERS) if a.peers else ""))
    L.append("")
    L += queues_section(bench, cells)
    if a.peers:
        L += peers_section(bench, cells)
    if not bench.fio:
        L += ["† fio not installed: the raw column is `qemu-img bench -f raw -i io_uring` with "
              "the cell's options on a raw file of the same size, preallocated in full (for the "
              "1 TiB cell: a sparse 1 TiB file, like the holes behind span.qcow2). It is QEMU's "
              "thinnest path to the file, not fio's, so it is a stand-in for the physical "
              "limit, not the limit itself.", ""]
    if bench.errors:
        L += ["### Failed cells", ""]
        for k, v in bench.errors.items():
            L += [f"- `{k}`:", "", "```", v.strip()[:2000], "```", ""]
    if bench.oddities:
        L += ["### Oddities seen by the harness", ""] + [f"- {o}" for o in bench.oddities] + [""]
    L += [f"Verification: {bench.checks} `qemu-img check` runs on images our engine wrote, "
          f"all clean; {bench.compares} `qemu-img compare` runs of our engine's freshly "
          "allocated images against QEMU's after the same requests, all equal.", ""]
    L += micro_section(micro)
    L += ["## Cells", "",
          "All qcow2 images have 64 KiB clusters and are created by `qemu-img create`; both "
          "tools get the same `bench` options (`-c -d -s -S -t` and, for writes, "
          f"`-w --pattern {PATTERN}`).", "",
          "- **4k allocating writes**: a fresh 4 GiB image for every run, `-s 4k -S 64k -w`: "
          "every request writes into a cluster not allocated before (counts stay below one "
          "pass of the 65,536 clusters).",
          "- **4k rewrites / 4k reads of allocated data**: a 4 GiB image whose every cluster "
          "was written once by a first pass (`qemu-img bench -w -s 1M` over the whole image), "
          f"shared by all sides; `-s 4k -S {PERM_STEP}` (12345 × 4 KiB, odd), so request i goes "
          "to i × 48.2 MiB mod 4 GiB: a permutation of the 4 KiB units that jumps to a "
          "different L2 table about every tenth request.",
          "- **64k sequential allocating writes**: a fresh image per run, `-s 64k -w`.",
          "- **1M sequential reads**: the prepared image, `-s 1M` from offset 0.",
          "- **flush every 64**: the 4k allocating writes with `--flush-interval 64` (the "
          "queue drained before each flush, as qemu-img bench does by default).",
          "- **1 TiB image**: `qemu-img create -o preallocation=metadata` of 64 GiB, then "
          "`qemu-img resize` to 1 TiB. Metadata preallocation writes the L2 tables (128 of "
          "them, 8 MiB) and refcounts of the 64 GiB with every entry pointing at a host "
          "cluster, and only sizes the host file, which stays sparse (about 10 MiB on disk): "
          "the metadata of 64 GiB exists without writing 64 GiB. Reads go through the L2 "
          "tables to holes of the host file. qemu-img bench only strides linearly and wraps "
          "modulo the virtual size, so no stride scatters over 64 GiB of a 1 TiB disk; the "
          "cell strides once across the span (step = 64 GiB / requests, 4 KiB aligned): every "
          "request reads a different cluster, every L2 table is loaded in each run, but "
          "consecutive requests mostly share an L2 table.",
          "- The QD1 cells run every side under `taskset -c`, on the CPU named in the machine "
          "table (the one taking the disk's interrupts, `--qd1-cpu auto`): at one request at "
          "a time a run's rate depends on whether the waiting thread runs where the "
          "completions arrive, and unpinned, that is the scheduler's draw (a thread that "
          "sleeps in a system call per request is pulled there; a thread polling its ring "
          "stays where it is). The deeper cells run unpinned, on every CPU.",
          "- Cache `none` opens the image with O_DIRECT, `writeback` through the page cache. "
          "Read cells in writeback mode get one unmeasured warm-up run (QEMU and raw) first.",
          "- The raw side gets the same options on the raw file; with fio, strides become "
          "`rw=read:SKIP`/`write:SKIP`, the permutation becomes `randread`/`randwrite` and the "
          "flush interval `fsync=64`.", "",
          "## How to reproduce", "",
          "```sh",
          "just bench                      # or benches/bench.sh; builds qimg in release first",
          "BENCH_RUNS=5 just bench         # more runs per side",
          "BENCH_SCALE=0.5 just bench      # half the requests per run (a busy machine)",
          "BENCH_CELLS='read4k|span' benches/bench.sh --out /tmp/b.md   # some cells only",
          "BENCH_NOLEASE_CELLS=. just bench   # the no-lease build on every cell (about a "
          "fifth longer)",
          "BENCH_PEERS=0 just bench        # without the Rust peers (imago, qcow2-rs)",
          "BENCH_QD1_CPU=none just bench   # the QD1 cells unpinned (or a CPU number)",
          "just microbench                 # the microbenchmarks alone (a few seconds once built)",
          "just microbench lease           # those whose name matches",
          "```", "",
          "Needs qemu-img (scripts/setup.sh installs it), python3, about 9 GiB free under "
          "`target/bench` on a real disk (tmpfs is refused), and fio for the true raw figure "
          "(`apt-get install fio`). Runs are short (0.2–1.5 s for most cells on the reference "
          "machine, less for the allocating 4k cells, whose counts are kept low because "
          "removing their images costs more than running them: `COUNTS` in benches/bench.py), "
          "so a busy machine moves the numbers: compare the ratios of one run, look at the "
          "spreads, and do not compare absolute IOPS across runs.", ""]
    details = ["<details><summary>Every run (IOPS, in run order)</summary>", "",
               "| cell | ours | QEMU | raw | threads | no lease | imago | qcow2-rs | "
               + " | ".join(f"--queues {n}" for n in QUEUES.values()) + " |",
               "| --- |" + " --- |" * (7 + len(QUEUES))]
    for c in cells:
        r = bench.results.get(c.id)
        if r and c.id not in bench.errors:
            details.append(f"| `{c.id}` | " + " | ".join(
                ", ".join(f"{x:.0f}" for x in r.get(s, [])) or "–"
                for s in ("ours", "qemu", "raw", "threads", "nolease") + PEERS + tuple(QUEUES))
                + " |")
    L += details + ["", "</details>", ""]
    return "\n".join(L)


def write_doc(path: Path, generated: str):
    kept = ""
    if path.exists():
        old = path.read_text()
        if MARKER in old:
            kept = old.split(MARKER, 1)[1].lstrip("\n")
        elif old.strip():
            kept = old  # a file written by hand before the harness: keep it all, below
    if not kept.strip():
        kept = ("## Notes\n\nHand-written notes (profiles, what limits a cell) go here; "
                "`just bench` keeps everything below the marker.\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(generated.rstrip("\n") + "\n\n" + MARKER + "\n\n" + kept)


def main():
    env = os.environ.get
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=int(env("BENCH_RUNS", "3")))
    ap.add_argument("--scale", type=float, default=float(env("BENCH_SCALE", "1")))
    ap.add_argument("--dir", default=env("BENCH_DIR", str(ROOT / "target" / "bench")))
    ap.add_argument("--cells", default=env("BENCH_CELLS", ""),
                    help="regex: only the cells whose id matches (see --list)")
    ap.add_argument("--out", default=env("BENCH_OUT", str(ROOT / "docs" / "BENCHMARKS.md")))
    ap.add_argument("--note", default=env("BENCH_NOTE", ""))
    ap.add_argument("--keep", action="store_true", default=env("BENCH_KEEP", "") == "1",
                    help="keep the images afterwards")
    ap.add_argument("--reuse", action="store_true", default=env("BENCH_REUSE", "") == "1",
                    help="reuse prepared images left by --keep")
    ap.add_argument("--qimg", default=env("BENCH_QIMG", str(TARGET / "release" / "qimg")))
    ap.add_argument("--qimg-nolease", default=env(
        "BENCH_QIMG_NOLEASE", str(TARGET / "bench-nolease" / "release" / "qimg")),
        help="qimg built with --cfg qcow2_no_lease (bench.sh builds it)")
    ap.add_argument("--nolease-cells", default=env("BENCH_NOLEASE_CELLS", NOLEASE_CELLS),
                    help="regex: the cells that also run the no-lease build ('' for none)")
    ap.add_argument("--queue-cells", default=env("BENCH_QUEUE_CELLS", QUEUE_CELLS),
                    help="regex: the cells that also run with --queues 1, 2, 4 ('' for none)")
    ap.add_argument("--no-micro", action="store_true", default=env("BENCH_MICRO", "1") == "0",
                    help="skip the microbenchmarks (benches/microbench.sh)")
    ap.add_argument("--peers", action="store_true", default=env("BENCH_PEERS", "0") == "1",
                    help="also run imago and qcow2-rs (benches/peers' peer-bench, which "
                         "bench.sh builds when BENCH_PEERS=1, its default)")
    ap.add_argument("--peer-bench", default=env(
        "BENCH_PEER_BENCH", str(TARGET / "peers" / "release" / "peer-bench")))
    ap.add_argument("--qd1-cpu", default=env("BENCH_QD1_CPU", "auto"),
                    help="the CPU every side of the QD1 cells runs on: a number, 'auto' (the "
                         "one CPU taking the disk's interrupts, if one does) or 'none'")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every command")
    ap.add_argument("--list", action="store_true", help="list the cells and exit")
    args = ap.parse_args()
    global VERBOSE
    VERBOSE = args.verbose
    if args.runs < 1 or args.scale <= 0:
        die("--runs must be >= 1 and --scale > 0")

    cells = make_cells(args.scale)
    if args.cells:
        cells = [c for c in cells if re.search(args.cells, c.id)]
    if args.list:
        for c in cells:
            print(f"{c.id:24} {' '.join(c.bench_args())}")
        return
    if not cells:
        die(f"no cell matches {args.cells!r}")
    for tool in ("qemu-img",):
        if not shutil.which(tool):
            die(f"{tool} not found (scripts/setup.sh installs it)")
    if not os.access(args.qimg, os.X_OK):
        die(f"{args.qimg} not built (cargo build --release -p qimg)")
    if args.peers and not os.access(args.peer_bench, os.X_OK):
        die(f"{args.peer_bench} not built (benches/bench.sh builds it with BENCH_PEERS=1)")
    if args.peers and not shutil.which("qemu-io"):
        die("qemu-io not found (scripts/setup.sh installs qemu-utils)")
    if args.nolease_cells and not os.access(args.qimg_nolease, os.X_OK):
        die(f"{args.qimg_nolease} not built (benches/bench.sh builds it)")

    bench = Bench(args)
    bench.dir.mkdir(parents=True, exist_ok=True)
    fstype = first_line(["findmnt", "-n", "-o", "FSTYPE", "-T", str(bench.dir)])
    if fstype in ("tmpfs", "ramfs"):
        die(f"{bench.dir} is on {fstype}: benchmarks need a real disk (set BENCH_DIR)")
    if args.qd1_cpu == "auto":
        bench.pin, bench.pin_why = irq_cpu(bench.dir)
    elif args.qd1_cpu != "none":
        if not args.qd1_cpu.isdigit():
            die(f"--qd1-cpu {args.qd1_cpu!r}: a CPU number, 'auto' or 'none'")
        bench.pin, bench.pin_why = int(args.qd1_cpu), "chosen by --qd1-cpu"
    if bench.pin is not None and not shutil.which("taskset"):
        die("taskset not found (Debian package util-linux), needed to pin the QD1 cells")
    print(f"bench: QD1 cells {'on CPU ' + str(bench.pin) if bench.pin is not None else 'unpinned'}"
          f" ({bench.pin_why})", flush=True)
    started = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    load0 = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    t0 = time.time()
    print(f"bench: {len(cells)} cells × 4 sides (5 on the no-lease cells, 7 on the queue cells"
          f"{', and the peers imago and qcow2-rs' if args.peers else ''}) × {args.runs} runs "
          f"in {bench.dir} ({fstype}); raw side: {'fio' if bench.fio else 'fio not installed, qemu-img bench -f raw stand-in'}",
          flush=True)
    micro = None
    if not args.no_micro:
        micro = microbench()
        print(f"microbenchmarks: {len(micro[0])} in {micro[1]:.1f} s"
              f"{'; FAILED: ' + micro[2] if micro[2] else ''}", flush=True)
    bench.prepare(cells)
    for c in cells:
        bench.cell(c)
    elapsed = time.time() - t0
    load1 = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    out = Path(args.out)
    write_doc(out, report(bench, cells, started, elapsed, load0, load1, micro))
    (bench.dir / "results.json").write_text(json.dumps(
        {"date": started, "elapsed_s": elapsed, "rm_s": bench.rm_secs, "load": [load0, load1],
         "results": bench.results, "errors": bench.errors, "oddities": bench.oddities,
         "peer_errors": bench.peer_errors,
         "micro": micro and {"rows": micro[0], "secs": micro[1], "error": micro[2]},
         "cells": [dataclasses.asdict(c) for c in cells]}, indent=1))
    if not args.keep:
        for f in ("raw.img", "data.qcow2", "span.qcow2", "rawspan.img"):
            bench.rm(bench.p(f))
    for side in SIDES:
        if side != "raw":
            bench.rm(bench.p(f"fresh-{side}.qcow2"))
    print(f"bench: wrote {out} in {elapsed / 60:.1f} min", flush=True)
    if bench.errors:
        die(f"{len(bench.errors)} cell(s) failed: {', '.join(bench.errors)}")
    if micro and micro[2]:
        die("the microbenchmarks failed (see the document)")


if __name__ == "__main__":
    main()
