#!/usr/bin/env python3
"""Scrapes a real tensorregd's --metrics-addr listener and reads the answer with Prometheus'
own text parser (Debian's python3-prometheus-client, scripts/install-deps).

Usage: metrics_scrape_test.py PATH/TO/tensorregd PATH/TO/tensorreg
Exits 77 (skipped) when prometheus_client is not installed.
"""
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    print("skipped: prometheus_client is not installed (apt-get install python3-prometheus-client)")
    sys.exit(77)


def write_safetensors(path, name, blob):
    header = {name: {"dtype": "U8", "shape": [len(blob)], "data_offsets": [0, len(blob)]}}
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + blob)


def raw_http(host, port, data, read=True):
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(data)
        if not read:
            return b""
        chunks = []
        while True:
            c = s.recv(65536)
            if not c:
                break
            chunks.append(c)
        return b"".join(chunks)


def main():
    daemon, tool = sys.argv[1], sys.argv[2]
    failures = 0

    def check(cond, what):
        nonlocal failures
        print(("ok   " if cond else "FAIL ") + what)
        failures += 0 if cond else 1

    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "run", "tensorregd.sock")
        log = open(os.path.join(d, "daemon.log"), "w+")
        proc = subprocess.Popen([daemon, "--socket", sock, "--stable-bytes", str(64 << 20),
                                 "--metrics-addr", "127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT,
                                env={k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"})
        try:
            url = None
            for _ in range(200):
                log.seek(0)
                text = log.read()
                m = re.search(r"metrics on (http://\S+)", text)
                if m and "ready" in text:
                    url = m.group(1)
                    break
                time.sleep(0.05)
            check(url is not None, "the daemon prints where its metrics are before the ready line")
            if url is None:
                print(text)
                sys.exit(1)
            host, port = re.match(r"http://([^:]+):(\d+)/metrics", url).groups()
            port = int(port)

            model = os.path.join(d, "model.safetensors")
            size = 3 * (1 << 20) + 5
            write_safetensors(model, "w", os.urandom(size))
            put = json.loads(subprocess.run([tool, "put", "--socket", sock, "--json", model], check=True,
                                            capture_output=True, text=True).stdout)
            check(put["total_size"] == size, "a put through the daemon")

            with urllib.request.urlopen(url, timeout=10) as r:
                body = r.read().decode()
                content_type = r.headers["Content-Type"]
            check(content_type.startswith("text/plain; version=0.0.4"), "served as the text format 0.0.4")
            families = {f.name: f for f in text_string_to_metric_families(body)}

            def value(name, sample=None, **labels):
                f = families.get(name)
                if f is None:
                    return None
                for s in f.samples:
                    if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items()):
                        return s.value
                return None

            # The parser strips _total from counter family names (OpenMetrics style).
            for name, kind in [("tensorreg_stable_bytes", "gauge"), ("tensorreg_stable_budget_bytes", "gauge"),
                               ("tensorreg_evictions", "counter"), ("tensorreg_rpc_duration_seconds", "histogram"),
                               ("tensorreg_bytes_registered", "counter"), ("tensorreg_bytes_hashed", "counter"),
                               ("tensorreg_bytes_copied", "counter"), ("tensorreg_leases", "gauge"),
                               ("tensorreg_regions", "gauge"), ("tensorreg_mappings", "gauge"),
                               ("tensorreg_clients", "gauge"), ("tensorreg_pending_registrations", "gauge"),
                               ("tensorreg_uptime_seconds", "gauge"), ("tensorreg_build_info", "gauge"),
                               ("tensorreg_cache_hits", "counter"), ("tensorreg_cache_misses", "counter")]:
                check(name in families and families[name].type == kind, f"{name} is a {kind}")
            check(value("tensorreg_bytes_registered", "tensorreg_bytes_registered_total") == size,
                  "after one put, bytes registered = its size")
            check(value("tensorreg_stable_bytes") == size, "the stable cache holds its bytes")
            check(value("tensorreg_stable_budget_bytes") == 64 << 20, "the budget")
            check(value("tensorreg_bytes_hashed", "tensorreg_bytes_hashed_total") >= size, "its bytes were hashed")
            check(value("tensorreg_evictions", "tensorreg_evictions_total") == 0, "nothing evicted")
            commits = value("tensorreg_rpc_duration_seconds", "tensorreg_rpc_duration_seconds_count",
                            method="CommitRegisteredArtifact", code="OK")
            check(commits is not None and commits >= 1, "the rpc histogram counted the commit")
            inf = value("tensorreg_rpc_duration_seconds", "tensorreg_rpc_duration_seconds_bucket",
                        method="CommitRegisteredArtifact", code="OK", le="+Inf")
            check(inf == commits, "its +Inf bucket equals its count")
            check(value("tensorreg_uptime_seconds") > 0, "uptime")
            check(value("tensorreg_build_info") == 1 and families["tensorreg_build_info"].samples[0].labels["version"],
                  "build info carries the version")

            # Everything but GET /metrics is 404; a request too long is refused; the daemon lives on.
            try:
                urllib.request.urlopen(url.replace("/metrics", "/"), timeout=10)
                check(False, "GET / is 404")
            except urllib.error.HTTPError as e:
                check(e.code == 404, "GET / is 404")
            post = raw_http(host, port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            check(post.startswith(b"HTTP/1.1 404"), "POST /metrics is 404")
            huge = raw_http(host, port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
            check(huge.startswith(b"HTTP/1.1 431"), "a request over the size limit is refused (431)")
            # Idle connections beyond the limit are closed; the daemon's own socket still answers.
            idle = [socket.create_connection((host, port), timeout=10) for _ in range(20)]
            stats = subprocess.run([tool, "stats", "--socket", sock, "--json"], capture_output=True, text=True,
                                   timeout=20)
            check(stats.returncode == 0 and json.loads(stats.stdout)["requests"] >= 4,
                  "the daemon answers while its metrics listener is full of idle connections")
            for s in idle:
                s.close()
            with urllib.request.urlopen(url, timeout=10) as r:
                again = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
            check("tensorreg_clients" in again, "the listener serves again once they are gone")
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=15)
        check(code == 0, "tensorregd stops cleanly with its metrics listener")
        log.seek(0)
        logged = [line for line in log.read().splitlines() if not line.startswith("tensorregd: ")]
        stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} (info|warning|error|debug) ")
        check(logged and all(stamp.match(line) for line in logged),
              "log lines carry a timestamp and a level outside journald")
        if failures:
            log.seek(0)
            print(log.read())
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
