#!/usr/bin/env python3
"""End-to-end checks of the `tensorreg` CLI against an independent Python reference.

The reference builds canonical indices and tree hashes from the rules of registration.md
§2–§3 with hashlib/json/base64 only, so a bug shared by the C++ code and its unit tests
still shows here. Usage: cli_test.py PATH/TO/tensorreg [PATH/TO/tensorregd]
With the daemon: `put` and `lease` through a real tensorregd give the id that
`tensorreg digest` computes from the same canonical bytes.
"""
import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import sys
import tempfile

LEAF = 4 << 20


def multihash(digest: bytes) -> str:
    return "b" + base64.b32encode(b"\x12\x20" + digest).decode().lower().rstrip("=")


def tree_hash(data: bytes) -> bytes:
    if not data:
        return bytes(32)
    nodes = [hashlib.sha256(data[i:i + LEAF]).digest() for i in range(0, len(data), LEAF)]
    while len(nodes) > 1:
        nxt = [hashlib.sha256(nodes[i] + nodes[i + 1]).digest() for i in range(0, len(nodes) - 1, 2)]
        if len(nodes) % 2:
            nxt.append(nodes[-1])
        nodes = nxt
    return nodes[0]


DTYPES = {"F32": ("torch.float32", 4), "F16": ("torch.float16", 2), "BF16": ("torch.bfloat16", 2),
          "I64": ("torch.int64", 8), "U8": ("torch.uint8", 1), "BOOL": ("torch.uint8", 1),
          "F8_E4M3": ("torch.float8_e4m3fn", 1), "U32": ("torch.uint32", 4)}


