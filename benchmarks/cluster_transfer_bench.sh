#!/usr/bin/env bash
# benchmarks/cluster_transfer_bench.sh — one pull between two daemons in two network
# namespaces (docs/cluster.md §3), next to a plain TCP stream over the same veth, each with the
# source's link unlimited and limited by tc to 2 Gbit/s. Root only.
#
#   cluster_transfer_bench.sh BUILD_DIR [SIZE_MIB (default 512)]
#
# TENSORREGD_ARGS: more options for both daemons (e.g. "--populated-reserve 536870912").
#
# The yardstick is a TCP stream of the same number of bytes from A to B (Python sockets, 64 MiB
# sends), measured in the same run on the same link, received into one 64 MiB buffer over and
# over ("tcp"). A second stream keeps the bytes, as a pull must: received into fresh memory of
# their size ("keep"), which on a VM whose first touch of a page is dear costs far more. "pull" is the transfer itself as the
# receiving daemon logs it (manifest, leaves striped and SHA-256-checked on arrival, into the
# stable DRAM registration's memfd); "get" is the client's GetArtifactMemfd end to end
# (catalogue lookup, pull, commit with the engine's own re-hash). Goal: pull ≥ 0.9× the stream.
set -euo pipefail
build=$(cd "${1:?usage: cluster_transfer_bench.sh BUILD_DIR [SIZE_MIB]}" && pwd)
mib=${2:-512}
here=$(cd "$(dirname "$0")" && pwd)
client=(/usr/bin/python3 "$here/../tests/cluster/netns_client.py")
[ "$(id -u)" -eq 0 ] || { echo "needs root"; exit 77; }

# shellcheck source=scripts/lib/netns.sh
. "$here/../scripts/lib/netns.sh"
subnet=$(netns_free_subnet 91) || { echo "no free 10.x.91.0/24"; exit 1; }
tag="trb$$"
tmp=$(mktemp -d /tmp/cluster-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  netns_remove_all
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

netns_bridge "${tag}br"
for host in e:10 1:21 2:22; do
  netns_host "${tag}br" "$tag${host%%:*}" "v${host%%:*}" "$subnet.${host##*:}"
done
netns_etcd "${tag}e" "$subnet.10" "$tmp/etcd" >"$tmp/etcd.log" 2>&1 &
pids+=($!)
netns_wait_etcd "${tag}e" "$subnet.10" || { echo "etcd did not start"; exit 1; }
for n in 1 2; do
  ip netns exec "$tag$n" unshare --uts sh -c "hostname bench$n-$tag; exec '$build/daemon/tensorregd' \
    --socket '$tmp/d$n.sock' --no-warm-start --cluster etcd://$subnet.10:2379/bench \
    --transfer-addr $subnet.$((20 + n)):7000 --host-id bench$n ${TENSORREGD_ARGS:-}" >"$tmp/d$n.out" 2>"$tmp/d$n.log" &
  pids+=($!)
done
for n in 1 2; do
  for _ in $(seq 100); do grep -q "ready on" "$tmp/d$n.out" 2>/dev/null && break; sleep 0.1; done
done

tcp_stream() {  # seconds for $mib MiB from A to B over TCP; $1 = reuse (one 64 MiB buffer) or keep
  ip netns exec "${tag}2" /usr/bin/python3 - "$subnet.22" "$mib" "$1" >"$tmp/tcp" <<'PY' &
import mmap, socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7100)); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); want = int(sys.argv[2]) << 20; got = 0; t0 = None
keep = sys.argv[3] == "keep"
buf = memoryview(mmap.mmap(-1, want) if keep else bytearray(64 << 20))  # mmap: untouched pages
while got < want:
    n = c.recv_into(buf[got:] if keep else buf)
    if n == 0: break
    if t0 is None: t0 = time.perf_counter()
    got += n
print(f"{got} {time.perf_counter() - t0:.6f}", flush=True)
PY
  local receiver=$!
  for _ in $(seq 50); do grep -q listening "$tmp/tcp" 2>/dev/null && break; sleep 0.1; done
  ip netns exec "${tag}1" /usr/bin/python3 - "$subnet.22" "$mib" <<'PY'
import socket, sys
c = socket.create_connection((sys.argv[1], 7100)); chunk = bytes(64 << 20); left = int(sys.argv[2]) << 20
while left > 0:
    n = min(left, len(chunk)); c.sendall(memoryview(chunk)[:n]); left -= n
c.close()
PY
  wait $receiver
  tail -1 "$tmp/tcp" | cut -d' ' -f2
}

printf '%-10s %10s %10s %10s %10s %9s %9s\n' link "tcp GiB/s" "keep GiB/s" "pull GiB/s" "get GiB/s" "pull/tcp" "pull/keep"
seed=1
for mode in unlimited 2gbit; do
  if [ "$mode" = 2gbit ]; then
    ip netns exec "${tag}1" tc qdisc add dev eth0 root tbf rate 2gbit burst 1mb latency 50ms
  fi
  "${client[@]}" make "$tmp/a.safetensors" $((mib << 20)) $seed
  id=$("$build/cli/tensorreg" put "$tmp/a.safetensors" --socket "$tmp/d1.sock" --json |
    /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["artifact_id"])')
  rm -f "$tmp/a.safetensors"
  sleep 1  # the advertisement (leaf digests hashed once on A)
  tcp_s=$(tcp_stream reuse)
  keep_s=$(tcp_stream keep)
  t0=$(date +%s.%N)
  "${client[@]}" digest "$tmp/d2.sock" "$id" >/dev/null
  get_s=$(echo "$(date +%s.%N) - $t0" | bc -l)
  pull_s=$(grep "pulled $id" "$tmp/d2.log" | sed -E 's/.* in ([0-9.]+) s .*/\1/')
  bytes=$(echo "$mib * 1048576" | bc)
  gib() { echo "scale=3; $bytes / $1 / 1073741824" | bc -l; }
  printf '%-10s %10s %10s %10s %10s %9s %9s\n' "$mode" "$(gib "$tcp_s")" "$(gib "$keep_s")" "$(gib "$pull_s")" \
    "$(gib "$get_s")" "$(echo "scale=2; $tcp_s / $pull_s" | bc -l)" "$(echo "scale=2; $keep_s / $pull_s" | bc -l)"
  "$build/cli/tensorreg" rm "$id" --socket "$tmp/d2.sock" >/dev/null
  seed=$((seed + 1))
done
