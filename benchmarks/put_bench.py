"""A put at disk speed (issue #20): the host put path against the yardsticks it is held to,
measured side by side in one run.

    /usr/bin/python3 benchmarks/put_bench.py [--build build] [--gib 1] [--repeat 3] [--dir DIR]
        [--no-python] [--python DIR]

(/usr/bin/python3: it sees Debian's torch.) On a page-cached safetensors file of --gib GiB
(written to --dir, by default a temp dir, once) it measures, each --repeat times, the best
kept:

- `openssl speed -evp sha256` (16 KiB blocks) x cores: the hashing yardstick; and `openssl
  speed -multi CORES`, all cores hashing at once, which says how far cores scale on this host;
- `tensorreg digest --data FILE` and `tensorreg index FILE`: the file read and hashed on all
  cores, as GB/s against openssl x cores (goal >= 0.8);
- `tensorreg put FILE` of new content (a fresh daemon each repeat) and again (content held,
  `existed: true`), against `tensorreg index` (goals <= 1.5 and <= 1.1): the daemon reads the
  file it is handed (docs/wire-format.md §18); and the same with `put --copy` (the client
  copies into the daemon's memfd, and hashes held content itself), on a daemon of its own;
- the peak of shared memory during each put (/proc/meminfo Shmem above its value when the put
  started, so a replica already held does not count) and of the daemon's and the client's RSS
  (anonymous + shared), against the artifact (goal <= 1.1);
- Python `Store.put` of a CPU state dict of the same size, new and held, against `tensorreg
  digest` of its canonical bytes (written to a file whose id must match the put's).

The CPU seconds of each (client + daemon) are reported too: on a shared machine they say more
than wall times. The load average is printed with each repeat, and the best repeat of each
measurement is kept.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def log(*parts) -> None:
    print(*parts, flush=True)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def write_safetensors(path: str, total: int, tensors: int = 8) -> None:
    """`tensors` F32 tensors of total/tensors bytes each, of varied (not constant) bytes."""
    each = total // tensors // 4 * 4
    header, at = {}, 0
    for i in range(tensors):
        header[f"layers.{i}.weight"] = {"dtype": "F32", "shape": [each // 4], "data_offsets": [at, at + each]}
        at += each
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    block = os.urandom(1 << 24)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        left, k = at, 0
        while left:
            piece = block[k % 97:] + block[:k % 97]
            n = min(left, len(piece))
            f.write(piece[:n])
            left -= n
            k += 1


def page_cache(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def meminfo_kib(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class peak_sampler:
    """Samples every 2 ms, until stopped: Shmem above `shmem_base`, and RssAnon + RssShmem of
    the daemon and of the client (a pid, or a callable giving one)."""

    def __init__(self, daemon_pid: int, client_pid, shmem_base: int) -> None:
        self.daemon_pid, self.client_pid, self.shmem_base = daemon_pid, client_pid, shmem_base
        self.shmem = self.daemon = self.client = 0
        self.cpu = 0.0  # this sampler thread's own CPU seconds, once stopped
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self, pid) -> int:
        return status_kib(pid, "RssAnon") + status_kib(pid, "RssShmem") if pid else 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.shmem = max(self.shmem, meminfo_kib("Shmem") - self.shmem_base)
            self.daemon = max(self.daemon, self._rss(self.daemon_pid))
            pid = self.client_pid() if callable(self.client_pid) else self.client_pid
            self.client = max(self.client, self._rss(pid))
            time.sleep(0.002)
        self.cpu = time.thread_time()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class daemon:
    def __init__(self, binary: str, workdir: str, stable_bytes: int, extra=()) -> None:
        # The daemon insists on a socket directory of its own, mode 0700.
        sockdir = os.path.join(workdir, "sock")
        os.makedirs(sockdir, mode=0o700, exist_ok=True)
        os.chmod(sockdir, 0o700)
        self.socket = os.path.join(sockdir, "tensorregd.sock")
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self.log = open(os.path.join(workdir, "tensorregd.log"), "ab")
        self.proc = subprocess.Popen([binary, "--socket", self.socket, "--stable-bytes", str(stable_bytes), *extra],
                                     stdout=self.log, stderr=self.log)

    def wait_ready(self, cli: str) -> None:
        deadline = time.time() + 30
        while time.time() < deadline:
            if os.path.exists(self.socket) and subprocess.run([cli, "status", "--socket", self.socket],
                                                              capture_output=True).returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"the daemon did not become ready (see {self.log.name})")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def daemon_args(args, size: int) -> list:
    """--reserve: the daemon keeps a populated memfd of the put's size ready."""
    return ["--populated-reserve", str(size)] if args.reserve else []