def write_safetensors(path, tensors):
    """tensors: name -> (dtype, shape, bytes). Writes them in the given order."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def reference_index(tensors):
    """The coalesced canonical index and buffer of registration.md §2.4 (names in byte order, 8-aligned)."""
    index, cursor, placed = {}, 0, []
    for name in sorted(tensors, key=lambda n: n.encode()):
        dtype, shape, blob = tensors[name]
        cursor = (cursor + 7) // 8 * 8
        stride, acc = [], 1
        for dim in reversed(shape):
            stride.insert(0, acc)
            acc *= max(dim, 1)
        index[name] = [cursor, len(blob), shape, stride, DTYPES[dtype][0], 0]
        placed.append((cursor, blob))
        cursor += len(blob)
    total = max(o + s for o, s, *_ in index.values())
    buf = bytearray(total)
    for off, blob in placed:
        buf[off:off + len(blob)] = blob
    text = json.dumps(index, separators=(",", ":"), sort_keys=True, ensure_ascii=True)
    return text, bytes(buf)


def run(tool, *args, expect_ok=True):
    p = subprocess.run([tool, *args], capture_output=True, text=True)
    if expect_ok and p.returncode != 0:
        raise AssertionError(f"{args} failed: {p.stderr}")
    return p


def main():
    tool = sys.argv[1]
    failures = 0

    def check(cond, what):
        nonlocal failures
        print(("ok   " if cond else "FAIL ") + what)
        failures += 0 if cond else 1
        return 0 if cond else 1

    rnd = lambda n: os.urandom(n)
    with tempfile.TemporaryDirectory() as d:
        # Two files, several dtypes, odd sizes (PAD between storages), > 4 MiB in all.
        a = {"model.layers.0.weight": ("F32", [1024, 1025], rnd(1024 * 1025 * 4)),
             "model.embed": ("BF16", [3, 5], rnd(30)), "é-norm": ("F16", [7], rnd(14))}
        b = {"lm_head.bias": ("I64", [3], rnd(24)), "mask": ("BOOL", [5], rnd(5)),
             "scale": ("F8_E4M3", [9], rnd(9)), "z": ("U32", [0, 4], b"")}
        write_safetensors(os.path.join(d, "b.safetensors"), b)
        write_safetensors(os.path.join(d, "a.safetensors"), a)
        text, buf = reference_index({**a, **b})
        expected_id = f"mi2:{multihash(hashlib.sha256(text.encode()).digest())}:{multihash(tree_hash(buf))}"

        out = run(tool, "index", os.path.join(d, "b.safetensors"), os.path.join(d, "a.safetensors")).stdout.splitlines()
        check(out == [text, f"total_size {len(buf)}", f"id {expected_id}"], "index of two safetensors files matches the reference")
        out1 = run(tool, "index", "--threads", "1", os.path.join(d, "a.safetensors"), os.path.join(d, "b.safetensors")).stdout
        check(out1.splitlines()[-1] == f"id {expected_id}", "index is independent of file order and thread count")

        # digest of the same canonical bytes gives the same id.
        with open(os.path.join(d, "index.json"), "w") as f:
            f.write(text)
        with open(os.path.join(d, "canonical.bin"), "wb") as f:
            f.write(buf)
        out = run(tool, "digest", "--index", os.path.join(d, "index.json"), "--data", os.path.join(d, "canonical.bin")).stdout
        check(out.splitlines()[-1] == f"id {expected_id}", "digest of the canonical bytes equals index's id")
        check(len(out.splitlines()) == 3 and out.startswith("index bciq"), "digest prints three lines")
        only = run(tool, "digest", "--index", os.path.join(d, "index.json")).stdout.splitlines()
        check(only == [f"index {multihash(hashlib.sha256(text.encode()).digest())}"], "digest without data prints the index line only")

        n = 3 * LEAF + 11
        out = run(tool, "digest", "--index", os.path.join(d, "index.json"), "--zeros", str(n)).stdout.splitlines()
        check(out[1] == f"data {multihash(tree_hash(bytes(n)))}", "--zeros N hashes N zero bytes")

        # Non-canonical index text is re-emitted canonically before hashing (DECISIONS §5.13).
        with open(os.path.join(d, "loose.json"), "w") as f:
            f.write('{ "b": [8,8,[2],[1],"torch.float32",0], "a":[0,8,[2],[1],"torch.float32",0] }')
        canon = json.dumps(json.loads(open(os.path.join(d, "loose.json")).read()), separators=(",", ":"), sort_keys=True)
        out = run(tool, "digest", "--index", os.path.join(d, "loose.json")).stdout.splitlines()
        check(out == [f"index {multihash(hashlib.sha256(canon.encode()).digest())}"], "loose index text is canonicalized")

        # Bad input: non-zero exit and one line on stderr.
        with open(os.path.join(d, "bad.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", 1 << 40) + b"{}")
        for args, what in [(["index", os.path.join(d, "bad.safetensors")], "huge header length"),
                           (["index", os.path.join(d, "missing.safetensors")], "missing file"),
                           (["digest", "--index", os.path.join(d, "bad.safetensors")], "index that is not JSON"),
                           (["digest"], "digest without --index"),
                           (["frobnicate"], "unknown command")]:
            p = run(tool, *args, expect_ok=False)
            check(p.returncode != 0 and len(p.stderr.strip().splitlines()) >= 1 and p.stderr.startswith("tensorreg: "),
                  f"bad input exits non-zero with an error: {what}")
            check(len(p.stderr.strip().splitlines()) == 1 or args == ["frobnicate"], f"the error is one line: {what}")
        failures += convention_checks(tool, sys.argv[2] if len(sys.argv) > 2 else None, check)
        if len(sys.argv) > 2:
            failures += daemon_checks(tool, sys.argv[2], d, check)
            failures += daemon_convention_checks(tool, sys.argv[2], d, check)
            failures += progress_checks(tool, sys.argv[2], d, check)
            failures += persist_get_checks(tool, sys.argv[2], d, check)
    sys.exit(1 if failures else 0)


def daemon_checks(tool, daemon, d, check):
    """put and lease through a real daemon give the id `tensorreg digest` gives."""
    sock = os.path.join(d, "run", "tensorregd.sock")
    log = open(os.path.join(d, "daemon.log"), "w+")
    proc = subprocess.Popen([daemon, "--socket", sock], stdout=log, stderr=subprocess.STDOUT)
    lease = None
    try:
        for _ in range(200):
            log.seek(0)
            if "ready" in log.read():
                break
            time.sleep(0.05)
        tensors = {"w": ("F32", [1025, 1024], os.urandom(1025 * 1024 * 4)), "b": ("BF16", [3], os.urandom(6))}
        model = os.path.join(d, "daemon-model.safetensors")
        write_safetensors(model, tensors)
        text, buf = reference_index(tensors)
        with open(os.path.join(d, "daemon-index.json"), "w") as f:
            f.write(text)
        with open(os.path.join(d, "daemon-canonical.bin"), "wb") as f:
            f.write(buf)
        digest = run(tool, "digest", "--index", os.path.join(d, "daemon-index.json"),
                     "--data", os.path.join(d, "daemon-canonical.bin")).stdout.splitlines()[-1].split()[1]
        put = json.loads(run(tool, "put", "--socket", sock, "--json", model).stdout)
        check(put["artifact_id"] == digest and not put["existed"], "put through tensorregd gives the digest id")
        again = json.loads(run(tool, "put", "--socket", sock, "--json", model).stdout)
        check(again["existed"], "a second put answers existed=true")
        copied = json.loads(run(tool, "put", "--copy", "--socket", sock, "--json", model).stdout)
        check(copied["existed"] and copied["artifact_id"] == digest, "put --copy (the client copies) gives the same id")
        lease = subprocess.Popen([tool, "lease", "--socket", sock, "--json", model], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
        leased = json.loads(lease.stdout.readline())
        check(leased["artifact_id"] == digest, "lease through tensorregd gives the digest id")
        listed = json.loads(run(tool, "ls", "--socket", sock, "--json").stdout)
        check(len(listed) == 1 and set(listed[0]["tiers"]) == {"leased", "stable_dram"}, "ls shows both tiers")
        shown = json.loads(run(tool, "show", "--socket", sock, "--json", digest).stdout)
        check(shown["index"] == json.loads(text), "show returns the canonical index")
        check(run(tool, "index", "--socket", sock, digest).stdout.strip() == text, "index ID prints the canonical bytes")
        lease.send_signal(signal.SIGTERM)
        lease.wait(timeout=10)
        stats = json.loads(run(tool, "stats", "--socket", sock, "--json").stdout)
        # The second put's join went with its process too (owner exit), so nothing is leased.
        check(stats["leases"] == 0 and stats["regions"] == 0 and stats["artifacts"] == 1,
              "the lease and its region go when the holder stops; the stable copy stays")
        gone = run(tool, "show", "--socket", sock, "mi2:nope", expect_ok=False)
        check(gone.returncode != 0 and "NOT_FOUND" in gone.stderr, "show of an unknown id is NOT_FOUND")
        failures = view_checks(tool, sock, digest, tensors, check)
        exported = os.path.join(d, "exported.safetensors")
        run(tool, "export", "--socket", sock, digest, "--out", exported)
        again_id = run(tool, "index", exported).stdout.splitlines()[-1].split()[1]
        check(again_id == digest, "export writes a safetensors file whose index gives the same id")
        dereg = json.loads(run(tool, "deregister", "--socket", sock, "--json", digest).stdout)
        check(dereg["removed"], "deregister removes the artifact")
    finally:
        if lease and lease.poll() is None:
            lease.kill()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
    check(code == 0 and not os.path.exists(sock), "tensorregd stops cleanly on SIGTERM")
    return failures


def view_checks(tool, sock, digest, tensors, check):
    """tensorreg view registers a view of an artifact from the shell; show lists it (issue #18)."""
    failures = 0
    rows, cols = tensors["w"][1]
    w = memoryview(tensors["w"][2]).cast("I")
    transposed = b"".join(w[j::cols].tobytes() for j in range(cols))
    b = tensors["b"][2]
    expected = b + bytes(-len(b) % 8) + transposed
    hashed = multihash(hashlib.sha256(expected).digest())
    out = run(tool, "view", "--socket", sock, digest, "--transpose", "w:0:1").stdout.splitlines()
    out = [line.strip() for line in out]
    view_id = out[0]
    failures += check(view_id.startswith("bciq") and f"artifact   {digest}" in out and f"data_hash  {hashed}" in out,
                      "view --transpose prints the view_id, the artifact and the view's data hash")
    again = json.loads(run(tool, "view", "--socket", sock, "--json", digest[:12], "--transpose", "w:0:1",
                           "--placement", "client").stdout)
    failures += check(again["view_id"] == view_id and again["view_data_hash"] == hashed and
                      again["registration_kind"] == "CANONICAL" and again["artifact_id"] == digest and
                      again["view_index"]["w"][2] == [cols, rows],
                      "view --json with CLIENT placement answers the same view_id and hash")
    shown = json.loads(run(tool, "show", "--socket", sock, "--json", digest).stdout)
    failures += check([(v["view_id"], v["spec"], v["view_size"]) for v in shown["views"]] ==
                      [(view_id, "b w:transpose(0,1)", len(expected))], "show --json lists the registered view")
    human = run(tool, "show", "--socket", sock, digest).stdout
    failures += check("VIEW" in human and view_id in human and "w:transpose(0,1)" in human,
                      "show lists the artifact's views for people")
    partial = run(tool, "view", "--socket", sock, digest, "--narrow", "w:0:0:5", expect_ok=False)
    failures += check(partial.returncode == 1 and "INVALID_ARGUMENT" in partial.stderr and
                      "a CANONICAL view must cover every byte" in partial.stderr,
                      "a view that does not cover the artifact is refused with the daemon's message")
    for args, what in [(["--narrow", "w:0:5"], "a --narrow without its length"),
                       (["--transpose", "w:a:1"], "a --transpose dim that is not a number"),
                       (["--transpose", "w:0:1", "--placement", "sideways"], "an unknown --placement"),
                       ([], "no op at all")]:
        bad = run(tool, "view", "--socket", sock, digest, *args, expect_ok=False)
        failures += check(bad.returncode == 2 and bad.stderr.startswith("tensorreg: ") and
                          len(bad.stderr.strip().splitlines()) == 1, f"view refuses {what} as a usage error")
    return failures


def convention_checks(tool, daemon, check):
    """--version, <command> --help, and the help of every command (issue #20, CLI conventions)."""
    failures = 0
    v = run(tool, "--version")
    failures += check(v.returncode == 0 and v.stdout.startswith("tensorreg ") and v.stdout.strip()[-1].isdigit(),
                      "tensorreg --version prints its version")
    if daemon:
        dv = run(daemon, "--version")
        failures += check(dv.returncode == 0 and dv.stdout.split() == ["tensorregd", v.stdout.split()[1]],
                          "tensorregd --version prints the same version")
        bad_addr = run(daemon, "--metrics-addr", "localhost", expect_ok=False)
        failures += check(bad_addr.returncode == 2 and "cannot use metrics address 'localhost': expected HOST:PORT"
                          in bad_addr.stderr, "tensorregd refuses a metrics address without a port")
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with tempfile.TemporaryDirectory() as d:
            busy = run(daemon, "--socket", os.path.join(d, "s.sock"), "--metrics-addr",
                       f"127.0.0.1:{taken.getsockname()[1]}", expect_ok=False)
        taken.close()
        failures += check(busy.returncode == 1 and "cannot listen for metrics on '127.0.0.1:" in busy.stderr and
                          "ready" not in busy.stdout, "tensorregd does not start when its metrics port is taken")
    for command in ["put", "lease", "ls", "show", "revoke", "stats", "status", "digest", "index", "rm", "top", "view",
                    "publish"]:
        h = run(tool, command, "--help", expect_ok=False)
        failures += check(h.returncode == 0 and h.stdout.startswith(f"usage: tensorreg {command}") and "--help" in h.stdout,
                          f"tensorreg {command} --help prints that command's usage")
    h = run(tool, "publish", "--help").stdout
    failures += check("--replicas" in h and "--all" in h and "--timeout" in h and "--json" in h,
                      "publish --help lists its options")
    h = run(tool, "put", "--help").stdout
    failures += check("--policy" in h and "--name" in h and "--socket" in h, "put --help lists its options")
    bad = run(tool, "ls", "--frobnicate", expect_ok=False)
    failures += check(bad.returncode == 2 and "--help" in bad.stderr, "an unknown option points at --help")
    comp = run(tool, "--completion", "bash").stdout
    failures += check("complete -F _tensorreg tensorreg" in comp and "--policy" in comp,
                      "the bash completion comes from the option table")
    zsh_comp = run(tool, "--completion", "zsh").stdout
    failures += check(zsh_comp.startswith("#compdef tensorreg") and "--policy[" in zsh_comp and
                      "(cache warm pinned durable)" in zsh_comp, "the zsh completion comes from the option table")
    zsh = shutil.which("zsh")
    if zsh is None:
        print("skip zsh -n of the completion: no zsh")
    else:
        parsed = subprocess.run([zsh, "-n"], input=zsh_comp, capture_output=True, text=True)
        failures += check(parsed.returncode == 0 and parsed.stderr == "",
                          f"zsh parses the zsh completion {parsed.stderr.strip()}")
    man = run(tool, "--man").stdout
    failures += check(man.startswith(".TH TENSORREG 1") and "TENSORREG_SOCKET" in man, "the man page is generated")
    return failures


def start_daemon(daemon, sock, log_path, *extra):
    log = open(log_path, "w+")
    proc = subprocess.Popen([daemon, "--socket", sock, *extra], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(200):
        log.seek(0)
        if "ready" in log.read():
            break
        time.sleep(0.05)
    return proc, log


def short(artifact_id):
    """The short id `ls` shows: 12 characters of the data multihash after its "bciq" header."""
    return artifact_id.rsplit(":", 1)[1][4:16]


def top_under_tmux(tool, sock, check):
    """`tensorreg top` on a real terminal (tmux): drawn in place, q quits. Skipped without tmux."""
    tmux = shutil.which("tmux")
    if tmux is None:
        print("skip top under tmux: no tmux (apt-get install tmux)")
        return 0
    server = f"tensorreg-test-{os.getpid()}"
    base = [tmux, "-L", server, "-f", "/dev/null"]
    failures = 0
    try:
        subprocess.run(base + ["new-session", "-d", "-x", "120", "-y", "30", "-s", "top",
                               f"TENSORREG_SOCKET={sock} {tool} top --interval-ms 100; sleep 30"], check=True)
        screen = ""
        for _ in range(100):
            time.sleep(0.1)
            screen = subprocess.run(base + ["capture-pane", "-p", "-t", "top"], capture_output=True,
                                    text=True).stdout
            if "my model" in screen:
                break
        time.sleep(0.5)  # several refreshes

        def one_view(text):
            return text.count("tensorregd at") == 1 and text.count("ID ") == 1 and "my model" in text

        for _ in range(10):  # a capture may fall between the clear and the frame
            screen = subprocess.run(base + ["capture-pane", "-p", "-t", "top"], capture_output=True,
                                    text=True).stdout
            if one_view(screen):
                break
            time.sleep(0.05)
        failures += check(one_view(screen), "top redraws one view in place on a terminal")
        subprocess.run(base + ["send-keys", "-t", "top", "q"], check=True)
        time.sleep(0.5)
        after = subprocess.run(base + ["capture-pane", "-p", "-t", "top"], capture_output=True, text=True).stdout
        shown = subprocess.run(base + ["list-panes", "-t", "top", "-F", "#{pane_current_command}"],
                               capture_output=True, text=True).stdout.strip()
        failures += check(shown == "sleep" and "tensorregd at" in after, "q quits top and leaves the last view")
    finally:
        subprocess.run(base + ["kill-server"], capture_output=True)
    return failures


def progress_checks(tool, daemon, d, check):
    """put, export and lease: progress (bytes, rate, time) on a terminal (tmux), none when piped,
    and the `time` printed is the wall time the user waited (issue #20)."""
    failures = 0
    sock = os.path.join(d, "run3", "tensorregd.sock")
    proc, log = start_daemon(daemon, sock, os.path.join(d, "daemon3.log"))
    env = dict(os.environ, TENSORREG_SOCKET=sock)
    model = os.path.join(d, "progress.safetensors")
    # Large enough that the bar is drawn more than once on any machine.
    write_safetensors(model, {"w": ("U8", [256 << 20], os.urandom(256 << 20))})
    try:
        # Piped: results only, no progress line, and the time is the whole wait.
        started = time.monotonic()
        piped = subprocess.run([tool, "put", model], capture_output=True, text=True, env=env)
        waited = time.monotonic() - started
        shown = [line.split()[1] for line in piped.stdout.splitlines() if line.strip().startswith("time")]
        failures += check(piped.returncode == 0 and piped.stderr == "" and "\r" not in piped.stdout and
                          "\x1b" not in piped.stdout, "put shows no progress when piped")
        failures += check(len(shown) == 1 and 0 < float(shown[0]) <= waited,
                          f"put's time is at most the wall time waited ({shown} <= {waited:.3f} s)")
        again = subprocess.run([tool, "put", "--json", model], capture_output=True, text=True, env=env)
        j = json.loads(again.stdout)
        failures += check(again.stderr == "" and j["existed"] and j["wall_seconds"] >= j["seconds"],
                          "put --json gives the wall time beside Begin->Commit")
        out = os.path.join(d, "progress-export.safetensors")
        exported = subprocess.run([tool, "export", j["artifact_id"], "--out", out], capture_output=True, text=True,
                                  env=env)
        failures += check(exported.returncode == 0 and exported.stderr == "" and "time" in exported.stdout,
                          "export prints its time and no progress when piped")
        os.unlink(out)
        failures += progress_under_tmux(tool, sock, model, j["artifact_id"], out, d, check)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        os.unlink(model)
    return failures


def progress_under_tmux(tool, sock, model, artifact_id, out, d, check):
    """On a terminal (tmux; everything written to it logged by pipe-pane): put, export and lease
    draw a progress line with bytes, the total and the time, redrawn in place, then erase it
    before the result. Skipped without tmux."""
    tmux = shutil.which("tmux")
    if tmux is None:
        print("skip progress under tmux: no tmux (apt-get install tmux)")
        return 0
    server = f"tensorreg-progress-{os.getpid()}"
    base = [tmux, "-L", server, "-f", "/dev/null"]
    raw = os.path.join(d, "terminal.log")
    go = os.path.join(d, "go")
    failures = 0
    script = (f"export TENSORREG_SOCKET={sock}; while [ ! -e {go} ]; do sleep 0.05; done; "
              f"{tool} rm {artifact_id}; {tool} put --name fresh {model}; {tool} export {artifact_id} --out {out}; "
              f"timeout -s INT 10 {tool} lease {model}; echo all-done; sleep 30")
    try:
        subprocess.run(base + ["new-session", "-d", "-x", "160", "-y", "40", "-s", "p", script], check=True)
        subprocess.run(base + ["pipe-pane", "-t", "p", f"cat >> {raw}"], check=True)
        open(go, "w").close()
        text = ""
        # Up to a minute: on a loaded 2-core runner the three 256 MiB commands took over 30 s.
        for _ in range(600):
            time.sleep(0.1)
            text = open(raw, errors="replace", newline="").read() if os.path.exists(raw) else ""
            if "all-done" in text:
                break
        for label in ["put fresh", "export ", "lease progress.safetensors"]:
            drawn = [part.replace("\x1b[K", "") for part in text.split("\r") if part.startswith(label) and "%" in part]
            failures += check(any("100%" in part and "of 256.0 MiB" in part and part.rstrip().endswith(" s")
                                  for part in drawn),
                              f"'{label.strip()}' draws bytes of the total and the time on a terminal")
        failures += check(text.count("\x1b[K") >= 3 and "iB/s" in text, "the line is redrawn in place with a rate")
        failures += check("put mi2:" in text and "exported " in text and "leased mi2:" in text,
                          "the results follow the erased progress lines")
    finally:
        subprocess.run(base + ["kill-server"], capture_output=True)
    return failures


def daemon_convention_checks(tool, daemon, d, check):
    """TENSORREG_SOCKET, ls names and short ids, show by prefix, revoke NOT_FOUND, lease watching
    its daemon, stats counters, policy errors in user words."""
    failures = 0
    sock = os.path.join(d, "run2", "tensorregd.sock")
    budget = 12 << 20
    proc, log = start_daemon(daemon, sock, os.path.join(d, "daemon2.log"), "--stable-bytes", str(budget),
                              "--trust-client-pids")  # so that another process may revoke a lease (DECISIONS §8)
    env = dict(os.environ, TENSORREG_SOCKET=sock)

    def cli(*args, expect_ok=True):
        p = subprocess.run([tool, *args], capture_output=True, text=True, env=env)
        if expect_ok and p.returncode != 0:
            raise AssertionError(f"{args} failed: {p.stderr}")
        return p

    lease = None
    try:
        first = os.path.join(d, "first.safetensors")
        second = os.path.join(d, "second.safetensors")
        big = os.path.join(d, "big.safetensors")
        write_safetensors(first, {"w": ("U8", [5 << 20], os.urandom(5 << 20))})
        write_safetensors(second, {"w": ("U8", [5 << 20], os.urandom(5 << 20))})
        write_safetensors(big, {"w": ("U8", [13 << 20], os.urandom(13 << 20))})
        a = json.loads(cli("put", "--json", first).stdout)
        failures += check(not a["existed"] and a["evicted"] == [], "TENSORREG_SOCKET picks the daemon")
        b = json.loads(cli("put", "--json", "--name", "my model", second).stdout)
        listed = {x["artifact_id"]: x for x in json.loads(cli("ls", "--json").stdout)}
        failures += check(listed[a["artifact_id"]]["name"] == "first.safetensors" and
                          listed[b["artifact_id"]]["name"] == "my model",
                          "ls names each artifact by its file name or --name")
        table = cli("ls").stdout.splitlines()
        failures += check(table[0].split()[:2] == ["ID", "NAME"] and
                          any(line.startswith(short(a["artifact_id"]) + " ") and "first.safetensors" in line
                              for line in table), "ls shows a short id and the name")
        shown = json.loads(cli("show", "--json", short(a["artifact_id"])[:8]).stdout)
        failures += check(shown["artifact_id"] == a["artifact_id"], "show accepts a unique prefix of the short id")
        shown = json.loads(cli("show", "--json", b["artifact_id"][:-6]).stdout)
        failures += check(shown["artifact_id"] == b["artifact_id"], "show accepts a unique prefix of the id")
        amb = cli("show", "mi2:", expect_ok=False)
        failures += check(amb.returncode == 1 and "ambiguous" in amb.stderr and a["artifact_id"] in amb.stderr and
                          b["artifact_id"] in amb.stderr, "an ambiguous prefix is refused, listing the candidates")
        unknown = cli("revoke", "reg_no_such_registration", expect_ok=False)
        failures += check(unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr,
                          "revoke of an unknown id fails with NOT_FOUND")

        # 10 of 12 MiB are held; 'pinned' does not evict: refused before the copy, in user words.
        third = os.path.join(d, "third.safetensors")
        write_safetensors(third, {"w": ("U8", [4 << 20], os.urandom(4 << 20))})
        pinned = cli("put", "--policy", "pinned", third, expect_ok=False)
        failures += check(pinned.returncode == 1 and "not enough room:" in pinned.stderr and
                          "MiB free of 12.0 MiB" in pinned.stderr and "'pinned' does not evict" in pinned.stderr and
                          "tensorreg rm" in pinned.stderr, "a pinned put that cannot fit says so in user words")
        too_big = cli("put", big, expect_ok=False)
        failures += check(too_big.returncode == 1 and "more than the daemon's whole stable budget" in too_big.stderr,
                          "a put larger than the budget says so")
        # The default policy evicts the least recently used entry, and the client hears which.
        c = json.loads(cli("put", "--json", third).stdout)
        failures += check(c["evicted"] == [a["artifact_id"]], "the put that caused an eviction is told what it evicted")
        log.seek(0)
        logged = log.read()
        failures += check(f"evicted artifact {a['artifact_id']}" in logged and
                          f"as {c['artifact_id']} evicted {a['artifact_id']} to make room" in logged,
                          "the eviction is logged with what was evicted, why and for whom")
        held = cli("put", "--json", "--policy", "warm", second, expect_ok=False)
        failures += check(held.returncode == 0 and json.loads(held.stdout)["existed"],
                          "content already held needs no room, whatever the policy")

        stats = json.loads(cli("stats", "--json").stdout)
        failures += check(stats["stable_budget_bytes"] == budget and stats["evictions"] == 1 and
                          stats["misses"] >= 3 and stats["hits"] >= 2 and stats["requests"] > 5 and
                          stats["uptime_seconds"] > 0 and stats["bytes_registered"] == 14 << 20 and
                          stats["stable_free_bytes"] == budget - (9 << 20),
                          "stats shows budget, free, hits, misses, evictions, uptime, requests")
        human = cli("stats").stdout
        failures += check(all(w in human for w in ["budget", "free", "hits", "misses", "evictions", "uptime",
                                                   "requests"]), "stats prints them for people too")
        status = cli("status").stdout
        failures += check("stable free" in status and "uptime" in status, "status shows free space and uptime")
        top = cli("top", "--count", "2", "--interval-ms", "50").stdout
        failures += check(top.count("requests") == 2 and "my model" in top, "top prints frames of the live view")

        failures += top_under_tmux(tool, sock, check)

        # A lease notices when it is revoked from elsewhere, and when the daemon dies.
        lease = subprocess.Popen([tool, "lease", "--json", first], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env)
        leased = json.loads(lease.stdout.readline())
        cli("revoke", leased["registration_id"])
        code = lease.wait(timeout=10)
        err = lease.stderr.read()
        failures += check(code == 1 and "was revoked" in err, "lease exits non-zero when its lease is revoked")
        lease = subprocess.Popen([tool, "lease", "--json", first], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env)
        json.loads(lease.stdout.readline())
        proc.kill()
        proc.wait(timeout=10)
        code = lease.wait(timeout=10)
        err = lease.stderr.read()
        failures += check(code == 1 and "daemon went away" in err, "lease exits non-zero when the daemon dies")
    finally:
        if lease and lease.poll() is None:
            lease.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return failures


def read_safetensors(path):
    """name -> (dtype, shape, bytes), with the `safetensors` package when /usr/bin/python3 has
    it (an independent reader), else by the format's own rules (8-byte length, JSON header)."""
    probe = subprocess.run(["/usr/bin/python3", "-c", "import safetensors.numpy"], capture_output=True)
    if probe.returncode == 0:
        code = ("import json,sys,safetensors.numpy as s; t=s.load_file(sys.argv[1]); "
                "print(json.dumps({k: [str(v.dtype), list(v.shape), v.tobytes().hex()] for k, v in t.items()}))")
        loaded = json.loads(subprocess.run(["/usr/bin/python3", "-c", code, path], capture_output=True, text=True,
                                           check=True).stdout)
        return {k: (None, shape, bytes.fromhex(blob)) for k, (_, shape, blob) in loaded.items()}
    with open(path, "rb") as f:
        data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    return {name: (e["dtype"], e["shape"], body[e["data_offsets"][0]:e["data_offsets"][1]])
            for name, e in header.items() if name != "__metadata__"}


def persist_get_checks(tool, daemon, d, check):
    """persist (SUCCESS, the copy on disk, tier shared_disk, no progress when piped, progress on a
    terminal; FAILED_PRECONDITION without --persist-dir), get/pull (restores a persisted
    artifact after a restart, --out writes a loadable file, NOT_FOUND for an unknown id), and
    cluster ls refusing plainly when the daemon is not in a cluster (issues #19, #20)."""
    failures = 0
    sock = os.path.join(d, "run4", "tensorregd.sock")
    persist = os.path.join(d, "persist4")
    env = dict(os.environ, TENSORREG_SOCKET=sock)

    def cli(*args, expect_ok=True):
        p = subprocess.run([tool, *args], capture_output=True, text=True, env=env)
        if expect_ok and p.returncode != 0:
            raise AssertionError(f"{args} failed: {p.stderr}")
        return p

    model = os.path.join(d, "persisted.safetensors")
    tensors = {"w": ("F32", [3, 1 << 20], os.urandom(12 << 20)), "b": ("BF16", [5], os.urandom(10))}
    write_safetensors(model, tensors)
    # Without --persist-dir: the daemon's FAILED_PRECONDITION reaches the user in plain words.
    proc, log = start_daemon(daemon, sock, os.path.join(d, "daemon4a.log"))
    try:
        artifact = json.loads(cli("put", "--json", model).stdout)["artifact_id"]
        refused = cli("persist", artifact, expect_ok=False)
        failures += check(refused.returncode == 1 and "FAILED_PRECONDITION" in refused.stderr and
                          "no persist directory" in refused.stderr and "--persist-dir" in refused.stderr and
                          len(refused.stderr.strip().splitlines()) == 1,
                          "persist without --persist-dir says the daemon has no persist directory")
        alone = cli("cluster", "ls", expect_ok=False)
        failures += check(alone.returncode == 1 and ("is not in one" in alone.stderr or
                                                     "built without the cluster" in alone.stderr),
                          "cluster ls against a daemon outside a cluster says so and asks for --etcd")
        lone = cli("publish", artifact, "--replicas", "2", expect_ok=False)
        failures += check(lone.returncode == 1 and "FAILED_PRECONDITION" in lone.stderr and
                          f"cannot publish {artifact}: the daemon runs without --cluster" in lone.stderr,
                          "publish against a daemon outside a cluster is FAILED_PRECONDITION, saying why")
        neither = cli("publish", artifact, expect_ok=False)
        both = cli("publish", artifact, "--replicas", "2", "--all", expect_ok=False)
        failures += check(neither.returncode == 2 and both.returncode == 2 and "--replicas N | --all" in neither.stderr,
                          "publish needs exactly one of --replicas N and --all")
        # docs/cluster.md §5, Policies: copies on other hosts without --cluster.
        remote_file = os.path.join(d, "remote.safetensors")
        write_safetensors(remote_file, {"r": ("U8", [4096], os.urandom(4096))})
        remote = cli("put", "--json", "--policy", "should:stable_dram:remote:2", remote_file, expect_ok=False)
        failures += check(remote.returncode == 0 and json.loads(remote.stdout)["remote_stable_tier"] ==
                          {"status": "degraded",
                           "message": "the policy asks for 3 hosts and the daemon runs without --cluster"},
                          "put --policy should:stable_dram:remote:2 without --cluster answers the tier DEGRADED")
        shown = cli("put", "--policy", "should:stable_dram:remote:2", remote_file, expect_ok=False)
        failures += check(shown.returncode == 0 and "replicas   degraded (the policy asks for 3 hosts" in shown.stdout,
                          "put prints the remote tier's result")
        must = cli("put", "--policy", "must:stable_dram:remote:1", remote_file, expect_ok=False)
        failures += check(must.returncode == 1 and "FAILED_PRECONDITION" in must.stderr and
                          "--cluster" in must.stderr, "a must remote tier without --cluster is refused")
        typo = cli("put", "--policy", "should:stable_dram:remote:x", remote_file, expect_ok=False)
        failures += check(typo.returncode == 1 and "cannot parse policy" in typo.stderr,
                          "a policy that does not parse says so")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)

    proc, log = start_daemon(daemon, sock, os.path.join(d, "daemon4b.log"), "--persist-dir", persist)
    try:
        artifact = json.loads(cli("put", "--json", model).stdout)["artifact_id"]
        size = os.path.getsize(model)
        piped = cli("persist", short(artifact))
        lines = piped.stdout.splitlines()
        failures += check(piped.stderr == "" and "\r" not in piped.stdout and "\x1b" not in piped.stdout and
                          lines[0] == f"persisted {artifact}" and
                          any(line.split() == ["state", "SUCCESS"] for line in lines) and
                          any(line.split()[:1] == ["task"] and len(line.split()) == 2 for line in lines) and
                          any(line.split()[:1] == ["time"] for line in lines),
                          "persist waits, prints task, SUCCESS and the time, and no progress when piped")
        on_disk = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(persist) for f in files)
        listed = {x["artifact_id"]: x for x in json.loads(cli("ls", "--json").stdout)}
        failures += check(on_disk >= listed[artifact]["total_size"] > 0 and
                          "shared_disk" in listed[artifact]["tiers"] and "stable_dram" in listed[artifact]["tiers"],
                          f"the persisted bytes are on disk ({on_disk} B) and ls lists tier shared_disk")
        again = json.loads(cli("persist", "--json", artifact).stdout)
        failures += check(again["state"] == "SUCCESS" and again["artifact_id"] == artifact and again["task_id"] and
                          again["progress"] == 1.0 and again["wall_seconds"] > 0,
                          "persist --json of a persisted artifact answers SUCCESS")
        nowait = cli("persist", "--no-wait", artifact)
        failures += check(nowait.stdout.startswith(f"persisting {artifact}") and "task" in nowait.stdout,
                          "persist --no-wait prints the task and returns")
        unknown = cli("persist", "mi2:bciqnothing", expect_ok=False)
        failures += check(unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr,
                          "persist of an unknown artifact fails with NOT_FOUND")
        failures += persist_get_under_tmux(tool, sock, artifact, d, check)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)

    # A restarted daemon holds the artifact on disk only; get restores it into stable DRAM.
    proc, log = start_daemon(daemon, sock, os.path.join(d, "daemon4c.log"), "--persist-dir", persist)
    try:
        before = {x["artifact_id"]: x for x in json.loads(cli("ls", "--json").stdout)}
        failures += check(before[artifact]["tiers"] == ["shared_disk"], "after a restart it is on disk only")
        out = os.path.join(d, "got.safetensors")
        got = cli("get", artifact, "--out", out)
        lines = got.stdout.splitlines()
        failures += check(got.stderr == "" and lines[0] == f"got {artifact}" and
                          any(line.split() == ["from", "shared_disk"] for line in lines) and
                          any(line.split()[:1] == ["tiers"] and "stable_dram" in line for line in lines) and
                          any(line.split()[:1] == ["time"] for line in lines),
                          "get restores a persisted artifact after a restart and says from where")
        back = read_safetensors(out)
        failures += check(sorted(back) == sorted(tensors) and
                          all(back[k][2] == tensors[k][2] and list(back[k][1]) == tensors[k][1] for k in tensors),
                          "get --out writes a safetensors file with the same tensors")
        pulled = json.loads(cli("pull", "--json", short(artifact)).stdout)
        failures += check(pulled["artifact_id"] == artifact and pulled["source"] == "stable_dram" and
                          "stable_dram" in pulled["tiers"] and pulled["total_size"] == before[artifact]["total_size"],
                          "pull (get's alias) of a held artifact by short id answers from stable DRAM")
        missing = "mi2:bciqabsentabsentabsentabsentabsentabsentabsentabsent:bciqabsentabsentabsentabsent"
        nobody = cli("get", missing, expect_ok=False)
        failures += check(nobody.returncode == 1 and "NOT_FOUND" in nobody.stderr and missing in nobody.stderr,
                          "get of an id nobody holds fails with NOT_FOUND and the daemon's message")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        os.unlink(model)
    return failures


