"""Disk to GPU after a restart (issue #16): a persisted artifact loaded onto the GPU by a fresh
daemon, against torch loading the same bytes from a safetensors file, side by side in one run.

    python3 benchmarks/disk_to_gpu_bench.py --daemon build/daemon/tensorregd --cli build/cli/tensorreg
        [--gib 16] [--repeat 3] [--dir DIR] [--device cuda] [--cache cold|warm]
        [--threads N] [--paths auto,direct,restore]

It writes a --gib GiB safetensors file of random bf16 tensors (dense, 8B-shaped layers) to
--dir, puts it with `tensorreg put --policy durable` into a daemon with `--persist-dir`, stops
that daemon and starts a fresh one on the same directory (a restart: nothing in DRAM). Then,
each --repeat times and in alternating order, with the page cache dropped before each where
this process may (else it says so, and both read warm):

- torch: `safetensors.torch.load_file(FILE, device=DEVICE)` and a synchronize;
- tensorreg: `Store.get(ID, device=DEVICE)` from a daemon that holds the artifact on disk only
  (each repeat restarts the daemon, so the load comes from disk again), and a synchronize.

Which tensorreg path each --paths entry takes (each is timed on its own, in the same rounds):
- auto: `Store.get(ID, device=DEVICE, load_threads=--threads)`, as a user calls it; on CUDA that
  is the direct path when the daemon answers OpenPersistedArtifact (docs/wire-format.md §17);
- direct: the direct path forced, also for --device cpu (file → staging buffers → destination
  on --threads threads, every leaf's XXH3-128 checked; the daemon loads nothing);
- restore: the daemon's restore path forced (GetArtifactMemfd: disk → the daemon's stable DRAM,
  then memfd → pinned buffers → GPU), the path before the direct one.
Each load prints the path it took and the bytes the daemon then held in stable DRAM (0 for the
direct path).

The goal is tensorreg >= 2x faster than torch. Both results are checked equal to the file.

The disk's own ceiling is measured in the same run: a sequential read of the file (16 MiB
reads, page cache dropped first), the time no cold load of those bytes can beat. With
--cache warm nothing is dropped and each load is preceded by a read of its file, so both
loads come from the page cache (the restarted daemon still starts with nothing in DRAM).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "python"))


def log(*parts) -> None:
    print(*parts, flush=True)


def read_through(path: str) -> float:
    """Reads `path` sequentially in 16 MiB pieces; returns the seconds taken."""
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def persisted_files(persist: str) -> list:
    return [os.path.join(root, name) for root, _, names in os.walk(persist) for name in names]


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


class Daemon:
    def __init__(self, path: str, work: str, persist: str) -> None:
        sockets = os.path.join(work, "sock")  # the daemon wants its socket's directory ours and 0700
        os.makedirs(sockets, mode=0o700, exist_ok=True)
        os.chmod(sockets, 0o700)
        self.socket = os.path.join(sockets, "d.sock")
        self.log_path = os.path.join(work, "tensorregd.log")
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen([path, "--socket", self.socket, "--persist-dir", persist, "--log-level", "warn"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while "ready on" not in open(self.log_path).read():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tensorregd did not start: {open(self.log_path).read()}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def safetensors_functions():
    """(save_file, load_file, name) of the safetensors package; where it is not installed (the
    CPU-only VM), a plain writer and reader of the same format, for a functional run only: its
    times are not the goal's yardstick, and the output says so."""
    try:
        from safetensors.torch import load_file, save_file
        return save_file, load_file, "safetensors.torch.load_file"
    except ImportError:
        pass
    import json
    import struct

    import torch
    names = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    dtypes = {v: k for k, v in names.items()}

    def save_file(sd, path):
        header, at = {}, 0
        for name, t in sd.items():
            n = t.numel() * t.element_size()
            header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + n]}
            at += n
        text = json.dumps(header).encode()
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for t in sd.values():
                f.write(t.contiguous().view(torch.uint8).numpy().tobytes())

    def load_file(path, device="cpu"):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            data = bytearray(f.read())
        base = torch.frombuffer(data, dtype=torch.uint8)
        return {name: base[h["data_offsets"][0]:h["data_offsets"][1]].view(dtypes[h["dtype"]]).view(h["shape"])
                .to(device) for name, h in header.items() if name != "__metadata__"}

    return save_file, load_file, "a plain safetensors reader (safetensors is not installed: not the goal's yardstick)"


