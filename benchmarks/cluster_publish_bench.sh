#!/usr/bin/env bash
# benchmarks/cluster_publish_bench.sh — how long a publish waits for a member, against a pull
# that the member starts itself (issue #19, docs/cluster.md §5). One etcd and two daemons on
# 127.0.0.1 (no namespaces, no rate limit): what is timed is the catalogue's round trips, not
# the link.
#
#   cluster_publish_bench.sh BUILD_DIR [SIZE_MIB (default 16)] [REPEATS (default 7)]
#
# Per repeat, two fresh artifacts of SIZE_MIB are put on node1, then:
# - yardstick: `tensorreg get ID` on node2 of the first (node2 pulls it: the
#   catalogue's lookup, the pull, the commit);
# - `tensorreg publish ID --replicas 2` on node1 of the second (node1 writes an ask; node2
#   sees it, pulls, commits and advertises; node1 reads the catalogue until it does).
# Prints each pair and the medians; the ratio is publish / get. A member that looks for asks
# once a second makes that ratio grow by up to a second over the pull.
set -euo pipefail
build=$(cd "${1:?usage: cluster_publish_bench.sh BUILD_DIR [SIZE_MIB] [REPEATS]}" && pwd)
mib=${2:-16}
repeats=${3:-7}
here=$(cd "$(dirname "$0")" && pwd)
daemon=$build/daemon/tensorregd
cli=$build/cli/tensorreg
client=(/usr/bin/python3 "$here/../tests/cluster/netns_client.py")
command -v etcd >/dev/null || { echo "no etcd (apt-get install etcd-server)"; exit 77; }
[ -x "$daemon" ] && [ -x "$cli" ] || { echo "build tensorregd and tensorreg in $build first"; exit 1; }

tmp=$(mktemp -d /tmp/cluster-publish.XXXXXX)
declare -A pid
cleanup() {
  local rc=$?
  for name in "${!pid[@]}"; do kill -TERM "${pid[$name]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$rc" -ne 0 ]; then
    for f in "$tmp"/*.log; do echo "== $f"; tail -n 5 "$f"; done
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT INT TERM

port() { /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
client_port=$(port)
peer_port=$(port)
etcd --name e --data-dir "$tmp/etcd" --listen-client-urls "http://127.0.0.1:$client_port" \
  --advertise-client-urls "http://127.0.0.1:$client_port" --listen-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" --initial-cluster "e=http://127.0.0.1:$peer_port" \
  >"$tmp/etcd.log" 2>&1 &
pid[etcd]=$!
for _ in $(seq 100); do
  curl -s -m 1 -X POST "http://127.0.0.1:$client_port/v3/kv/range" -d '{"key":"eA=="}' >/dev/null 2>&1 && break
  sleep 0.1
done
for n in 1 2; do
  "$daemon" --socket "$tmp/d$n.sock" --no-warm-start --cluster "etcd://127.0.0.1:$client_port/bench" \
    --transfer-addr "127.0.0.1:$(port)" --host-id "node$n" >"$tmp/d$n.out" 2>"$tmp/d$n.log" &
  pid[d$n]=$!
  for _ in $(seq 100); do
    grep -q "ready on" "$tmp/d$n.out" 2>/dev/null && break
    sleep 0.1
  done
done

put() { "$cli" put "$1" --socket "$tmp/d1.sock" --json | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["artifact_id"])'; }
# listed ID: waits until node1 advertises ID (the commit's answer does not wait for it).
listed() {
  for _ in $(seq 100); do
    "$cli" cluster ls --json --etcd "etcd://127.0.0.1:$client_port/bench" | grep -q "$1" && return 0
    sleep 0.05
  done
  echo "node1 never advertised $1" >&2
  return 1
}
seconds() { /usr/bin/python3 -c 'import sys, time; print(f"{time.monotonic():.6f}")'; }

gets=()
publishes=()
for r in $(seq "$repeats"); do
  "${client[@]}" make "$tmp/a$r.safetensors" $((mib << 20)) $((2 * r))
  "${client[@]}" make "$tmp/b$r.safetensors" $((mib << 20)) $((2 * r + 1))
  id_a=$(put "$tmp/a$r.safetensors")
  id_b=$(put "$tmp/b$r.safetensors")
  listed "$id_a"
  listed "$id_b"
  t0=$(seconds)
  "$cli" get "$id_a" --socket "$tmp/d2.sock" >/dev/null
  t1=$(seconds)
  "$cli" publish "$id_b" --replicas 2 --socket "$tmp/d1.sock" >/dev/null
  t2=$(seconds)
  get_s=$(/usr/bin/python3 -c "print(f'{$t1 - $t0:.3f}')")
  publish_s=$(/usr/bin/python3 -c "print(f'{$t2 - $t1:.3f}')")
  echo "repeat $r: get ${get_s} s, publish ${publish_s} s"
  gets+=("$get_s")
  publishes+=("$publish_s")
  "$cli" rm "$id_a" --socket "$tmp/d1.sock" >/dev/null
  "$cli" rm "$id_b" --socket "$tmp/d1.sock" >/dev/null
  "$cli" rm "$id_a" --socket "$tmp/d2.sock" >/dev/null
  "$cli" rm "$id_b" --socket "$tmp/d2.sock" >/dev/null
  rm -f "$tmp/a$r.safetensors" "$tmp/b$r.safetensors"
done
/usr/bin/python3 - "${gets[*]}" "${publishes[*]}" "$mib" <<'PY'
import statistics, sys
gets = [float(x) for x in sys.argv[1].split()]
publishes = [float(x) for x in sys.argv[2].split()]
g, p = statistics.median(gets), statistics.median(publishes)
print(f"{sys.argv[3]} MiB, median of {len(gets)}: get on node2 {g:.3f} s, publish to node2 {p:.3f} s = {p / g:.2f}x")
PY