def persist_get_under_tmux(tool, sock, artifact, d, check):
    """On a terminal (tmux, its output logged by pipe-pane): persist draws the bytes written of
    the total, or a spinner while queued; get draws a spinner and the time, then the bytes of
    --out. Skipped without tmux."""
    tmux = shutil.which("tmux")
    if tmux is None:
        print("skip persist/get under tmux: no tmux (apt-get install tmux)")
        return 0
    server = f"tensorreg-persist-{os.getpid()}"
    base = [tmux, "-L", server, "-f", "/dev/null"]
    raw = os.path.join(d, "terminal4.log")
    go = os.path.join(d, "go4")
    big = os.path.join(d, "persist-big.safetensors")
    write_safetensors(big, {"w": ("U8", [192 << 20], os.urandom(192 << 20))})
    out = os.path.join(d, "tmux-got.safetensors")
    failures = 0
    put = subprocess.run([tool, "put", "--json", "--socket", sock, big], capture_output=True, text=True, check=True)
    big_id = json.loads(put.stdout)["artifact_id"]
    script = (f"export TENSORREG_SOCKET={sock}; while [ ! -e {go} ]; do sleep 0.05; done; "
              f"{tool} persist {big_id}; {tool} get {artifact} --out {out}; echo all-done; sleep 30")
    try:
        subprocess.run(base + ["new-session", "-d", "-x", "160", "-y", "40", "-s", "p", script], check=True)
        subprocess.run(base + ["pipe-pane", "-t", "p", f"cat >> {raw}"], check=True)
        open(go, "w").close()
        text = ""
        for _ in range(600):
            time.sleep(0.1)
            text = open(raw, errors="replace", newline="").read() if os.path.exists(raw) else ""
            if "all-done" in text:
                break
        parts = [part.replace("\x1b[K", "") for part in text.split("\r")]
        persisting = [p for p in parts if p.startswith("persist ")]
        failures += check(any(p.rstrip().endswith(" s") and ("of 192.0 MiB" in p or "queued" in p) for p in persisting),
                          "persist draws its progress (bytes of the total, or queued) and the time on a terminal")
        getting = [p for p in parts if p.startswith("get ")]
        failures += check(any("%" in p and "of 12.0 MiB" in p for p in getting) and
                          any(p.rstrip().endswith(" s") for p in getting),
                          "get draws the bytes of --out and the time on a terminal")
        failures += check("persisted mi2:" in text and f"got {artifact}" in text,
                          "the results follow the erased progress lines")
    finally:
        subprocess.run(base + ["kill-server"], capture_output=True)
        os.unlink(big)
        if os.path.exists(out):
            os.unlink(out)
    return failures


if __name__ == "__main__":
    main()