def wait_reserve(args, d: daemon, cli: str) -> None:
    """With --reserve, waits until the daemon's spare is populated and ready (its stats say so),
    so that a put meets a daemon that has been idle, as in service."""
    if not args.reserve:
        return
    deadline = time.time() + 120
    while time.time() < deadline:
        stats = subprocess.run([cli, "stats", "--json", "--socket", d.socket], capture_output=True, text=True,
                               check=True).stdout
        if json.loads(stats)["populated_reserve_bytes"] > 0:
            return
        time.sleep(0.1)
    raise RuntimeError("the daemon's populated reserve was not ready after 120 s")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) `pid` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list, sampler_args=None) -> tuple:
    """Runs `cmd`, returns (seconds, stdout, sampler or None, CPU seconds of the command)."""
    cpu_before = children_cpu()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = None
    if sampler_args is not None:
        sampler = peak_sampler(sampler_args[0], proc.pid, sampler_args[1])
        sampler.__enter__()
    out, err = proc.communicate()
    seconds = time.perf_counter() - started
    if sampler is not None:
        sampler.__exit__(None, None, None)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()}")
    return seconds, out, sampler, children_cpu() - cpu_before


def openssl_rate(processes: int = 1) -> float:
    """Bytes/s of `openssl speed -evp sha256` at 16 KiB blocks: one core, or `processes` at once
    (`-multi`, their sum)."""
    multi = ["-multi", str(processes)] if processes > 1 else []
    out = subprocess.run(["openssl", "speed", *multi, "-evp", "sha256", "-bytes", "16384", "-seconds", "2"],
                         capture_output=True, text=True).stdout
    last = [line for line in out.splitlines() if line.strip()][-1]
    return float(last.split()[-1].rstrip("k")) * 1000


def best(results: dict, key: str, value: float, lower_is_better: bool = True) -> None:
    if key not in results or (value < results[key] if lower_is_better else value > results[key]):
        results[key] = value


def cli_round(args, cli: str, daemon_bin: str, path: str, work: str, results: dict) -> None:
    size = os.path.getsize(path)
    idx_path = os.path.join(work, "index.json")
    rate = openssl_rate()
    best(results, "openssl_bytes_per_s_one_core", rate, lower_is_better=False)
    # The same on every core at once: where cores share a physical core or a clock budget,
    # this is less than one core's rate times the cores.
    best(results, "openssl_bytes_per_s_all_cores", openssl_rate(os.cpu_count() or 1), lower_is_better=False)
    s, out, _, cpu = timed([cli, "index", path])
    best(results, "index_s", s)
    best(results, "index_cpu_s", cpu)
    index_json = out.splitlines()[0]
    with open(idx_path, "w") as f:
        f.write(index_json)
    s, _, _, cpu = timed([cli, "digest", "--index", idx_path, "--data", path])
    best(results, "digest_file_s", s)
    best(results, "digest_file_cpu_s", cpu)
    # "": the daemon reads the file it was handed; "copy_": `put --copy`, the client copies.
    for mode in ("", "copy_"):
        d = daemon(daemon_bin, work, 4 * size, daemon_args(args, size))
        try:
            d.wait_ready(cli)
            for what in ("put_new", "put_held"):
                if what == "put_new":
                    wait_reserve(args, d, cli)
                base = meminfo_kib("Shmem")  # what the daemon holds already does not count
                daemon_cpu = process_cpu(d.proc.pid)
                cmd = [cli, "put", path, "--json", "--socket", d.socket] + (["--copy"] if mode else [])
                s, out, peak, cpu = timed(cmd, (d.proc.pid, base))
                daemon_cpu = process_cpu(d.proc.pid) - daemon_cpu
                answer = json.loads(out)
                assert answer["existed"] == (what == "put_held"), answer
                key = mode + what
                best(results, f"{key}_s", s)
                best(results, f"{key}_cpu_s", cpu + daemon_cpu)
                best(results, f"{key}_shmem_peak_kib", peak.shmem)
                best(results, f"{key}_daemon_rss_peak_kib", peak.daemon)
                best(results, f"{key}_client_rss_peak_kib", peak.client)
        finally:
            d.stop()


