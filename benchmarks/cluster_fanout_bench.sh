#!/usr/bin/env bash
# benchmarks/cluster_fanout_bench.sh — fan-out of one artifact and a pull that loses a source
# (issue #19, docs/cluster.md §3.3), between daemons in network namespaces whose links are
# limited with tc. Root only; the namespaces it creates are removed on exit, failure included.
#
#   cluster_fanout_bench.sh BUILD_DIR [SIZE_MIB (default 512)] [RATE (default 200mbit)]
#
# Environment: FANOUT_RECEIVERS (default "1 3 7": the fan-outs to time, the first is the
# yardstick), FANOUT_KILL=0 (skip the kill at 50 %), FANOUT_KEEP_LOGS=DIR (copy the daemons'
# and etcd's logs there before the namespaces go).
#
# Every host's link is limited to RATE in both directions (tc tbf on its eth0 and on the
# bridge's end of its veth): a NIC of that speed, full duplex.
#
# (a) Fan-out: the origin holds the artifact; 1, 3 and 7 receivers ask for it at the same time
#     (`tensorreg get ID`: the daemon pulls, verifies and commits it). The number is the time
#     until the LAST receiver has it. The yardstick is the single-receiver time of the same run. Goal: 7 receivers
#     <= 1.25x the single receiver.
# (b) Kill at 50 %: two hosts hold the artifact, a third pulls it; undisturbed, then again
#     (another artifact of the same size) with one source SIGKILLed when half the undisturbed
#     time has passed. Goal: <= 1.5x the undisturbed pull.
# Each receiver's bytes are checked (SHA-256 of what it serves) after the timing.
set -euo pipefail
build=$(cd "${1:?usage: cluster_fanout_bench.sh BUILD_DIR [SIZE_MIB] [RATE]}" && pwd)
mib=${2:-512}
rate=${3:-200mbit}
here=$(cd "$(dirname "$0")" && pwd)
client=(/usr/bin/python3 "$here/../tests/cluster/netns_client.py")
daemon=$build/daemon/tensorregd
cli=$build/cli/tensorreg
[ "$(id -u)" -eq 0 ] || { echo "needs root"; exit 77; }
[ -x "$daemon" ] && [ -x "$cli" ] || { echo "build tensorregd and tensorreg in $build first"; exit 1; }