def make_file(torch, path: str, gib: float, device: str) -> None:
    save_file = safetensors_functions()[0]
    hidden, inter = 4096, 14336
    per_layer = (4 * hidden * hidden + 3 * hidden * inter) * 2
    layers = max(1, int(gib * (1 << 30) // per_layer))
    gen = torch.Generator(device=device).manual_seed(7)
    sd = {}
    for i in range(layers):
        for name, shape in (("q", (hidden, hidden)), ("k", (hidden, hidden)), ("v", (hidden, hidden)),
                            ("o", (hidden, hidden)), ("gate", (inter, hidden)), ("up", (inter, hidden)),
                            ("down", (hidden, inter))):
            t = torch.empty(shape, dtype=torch.bfloat16, device=device)
            t.normal_(generator=gen)
            sd[f"layers.{i}.{name}.weight"] = t.cpu()
    save_file(sd, path)


def wait_persisted(cli: str, socket: str, artifact_id: str, timeout: float = 600) -> None:
    import json
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([cli, "ls", "--socket", socket, "--json"], capture_output=True, text=True, check=True)
        if any(a["artifact_id"] == artifact_id and "shared_disk" in a["tiers"] for a in json.loads(out.stdout)):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{artifact_id} was not persisted in {timeout} s")


def stable_bytes(store) -> int:
    return store.stats()["tiers"].get("stable_dram", {}).get("bytes", 0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", required=True)
    ap.add_argument("--cli", required=True)
    ap.add_argument("--gib", type=float, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cache", choices=("cold", "warm"), default="cold")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of the direct path (default: the client's, min(8, cpus))")
    ap.add_argument("--paths", default="auto", help="comma-separated: auto, direct, restore")
    opts = ap.parse_args()
    paths = [p for p in opts.paths.split(",") if p]
    if not paths or any(p not in ("auto", "direct", "restore") for p in paths):
        ap.error(f"--paths {opts.paths!r}: each of auto, direct, restore")
    warm = opts.cache == "warm"

    import torch
    _, load_file, yardstick = safetensors_functions()
    log(f"torch: {yardstick}")

    import tensorreg
    from tensorreg import _disk_load, _reads

    work = opts.dir or tempfile.mkdtemp(prefix="disk2gpu-")
    os.makedirs(work, exist_ok=True)
    persist = os.path.join(work, "persist")
    shutil.rmtree(persist, ignore_errors=True)
    os.makedirs(persist, mode=0o700)
    path = os.path.join(work, "model.safetensors")
    t0 = time.perf_counter()
    if not os.path.exists(path):  # a --dir of an earlier run keeps its file
        make_file(torch, path, opts.gib, opts.device if opts.device.startswith("cuda") else "cpu")
    size = os.path.getsize(path)
    log(f"file: {size / (1 << 30):.2f} GiB ready in {time.perf_counter() - t0:.1f} s ({path})")

    daemon = Daemon(opts.daemon, work, persist)
    try:
        t0 = time.perf_counter()
        put = subprocess.run([opts.cli, "put", path, "--policy", "durable", "--socket", daemon.socket, "--json"],
                             capture_output=True, text=True, check=True)
        import json
        artifact_id = json.loads(put.stdout)["artifact_id"]
        wait_persisted(opts.cli, daemon.socket, artifact_id)
        log(f"put --policy durable and persisted: {time.perf_counter() - t0:.1f} s, {artifact_id}")
    finally:
        daemon.stop()

    dropped = drop_page_cache()
    if warm:
        log("page cache: warm (each load's file is read through first)")
    else:
        log("page cache: dropped before each load" if dropped else
            "page cache: cannot drop it here (not root?): both loads read page-cached files")
    disk_times = []
    for _ in range(2 if dropped else 0):
        drop_page_cache()
        disk_times.append(read_through(path))
    if disk_times:
        log(f"disk: sequential read of the file, cold, best {min(disk_times):.3f} s "
            f"({size / (1 << 30) / min(disk_times):.2f} GiB/s): no cold load beats this")

    def prepare(paths):
        if warm:
            for p in paths:
                read_through(p)
        else:
            drop_page_cache()

    def load_torch():
        prepare([path])
        t = time.perf_counter()
        sd = load_file(path, device=opts.device)
        torch.cuda.synchronize() if opts.device.startswith("cuda") else None
        return time.perf_counter() - t, sd

    def get(store, path):
        """(tensors, the path taken) of one tensorreg load."""
        dev = torch.device(opts.device)
        if path == "auto":
            _disk_load.last_path = None
            sd = store.get(artifact_id, device=opts.device, load_threads=opts.threads)
            if dev.type != "cuda":
                return sd, "restore (a cpu get maps the daemon's replica)"
            taken = _disk_load.last_path
            return sd, "direct" if taken == "direct" else f"restore ({taken})"
        if path == "direct":
            sd = _disk_load.get_tensors(store._conn, artifact_id, dev, torch, threads=opts.threads)
            if sd is None:
                raise RuntimeError(f"the direct path is not available: {_disk_load.last_path}")
            return sd, "direct"
        return _reads.get_tensors(store._conn, artifact_id, opts.device, direct=False), "restore"

    def tensorreg_loader(path):
        def load_tensorreg():
            d = Daemon(opts.daemon, work, persist)  # a restart each time: the artifact is on disk only
            try:
                prepare(persisted_files(persist))
                with tensorreg.Store(d.socket) as store:
                    t = time.perf_counter()
                    sd, taken = get(store, path)
                    torch.cuda.synchronize() if opts.device.startswith("cuda") else None
                    seconds = time.perf_counter() - t
                    log(f"  tensorreg {path}: {seconds:.3f} s, took the {taken} path, daemon's stable DRAM "
                        f"{stable_bytes(store)} bytes after it")
                    return seconds, sd
            finally:
                d.stop()
        return load_tensorreg

    loaders = {"torch": load_torch, **{p: tensorreg_loader(p) for p in paths}}
    times = {name: [] for name in loaders}
    for k in range(opts.repeat):
        order = list(loaders) if k % 2 == 0 else list(reversed(loaders))
        results = {}
        for name in order:
            seconds, sd = loaders[name]()
            times[name].append(seconds)
            results[name] = sd
        a = results["torch"]
        same = {p: a.keys() == results[p].keys() and all(torch.equal(a[n], results[p][n]) for n in a) for p in paths}
        del results, a
        log(f"repeat {k}: torch {times['torch'][-1]:.3f} s, " +
            ", ".join(f"tensorreg {p} {times[p][-1]:.3f} s (equal: {same[p]})" for p in paths))
        if not all(same.values()):
            log("FAILED: tensorreg's tensors differ from the file's")
            return 1
    best_torch = min(times["torch"])
    gib = size / (1 << 30)
    log(f"torch load_file         best {best_torch:.3f} s ({gib / best_torch:.2f} GiB/s)")
    for p in paths:
        best = min(times[p])
        log(f"tensorreg get, {p:<8} best {best:.3f} s ({gib / best:.2f} GiB/s): {best_torch / best:.2f}x torch "
            f"(goal >= 2x), page cache {opts.cache}")
        if disk_times and not warm:
            log(f"  against the disk's ceiling: torch {min(disk_times) / best_torch:.2f}x, tensorreg {p} "
                f"{min(disk_times) / best:.2f}x of a plain sequential read")
    if not opts.dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