def python_round(args, cli: str, daemon_bin: str, total: int, work: str, results: dict) -> None:
    import torch

    import tensorreg
    from tensorreg import _layout

    tensors = 8
    each = total // tensors // 4
    g = torch.Generator().manual_seed(7)
    sd = {f"layers.{i}.weight": torch.randn(each, generator=g) for i in range(tensors)}
    # The canonical bytes in a file, for `tensorreg digest`: it must give the put's id.
    descs, _ = _layout.state_dict_descs(torch, sd, "bench")
    layout = _layout.build(descs)
    canonical = os.path.join(work, "canonical.bin")
    with open(canonical, "wb") as f:
        f.truncate(layout.total_size)
    with open(canonical, "r+b") as f:
        for storage in layout.storages:
            if storage.nbytes:
                src = _layout.storage_bytes(torch, storage.source).contiguous()
                f.seek(storage.offset)
                f.write((ctypes.c_ubyte * storage.nbytes).from_address(src.data_ptr()))
    page_cache(canonical)
    d = daemon(daemon_bin, work, 4 * layout.total_size, daemon_args(args, layout.total_size))
    try:
        d.wait_ready(cli)
        wait_reserve(args, d, cli)
        with tensorreg.Store(d.socket) as store:
            ids = []
            for what in ("py_put_new", "py_put_held"):
                base = meminfo_kib("Shmem")
                daemon_cpu = process_cpu(d.proc.pid)
                with peak_sampler(d.proc.pid, os.getpid(), base) as peak:
                    # Process CPU: a put may hash on a pool of threads; the sampler's is taken off.
                    started, cpu = time.perf_counter(), time.process_time()
                    art = store.put(sd)
                    s, cpu = time.perf_counter() - started, time.process_time() - cpu
                cpu = max(0.0, cpu - peak.cpu)
                best(results, f"{what}_cpu_s", cpu + process_cpu(d.proc.pid) - daemon_cpu)
                ids.append(art.artifact_id)
                best(results, f"{what}_s", s)
                best(results, f"{what}_shmem_peak_kib", peak.shmem)
                best(results, f"{what}_daemon_rss_peak_kib", peak.daemon)
        idx_path = os.path.join(work, "py_index.json")
        _, out, _, _ = timed([cli, "index", ids[0], "--socket", d.socket])
        with open(idx_path, "w") as f:
            f.write(out.rstrip("\n"))
    finally:
        d.stop()
    s, out, _, cpu = timed([cli, "digest", "--index", idx_path, "--data", canonical])
    best(results, "py_digest_s", s)
    best(results, "py_digest_cpu_s", cpu)
    digest_id = re.search(r"^id (\S+)$", out, re.M).group(1)
    if digest_id != ids[0]:
        raise RuntimeError(f"tensorreg digest gives {digest_id}, the Python put {ids[0]}")
    results["py_total_size"] = layout.total_size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", default=os.path.join(REPO, "build"))
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None)
    p.add_argument("--no-python", action="store_true")
    p.add_argument("--reserve", action="store_true",
                   help="run the daemons with --populated-reserve of the put's size, populated before each put")
    p.add_argument("--python", default=os.path.join(REPO, "python"), help="the tensorreg package's parent dir")
    args = p.parse_args()
    sys.path.insert(0, args.python)
    cli = os.path.join(args.build, "cli", "tensorreg")
    daemon_bin = os.path.join(args.build, "daemon", "tensorregd")
    work = args.dir or tempfile.mkdtemp(prefix="put_bench.")
    os.makedirs(work, exist_ok=True)
    total = int(args.gib * (1 << 30))
    path = os.path.join(work, "model.safetensors")
    if not os.path.exists(path) or abs(os.path.getsize(path) - total) > (1 << 20):
        write_safetensors(path, total)
    page_cache(path)
    size = os.path.getsize(path)
    cores = os.cpu_count() or 1
    log(f"file {path}: {size} bytes, {cores} cores, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    results: dict = {}
    for r in range(args.repeat):
        log(f"repeat {r + 1}: load {load()}")
        cli_round(args, cli, daemon_bin, path, os.path.join(work), results)
        if not args.no_python:
            python_round(args, cli, daemon_bin, total, work, results)
    log(f"after: load {load()}")

    ossl = results["openssl_bytes_per_s_one_core"] * cores
    ossl_all = results["openssl_bytes_per_s_all_cores"]
    art_kib = size / 1024
    rows = [
        ("openssl speed -evp sha256 x cores", f"{ossl / 1e9:.2f} GB/s", ""),
        ("openssl speed -multi CORES -evp sha256", f"{ossl_all / 1e9:.2f} GB/s",
         f"{ossl_all / ossl:.2f}x one core x cores"),
        ("tensorreg digest --data FILE", f"{results['digest_file_s']:.3f} s",
         f"{size / results['digest_file_s'] / ossl:.2f}x openssl x cores (goal >= 0.8), "
         f"{size / results['digest_file_s'] / ossl_all:.2f}x openssl -multi"),
        ("tensorreg index FILE", f"{results['index_s']:.3f} s",
         f"{size / results['index_s'] / ossl:.2f}x openssl x cores"),
        ("tensorreg put FILE (new)", f"{results['put_new_s']:.3f} s",
         f"{results['put_new_s'] / results['index_s']:.2f}x index (goal <= 1.5)"),
        ("tensorreg put FILE (held)", f"{results['put_held_s']:.3f} s",
         f"{results['put_held_s'] / results['index_s']:.2f}x index (goal <= 1.1)"),
        ("CPU s: index / put new / put held", f"{results['index_cpu_s']:.2f} / {results['put_new_cpu_s']:.2f} / "
         f"{results['put_held_cpu_s']:.2f}", "client + daemon"),
        ("tensorreg put --copy FILE (new)", f"{results['copy_put_new_s']:.3f} s",
         f"{results['copy_put_new_s'] / results['index_s']:.2f}x index"),
        ("tensorreg put --copy FILE (held)", f"{results['copy_put_held_s']:.3f} s",
         f"{results['copy_put_held_s'] / results['index_s']:.2f}x index"),
        ("CPU s: put --copy new / held", f"{results['copy_put_new_cpu_s']:.2f} / "
         f"{results['copy_put_held_cpu_s']:.2f}", "client + daemon"),
    ]
    for what in ("put_new", "put_held", "copy_put_new", "copy_put_held"):
        rows.append((f"  {what}: shmem / daemon / client peak",
                     f"{results[f'{what}_shmem_peak_kib'] / art_kib:.2f} / "
                     f"{results[f'{what}_daemon_rss_peak_kib'] / art_kib:.2f} / "
                     f"{results[f'{what}_client_rss_peak_kib'] / art_kib:.2f}", "x artifact (goal <= 1.1)"))
    if not args.no_python:
        py_kib = results["py_total_size"] / 1024
        rows += [
            ("tensorreg digest of the state dict's bytes", f"{results['py_digest_s']:.3f} s", ""),
            ("Python Store.put (new)", f"{results['py_put_new_s']:.3f} s",
             f"{results['py_put_new_s'] / results['py_digest_s']:.2f}x digest (goal <= 1.5)"),
            ("Python Store.put (held)", f"{results['py_put_held_s']:.3f} s",
             f"{results['py_put_held_s'] / results['py_digest_s']:.2f}x digest (goal <= 1.1)"),
            ("CPU s: digest / put new / put held",
             f"{results['py_digest_cpu_s']:.2f} / {results['py_put_new_cpu_s']:.2f} / "
             f"{results['py_put_held_cpu_s']:.2f}", "client + daemon"),
        ]
        for what in ("py_put_new", "py_put_held"):
            rows.append((f"  {what}: shmem / daemon peak",
                         f"{results[f'{what}_shmem_peak_kib'] / py_kib:.2f} / "
                         f"{results[f'{what}_daemon_rss_peak_kib'] / py_kib:.2f}", "x artifact (goal <= 1.1)"))
    print(json.dumps(results))
    for name, value, note in rows:
        print(f"{name:<44} {value:>22}  {note}")
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