# shellcheck source=scripts/lib/netns.sh
. "$here/../scripts/lib/netns.sh"
subnet=$(netns_free_subnet 93) || { echo "no free 10.x.93.0/24"; exit 1; }
tag="trf$$"
tmp=$(mktemp -d /tmp/cluster-fanout.XXXXXX)
declare -A pid
cleanup() {
  local rc=$?
  for name in "${!pid[@]}"; do kill -9 "${pid[$name]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  netns_remove_all
  if [ "$rc" -ne 0 ]; then
    echo "--- failed; daemon logs:"
    for f in "$tmp"/*.log; do echo "== $f"; tail -n 5 "$f"; done
  fi
  [ -z "${FANOUT_KEEP_LOGS:-}" ] || cp "$tmp"/*.log "$FANOUT_KEEP_LOGS"/ 2>/dev/null || true
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT INT TERM
die() { echo "FAIL: $*" >&2; exit 1; }

netns_bridge "${tag}br"
# add_host NAME OCTET: a namespace on the bridge, its link limited to $rate both ways.
add_host() {
  netns_host "${tag}br" "$tag$1" "v$1" "$subnet.$2"
  if [ "$1" != e ]; then
    ip -n "$tag$1" link set eth0 txqueuelen 1000
    tc -n "$tag$1" qdisc add dev eth0 root tbf rate "$rate" burst 256kb latency 100ms
    tc -n "${tag}br" qdisc add dev "v$1" root tbf rate "$rate" burst 256kb latency 100ms
  fi
}
add_host e 10
for n in $(seq 0 7); do add_host "$n" $((20 + n)); done
netns_etcd "${tag}e" "$subnet.10" "$tmp/etcd" >"$tmp/etcd.log" 2>&1 &
pid[etcd]=$!
netns_wait_etcd "${tag}e" "$subnet.10" || die "etcd did not start"
start_daemon() {
  local n=$1
  rm -f "$tmp/d$n.sock" "$tmp/d$n.out"
  ip netns exec "$tag$n" unshare --uts sh -c "hostname fan$n-$tag; exec '$daemon' --socket '$tmp/d$n.sock' \
    --no-warm-start --cluster etcd://$subnet.10:2379/fanout --transfer-addr $subnet.$((20 + n)):7000 \
    --host-id fan$n" >"$tmp/d$n.out" 2>>"$tmp/d$n.log" &
  pid[d$n]=$!
  for _ in $(seq 100); do
    grep -q "ready on" "$tmp/d$n.out" 2>/dev/null && return 0
    sleep 0.1
  done
  die "daemon $n did not start"
}
for n in $(seq 0 7); do start_daemon "$n"; done

# new_artifact SEED HOST...: puts an artifact of $mib MiB made from SEED on each HOST, waits
# until each advertises it, prints its id. Every case has an artifact of its own: a removed one
# may still be listed for its former holders (docs/cluster.md §7).
new_artifact() {
  local seed=$1
  shift
  "${client[@]}" make "$tmp/a.safetensors" $((mib << 20)) "$seed"
  local id="" n
  for n in "$@"; do
    id=$("$cli" put "$tmp/a.safetensors" --socket "$tmp/d$n.sock" --json |
      /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["artifact_id"])')
  done
  rm -f "$tmp/a.safetensors"
  for n in "$@"; do
    for _ in $(seq 200); do
      ip netns exec "${tag}e" curl -s -X POST "http://$subnet.10:2379/v3/kv/range" \
        -d "{\"key\":\"$(printf '/fanout/replicas/%s/fan%s' "$id" "$n" | base64 -w0)\"}" | grep -q '"kvs"' && break
      sleep 0.1
    done
  done
  echo "$id"
}
# fetch_all ID HOST...: asks every HOST for ID at once; prints the seconds until the last has it.
fetch_all() {
  local id=$1 n t0 last=0 fetchers=()
  shift
  t0=$(date +%s.%N)
  for n in "$@"; do
    ("$cli" get --json --socket "$tmp/d$n.sock" "$id" >"$tmp/fetch$n" 2>&1 && date +%s.%N >"$tmp/done$n") &
    fetchers+=($!)
  done
  for p in "${fetchers[@]}"; do wait "$p" || true; done
  for n in "$@"; do
    [ -s "$tmp/done$n" ] || die "fan$n did not get $id: $(cat "$tmp/fetch$n")"
    last=$(echo "if ($(cat "$tmp/done$n") > $last) $(cat "$tmp/done$n") else $last" | bc -l)
  done
  echo "$last - $t0" | bc -l
}
# check ID WANT HOST...: every HOST serves the bytes WANT says; then ID is removed from them.
check_and_remove() {
  local id=$1 want=$2 n
  shift 2
  for n in "$@"; do
    [ "$("${client[@]}" digest "$tmp/d$n.sock" "$id")" = "$want" ] || die "fan$n holds other bytes for $id"
    "$cli" rm "$id" --socket "$tmp/d$n.sock" >/dev/null
  done
}
pull_line() { grep "pulled $2" "$tmp/d$1.log" | tail -1 | sed -E 's/.*cluster: pulled [^ ]+ //'; }

echo "# fan-out of $mib MiB from one origin, every link $rate both ways ($(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
printf '%-10s %10s %12s\n' receivers "last (s)" "x single"
single=""
for receivers in ${FANOUT_RECEIVERS:-1 3 7}; do
  rm -f "$tmp"/done* "$tmp"/fetch*
  id=$(new_artifact "$receivers" 0)
  want=$("${client[@]}" digest "$tmp/d0.sock" "$id")
  hosts=$(seq 1 "$receivers")
  # shellcheck disable=SC2086
  seconds=$(fetch_all "$id" $hosts)
  [ -n "$single" ] || single=$seconds
  printf '%-10s %10.2f %12.2f\n' "$receivers" "$seconds" "$(echo "$seconds / $single" | bc -l)"
  for n in $hosts; do echo "    fan$n: $(pull_line "$n" "$id")"; done
  # shellcheck disable=SC2086
  check_and_remove "$id" "$want" $hosts
  "$cli" rm "$id" --socket "$tmp/d0.sock" >/dev/null
done

[ "${FANOUT_KILL:-1}" = 1 ] || exit 0
echo "# pull of $mib MiB from two sources (fan0, fan1) into fan2; fan0 SIGKILLed at 50 % of the undisturbed time"
rm -f "$tmp"/done* "$tmp"/fetch*
id=$(new_artifact 20 0 1)
want=$("${client[@]}" digest "$tmp/d0.sock" "$id")
undisturbed=$(fetch_all "$id" 2)
echo "    undisturbed: $(printf '%.2f' "$undisturbed") s; fan2: $(pull_line 2 "$id")"
check_and_remove "$id" "$want" 2
rm -f "$tmp"/done* "$tmp"/fetch*
id=$(new_artifact 21 0 1)
want=$("${client[@]}" digest "$tmp/d0.sock" "$id")
(sleep "$(echo "$undisturbed / 2" | bc -l)" && kill -9 "${pid[d0]}") &
killer=$!
killed=$(fetch_all "$id" 2)
wait $killer
unset 'pid[d0]'
echo "    fan0 killed: $(printf '%.2f' "$killed") s ($(printf '%.2f' "$(echo "$killed / $undisturbed" | bc -l)")x undisturbed); fan2: $(pull_line 2 "$id")"
grep -q "source fan0 .* dropped" "$tmp/d2.log" || die "fan2 did not see fan0 die mid-pull"
check_and_remove "$id" "$want" 2
