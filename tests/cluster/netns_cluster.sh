#!/usr/bin/env bash
# tests/cluster/netns_cluster.sh — a small tensorreg cluster in network namespaces (issue #19,
# docs/cluster.md §6): one etcd and four daemons, each in a namespace of its own with its own
# host name, joined by veth pairs to a bridge that lives in a further namespace. Nothing is
# created in the caller's namespace and no address outside the private /24 it picks is touched;
# everything is torn down on exit, failure included.
#
#   netns_cluster.sh BUILD_DIR
#
# Cases: put on A, get by id on B (same bytes); a second version of A on B takes the leaves the
# two share from A; fan-out to three receivers; `tensorreg cluster
# ls` lists the four hosts alive and what they hold; `tensorreg get ID --out` on a host without
# it pulls it (the same file as an export where it was put); `tensorreg publish ID --replicas 3`
# places two more replicas and waits for them; `tensorreg put --policy
# should:stable_dram:remote:2` answers READY once two other hosts hold it, and DEGRADED within
# --replica-timeout-ms for more hosts than members; fan-out as a pipeline (a receiver
# serves leaves it has verified to another while it still pulls, and `cluster ls` lists it as
# pulling meanwhile); the source
# SIGKILLed mid-transfer (its link limited with tc so that the kill lands mid-pull); etcd
# stopped (cluster gets UNAVAILABLE, local puts work) and restarted (members register again,
# what was put during the outage is advertised); a corrupt source (a daemon that flips a byte
# of every leaf it serves) next to a good one; a daemon restarted with --persist-dir advertises
# what it persisted again and serves it, the only source; two daemons on a shared persist
# volume, one of them gone: a host off the volume gets the copy through the other.
# Exit 0 when every case passes, 1 on a failure, 77 (ctest SKIP) without root, etcd or ip.
set -euo pipefail

build=${1:?usage: netns_cluster.sh BUILD_DIR}
build=$(cd "$build" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
daemon=$build/daemon/tensorregd
cli=$build/cli/tensorreg
client=(/usr/bin/python3 "$here/netns_client.py")

skip() { echo "SKIP: $*"; exit 77; }
[ "$(id -u)" -eq 0 ] || skip "needs root (network namespaces)"
command -v ip >/dev/null || skip "no ip (iproute2)"
command -v etcd >/dev/null || skip "no etcd (apt-get install etcd-server)"
command -v unshare >/dev/null || skip "no unshare (util-linux)"
[ -x "$daemon" ] && [ -x "$cli" ] || { echo "FAIL: build tensorregd and tensorreg in $build first"; exit 1; }
# shellcheck source=scripts/lib/netns.sh
. "$here/../../scripts/lib/netns.sh"
netns_can_create || skip "cannot create network namespaces here"
subnet=$(netns_free_subnet 17 71 113) || skip "no free 10.x.y.0/24 here"

tag="trc$$"
tmp=$(mktemp -d "/tmp/netns-cluster.XXXXXX")
bridge_ns="${tag}br"
declare -A pid
started=$(date +%s)

cleanup() {
  local rc=$?
  for name in "${!pid[@]}"; do kill -9 "${pid[$name]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  netns_remove_all
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ]; then
    echo "--- logs (failure) in $tmp:"
    for f in "$tmp"/*.log; do echo "== $f"; tail -n 15 "$f"; done
  else
    rm -rf "$tmp"
  fi
  exit "$rc"
}
trap cleanup EXIT INT TERM

fail() { echo "FAIL: $*"; exit 1; }
pass() { echo "PASS: $* ($(($(date +%s) - started)) s)"; }

netns_bridge "$bridge_ns"
# add_host NAME LAST_OCTET: namespace $tag$NAME with eth0 at $subnet.LAST_OCTET on the bridge.
add_host() { netns_host "$bridge_ns" "$tag$1" "v$1" "$subnet.$2"; }

etcd_ip="$subnet.10"
start_etcd() {
  netns_etcd "${tag}e" "$etcd_ip" "$tmp/etcd" >>"$tmp/etcd.log" 2>&1 &
  pid[etcd]=$!
  netns_wait_etcd "${tag}e" "$etcd_ip" || fail "etcd did not start"
}

# start_daemon N [ARGS...]: tensorregd in namespace N, transfers on $subnet.(20+N):7000, host id
# nodeN.
start_daemon() {
  local n=$1
  shift
  local extra="$*"
  rm -f "$tmp/d$n.sock" "$tmp/d$n.out"
  ip netns exec "$tag$n" unshare --uts sh -c "hostname node$n-$tag; exec '$daemon' --socket '$tmp/d$n.sock' \
    --no-warm-start --cluster etcd://$etcd_ip:2379/tensorreg --transfer-addr $subnet.$((20 + n)):7000 \
    --host-id node$n --replica-timeout-ms 5000 $extra" >"$tmp/d$n.out" 2>>"$tmp/d$n.log" &
  pid[d$n]=$!
  for _ in $(seq 100); do
    grep -q "ready on" "$tmp/d$n.out" 2>/dev/null && return 0
    sleep 0.1
  done
  fail "daemon $n did not start"
}

# stop_daemon N: SIGTERM to daemon N, which must exit cleanly (its keys leave with its lease).
stop_daemon() {
  kill -TERM "${pid[d$1]}"
  wait "${pid[d$1]}" || fail "node$1 did not stop cleanly on SIGTERM"
  unset "pid[d$1]"
}

# put_durable N FILE: FILE put on daemon N with the durable policy, its copy on disk waited
# for; the artifact id.
put_durable() {
  local id persisted
  id=$("$cli" put "$2" --policy durable --socket "$tmp/d$1.sock" --json |
    /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["artifact_id"])') || fail "durable put on node$1"
  persisted=$("$cli" persist "$id" --socket "$tmp/d$1.sock" --json) || fail "persist $id on node$1: $persisted"
  echo "$persisted" | grep -q '"state":"SUCCESS"' || fail "persist $id on node$1 answered $persisted"
  echo "$id"
}

put() {  # put N FILE → the artifact id
  "$cli" put "$2" --socket "$tmp/d$1.sock" --json | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["artifact_id"])'
}
digest() { "${client[@]}" digest "$tmp/d$1.sock" "$2"; }
# get_when_listed N ID: the digest on daemon N once some member advertises ID (advertising runs
# after the commit's answer).
get_when_listed() {
  local out
  for _ in $(seq 50); do
    out=$(digest "$1" "$2") && { echo "$out"; return 0; }
    case "$out" in *NotFound*) sleep 0.2 ;; *) echo "$out"; return 1 ;; esac
  done
  echo "$out"
  return 1
}

add_host e 10
for n in 1 2 3 4; do add_host "$n" $((20 + n)); done
start_etcd
for n in 1 2 3 4; do start_daemon "$n"; done
pass "setup: etcd and 4 daemons on $subnet.0/24"

# 1. Put on A, get by id on B: the same bytes.
"${client[@]}" make "$tmp/a.safetensors" $((24 << 20)) 1
id_a=$(put 1 "$tmp/a.safetensors")
want=$(digest 1 "$id_a")
got=$(get_when_listed 2 "$id_a") || fail "get of $id_a on node2: $got"
[ "$got" = "$want" ] || fail "node2 got '$got' for $id_a, node1 holds '$want'"
pass "put on node1, get by id on node2: $id_a"

# 1b. A second version: A with one byte changed (one leaf of six). node2, which holds A, copies
# the five leaves the two share from A and pulls one from node1.
cp "$tmp/a.safetensors" "$tmp/a2.safetensors"
printf '\377' | dd of="$tmp/a2.safetensors" bs=1 seek=$((20 << 20)) conv=notrunc status=none
id_a2=$(put 1 "$tmp/a2.safetensors")
[ "$id_a2" != "$id_a" ] || fail "the changed file has A's id"
want=$(digest 1 "$id_a2")
got=$(get_when_listed 2 "$id_a2") || fail "get of $id_a2 on node2: $got"
[ "$got" = "$want" ] || fail "node2 got '$got' for $id_a2, node1 holds '$want'"
line=$(grep "pulled $id_a2" "$tmp/d2.log") || fail "node2 logged no pull of $id_a2"
case "$line" in
  *"node1 1;"*"; 5 leaves copied from artifacts held here"*) ;;
  *) fail "node2 pulled $id_a2 as: $line" ;;
esac
pass "a second version on node2: 5 of its 6 leaves copied from A, 1 pulled"

# 2. Fan-out: three receivers at once.
"${client[@]}" make "$tmp/b.safetensors" $((40 << 20)) 2
id_b=$(put 1 "$tmp/b.safetensors")
want=$(digest 1 "$id_b")
get_when_listed 2 "$id_b" >"$tmp/fan2" &
f2=$!
get_when_listed 3 "$id_b" >"$tmp/fan3" &
f3=$!
get_when_listed 4 "$id_b" >"$tmp/fan4" &
f4=$!
wait $f2 && wait $f3 && wait $f4 || fail "a fan-out get failed: $(cat "$tmp"/fan?)"
for n in 2 3 4; do [ "$(cat "$tmp/fan$n")" = "$want" ] || fail "node$n got '$(cat "$tmp/fan$n")' for $id_b"; done
pass "fan-out of $id_b to 3 receivers"

# 2b. `tensorreg cluster ls` (issue #20): the 4 hosts, alive, with their transfer addresses, and
# what each holds; the etcd URL from the daemon's GetServerConfig, or --etcd. Run in node2's
# namespace, where etcd is reachable. Advertising runs after the commit: wait for node1's A.
ls_json() { ip netns exec "${tag}2" "$cli" cluster ls --json "$@"; }
for _ in $(seq 50); do
  ls_json --socket "$tmp/d2.sock" | grep -q "$id_a" && break
  sleep 0.2
done
ls_json --socket "$tmp/d2.sock" >"$tmp/cluster_ls.json" || fail "cluster ls: $(cat "$tmp/cluster_ls.json")"
/usr/bin/python3 - "$tmp/cluster_ls.json" "$subnet" "$id_a" "$id_b" <<'PY' || fail "cluster ls --json: $(cat "$tmp/cluster_ls.json")"
import json, sys
hosts = {h["host_id"]: h for h in json.load(open(sys.argv[1]))}
subnet, id_a, id_b = sys.argv[2:5]
assert sorted(hosts) == ["node1", "node2", "node3", "node4"], sorted(hosts)
for n in range(1, 5):
    h = hosts[f"node{n}"]
    assert h["alive"] and h["lease_seconds_left"] > 0, h
    assert h["transfer_address"] == f"{subnet}.{20 + n}:7000", h
held = {n: {r["artifact_id"]: r["total_size"] for r in h["replicas"]} for n, h in hosts.items()}
assert id_a in held["node1"] and id_a in held["node2"] and held["node1"][id_a] == held["node2"][id_a] > 0, held
for n in ("node2", "node3", "node4"):
    assert id_b in held[n], (n, held)
# Every pull has ended: each replica is whole.
states = {r["state"] for h in hosts.values() for r in h["replicas"]}
assert states == {"replica"}, states
PY
table=$(ip netns exec "${tag}3" "$cli" cluster ls --etcd "etcd://$etcd_ip:2379/tensorreg") || fail "cluster ls --etcd: $table"
for n in 1 2 3 4; do
  echo "$table" | grep -q "^node$n .*$subnet.$((20 + n)):7000 .*alive" || fail "cluster ls does not list node$n alive: $table"
done
echo "$table" | grep -q "^  $id_a .* replica$" || fail "cluster ls does not list $id_a as a replica: $table"
echo "$table" | grep -q "^4 hosts, 4 alive$" || fail "cluster ls summary: $table"
out=$("$cli" cluster ls --etcd "http://$etcd_ip:2379" 2>&1) && fail "cluster ls took an http:// url: $out"
case "$out" in *"cannot parse cluster url"*) ;; *) fail "cluster ls with a bad url said '$out'" ;; esac
pass "cluster ls: 4 hosts alive with their addresses and replicas"

# 2c. `tensorreg get ID` on a host that does not hold it pulls it from the cluster; --out writes
# the same file as an export on the host it was put on.
got=$("$cli" get --json --socket "$tmp/d3.sock" "$id_a" --out "$tmp/a3.safetensors") || fail "cli get on node3: $got"
echo "$got" | /usr/bin/python3 -c 'import json,sys; j=json.load(sys.stdin); assert j["source"] == "cluster" and "stable_dram" in j["tiers"], j' ||
  fail "cli get on node3 answered $got"
"$cli" export --socket "$tmp/d1.sock" "$id_a" --out "$tmp/a1.safetensors" >/dev/null || fail "export on node1"
cmp -s "$tmp/a1.safetensors" "$tmp/a3.safetensors" || fail "get --out on node3 differs from node1's export"
out=$("$cli" get --socket "$tmp/d3.sock" "mi2:bciqnobodyholdsthis:bciqnobodyholdsthis" 2>&1) && fail "get of an unknown id: $out"
case "$out" in *NOT_FOUND*) ;; *) fail "get of an id nobody holds said '$out'" ;; esac
pass "cli get on node3 pulls $id_a from the cluster; --out equals node1's export"

# 2c'. `tensorreg publish ID --replicas 3` (docs/cluster.md §5): a fresh file put on node3;
# node3 asks two other members, which pull it; the answer lists 3 holders, reached; `cluster
# ls` lists 3 complete replicas; each holder has node3's bytes. More replicas than members
# asks them all and fails (exit 1) when the time is up, saying how many hold it.
"${client[@]}" make "$tmp/g.safetensors" $((16 << 20)) 8
id_g=$(put 3 "$tmp/g.safetensors")
want=$(digest 3 "$id_g")
published=$("$cli" publish "$id_g" --replicas 3 --timeout 30 --json --socket "$tmp/d3.sock" 2>"$tmp/publish.err") ||
  fail "publish $id_g --replicas 3 on node3: $published $(cat "$tmp/publish.err")"
holders=$(echo "$published" | /usr/bin/python3 -c '
import json, sys
j = json.load(sys.stdin)
assert j["reached"] and j["target"] == 3 and len(j["holders"]) == 3 and "node3" in j["holders"], j
assert len(j["asked"]) == 2 and "node3" not in j["asked"], j
print(" ".join(h[len("node"):] for h in j["holders"]))') || fail "publish $id_g answered $published"
ls_json --etcd "etcd://$etcd_ip:2379/tensorreg" >"$tmp/cluster_ls_g.json" || fail "cluster ls after publish"
/usr/bin/python3 - "$tmp/cluster_ls_g.json" "$id_g" $holders <<'PY' || fail "cluster ls after publish: $(cat "$tmp/cluster_ls_g.json")"
import json, sys
hosts = json.load(open(sys.argv[1]))
id_g, holders = sys.argv[2], {f"node{n}" for n in sys.argv[3:]}
listed = {h["host_id"]: r["state"] for h in hosts for r in h["replicas"] if r["artifact_id"] == id_g}
assert listed == {h: "replica" for h in holders}, listed
PY
for n in $holders; do
  [ "$(digest "$n" "$id_g")" = "$want" ] || fail "node$n holds '$(digest "$n" "$id_g")' for $id_g, node3 '$want'"
done
out=$("$cli" publish "$id_g" --replicas 5 --timeout 1 --socket "$tmp/d3.sock" 2>&1) && fail "publish to 5 of 4 hosts: $out"
case "$out" in *"cannot publish $id_g: "[34]" of 5 hosts hold it after 1 s"* | *"cannot publish $id_g: 4 of 5 hosts hold it; the cluster has 4 members"*) ;; *) fail "publish to 5 of 4 said '$out'" ;; esac
pass "publish $id_g --replicas 3 on node3: nodes $holders hold it, node3's bytes; 5 of 4 not reached"

# 2c''. A put whose policy asks for stable copies on two other hosts (docs/cluster.md §5,
# Policies): node2 commits, asks two members through the catalogue and answers READY once they
# hold it; `cluster ls` lists three complete replicas, each with node2's bytes. Copies on five
# other hosts of four members: DEGRADED within the daemons' --replica-timeout-ms (5 s).
"${client[@]}" make "$tmp/h.safetensors" $((8 << 20)) 11
put_h=$("$cli" put "$tmp/h.safetensors" --policy should:stable_dram:remote:2 --json --socket "$tmp/d2.sock") ||
  fail "put --policy should:stable_dram:remote:2 on node2: $put_h"
id_h=$(echo "$put_h" | /usr/bin/python3 -c '
import json, sys
j = json.load(sys.stdin)
assert j["remote_stable_tier"] == {"status": "ready", "message": "3 of 3 hosts hold it"}, j
print(j["artifact_id"])') || fail "put --policy should:stable_dram:remote:2 answered $put_h"
want=$(digest 2 "$id_h")
ls_json --etcd "etcd://$etcd_ip:2379/tensorreg" >"$tmp/cluster_ls_h.json" || fail "cluster ls after the remote put"
holders=$(/usr/bin/python3 - "$tmp/cluster_ls_h.json" "$id_h" <<'PY'
import json, sys
hosts = json.load(open(sys.argv[1]))
listed = {h["host_id"]: r["state"] for h in hosts for r in h["replicas"] if r["artifact_id"] == sys.argv[2]}
assert len(listed) == 3 and listed.get("node2") == "replica" and set(listed.values()) == {"replica"}, listed
print(" ".join(h[len("node"):] for h in sorted(listed) if h != "node2"))
PY
) || fail "cluster ls after the remote put: $(cat "$tmp/cluster_ls_h.json")"
for n in $holders; do
  [ "$(digest "$n" "$id_h")" = "$want" ] || fail "node$n holds '$(digest "$n" "$id_h")' for $id_h, node2 '$want'"
done
"${client[@]}" make "$tmp/i.safetensors" $((4 << 20)) 12
started=$(date +%s)
put_i=$("$cli" put "$tmp/i.safetensors" --policy should:stable_dram:remote:5 --json --socket "$tmp/d2.sock") ||
  fail "put --policy should:stable_dram:remote:5 on node2: $put_i"
took=$(($(date +%s) - started))
echo "$put_i" | /usr/bin/python3 -c '
import json, re, sys
t = json.load(sys.stdin)["remote_stable_tier"]
assert t["status"] == "degraded" and re.fullmatch(r"[1-3] of 6 hosts hold it after 5000 ms|4 of 6 hosts hold it; the cluster has 4 members", t["message"]), t' ||
  fail "put --policy should:stable_dram:remote:5 answered $put_i"
[ "$took" -le 12 ] || fail "put --policy should:stable_dram:remote:5 took $took s (timeout 5 s)"
pass "put --policy should:stable_dram:remote:2 on node2: READY, nodes $holders hold node2's bytes; remote:5 of 4 DEGRADED in $took s"

# 2d. Fan-out as a pipeline (docs/cluster.md §3.3): with node1's link limited to 80 Mbit/s
# (24 MiB then takes about 2.5 s), node2 starts pulling P and node3 once node2's pull is under
# way. node2 lists itself once it has the manifest and serves the leaves it has verified: the
# two take leaves of P from each other while they still pull, and both end with P's bytes. `cluster ls`
# shows node2's P as pulling while it pulls, as a replica once it has committed it.
"${client[@]}" make "$tmp/p.safetensors" $((24 << 20)) 6
id_p=$(put 1 "$tmp/p.safetensors")
want=$(digest 1 "$id_p")
for _ in $(seq 50); do   # node1's advertisement of P
  ip netns exec "${tag}e" curl -s -X POST "http://$etcd_ip:2379/v3/kv/range" \
    -d "{\"key\":\"$(printf '/tensorreg/replicas/%s/node1' "$id_p" | base64 -w0)\"}" | grep -q '"kvs"' && break
  sleep 0.2
done
ip netns exec "${tag}1" tc qdisc add dev eth0 root tbf rate 80mbit burst 256kb latency 100ms
digest 2 "$id_p" >"$tmp/pipe2" &
p2=$!
# node3 starts once node2's pull is under way (its stats list it), not after a fixed delay: on a
# loaded machine the client that starts node2's pull may take longer than any fixed delay.
for _ in $(seq 100); do
  "$cli" stats --json --socket "$tmp/d2.sock" 2>/dev/null | grep -q "\"artifact_id\":\"$id_p\"" && break
  sleep 0.05
done
digest 3 "$id_p" >"$tmp/pipe3" &
p3=$!
# While node2 pulls, its GetStats lists the pull (wire-format.md §14): node1 among its sources,
# the artifact's size, and bytes verified so far, seen at least once strictly between 0 and all.
# `cluster ls --json` lists node2's P as "pulling" at least once meanwhile.
seen_midway=""
seen_pulling=""
# ls_state N ID: the state `cluster ls` gives nodeN's replica of ID ("none" when not listed).
ls_state() {
  ip netns exec "${tag}2" "$cli" cluster ls --json --etcd "etcd://$etcd_ip:2379/tensorreg" |
    /usr/bin/python3 -c '
import json, sys
states = [r["state"] for h in json.load(sys.stdin) if h["host_id"] == sys.argv[1]
          for r in h["replicas"] if r["artifact_id"] == sys.argv[2]]
print(states[0] if states else "none")' "node$1" "$2"
}
while kill -0 $p2 2>/dev/null; do
  [ "$(ls_state 2 "$id_p")" = pulling ] && seen_pulling=yes
  "$cli" stats --json --socket "$tmp/d2.sock" >"$tmp/stats2" 2>/dev/null || break
  /usr/bin/python3 - "$tmp/stats2" "$id_p" $((24 << 20)) <<'PY' && seen_midway=yes
import json, sys
pulls = [p for p in json.load(open(sys.argv[1]))["pulls"] if p["artifact_id"] == sys.argv[2]]
ok = pulls and "node1" in pulls[0]["sources"] and pulls[0]["total_bytes"] == int(sys.argv[3]) \
    and 0 < pulls[0]["verified_bytes"] < pulls[0]["total_bytes"]
sys.exit(0 if ok else 1)
PY
  sleep 0.1
done
wait $p2 && wait $p3 || fail "a pipelined get failed: $(cat "$tmp/pipe2" "$tmp/pipe3")"
[ -n "$seen_midway" ] || fail "node2's stats never showed its pull of $id_p part way: $(cat "$tmp/stats2")"
[ -n "$seen_pulling" ] || fail "cluster ls never listed node2's $id_p as pulling while it pulled"
for _ in $(seq 50); do   # the commit's advertisement rewrites the key (the node's thread)
  [ "$(ls_state 2 "$id_p")" = replica ] && break
  sleep 0.2
done
[ "$(ls_state 2 "$id_p")" = replica ] || fail "cluster ls lists node2's $id_p as '$(ls_state 2 "$id_p")' after its pull"
"$cli" stats --json --socket "$tmp/d2.sock" | grep -q '"pulls":\[\]' ||
  fail "node2 still lists a pull after it ended: $("$cli" stats --json --socket "$tmp/d2.sock")"
ip netns exec "${tag}1" tc qdisc del dev eth0 root
for n in 2 3; do [ "$(cat "$tmp/pipe$n")" = "$want" ] || fail "node$n got '$(cat "$tmp/pipe$n")' for $id_p"; done
# A leaf moved between the two pullers while the one that served it still pulled: node2 to node3
# as a rule, node3 to node2 when scheduling let node3 verify a leaf that node2 still wanted.
served_while_pulling() {
  grep "pulled $id_p" "$tmp/d$1.log" | sed -nE 's/.*; served ([0-9]+) leaves to other hosts while pulling.*/\1/p'
}
served2=$(served_while_pulling 2)
served3=$(served_while_pulling 3)
[ $((${served2:-0} + ${served3:-0})) -ge 1 ] ||
  fail "neither puller served the other a leaf of $id_p while pulling it: $(grep -h "pulled $id_p" "$tmp/d2.log" "$tmp/d3.log")"
grep -q "pulled $id_p .*leaves by source: .*node2 [1-9]" "$tmp/d3.log" ||
  grep -q "pulled $id_p .*leaves by source: .*node3 [1-9]" "$tmp/d2.log" ||
  fail "node2 and node3 took no leaf of $id_p from each other: $(grep -h "pulled $id_p" "$tmp/d2.log" "$tmp/d3.log")"
pass "pipeline: node2 and node3 passed leaves of $id_p to each other while pulling it (node2 served ${served2:-0}, node3 ${served3:-0}); stats and cluster ls showed the pull"

# 3. The source SIGKILLed mid-transfer: node1 and node2 hold C; their links are slowed to
# 200 Mbit/s each (96 MiB then takes about 2 s), node3 pulls from both, node1 dies 0.7 s in.
# node3 must finish from node2.
"${client[@]}" make "$tmp/c.safetensors" $((96 << 20)) 3
id_c=$(put 1 "$tmp/c.safetensors")
want=$(digest 1 "$id_c")
got=$(get_when_listed 2 "$id_c") || fail "get of $id_c on node2: $got"
for _ in $(seq 50); do   # node2's own advertisement of C
  ip netns exec "${tag}e" curl -s -X POST "http://$etcd_ip:2379/v3/kv/range" \
    -d "{\"key\":\"$(printf '/tensorreg/replicas/%s/node2' "$id_c" | base64 -w0)\"}" | grep -q '"kvs"' && break
  sleep 0.2
done
for n in 1 2; do ip netns exec "$tag$n" tc qdisc add dev eth0 root tbf rate 200mbit burst 256kb latency 100ms; done
digest 3 "$id_c" >"$tmp/killed" &
getter=$!
sleep 0.7
kill -9 "${pid[d1]}"
unset 'pid[d1]'
wait $getter || fail "node3's get of $id_c after node1 died: $(cat "$tmp/killed")"
[ "$(cat "$tmp/killed")" = "$want" ] || fail "node3 got '$(cat "$tmp/killed")' for $id_c"
# A dead source shows up as its endpoint's error, or as a request UCX refuses to send on the
# broken endpoint before that error is reported: either way node3 drops it.
grep -q "source node1 .* dropped: \(connection failed\|cannot send a request\)" "$tmp/d3.log" ||
  fail "node3 did not see node1 die mid-pull"
ip netns exec "${tag}2" tc qdisc del dev eth0 root
pass "source SIGKILLed mid-transfer: node3 finished from node2"

# 4. etcd stopped: cluster gets answer UNAVAILABLE, local work goes on; etcd back: members
# register again and what was put meanwhile is advertised.
kill -9 "${pid[etcd]}"
wait "${pid[etcd]}" 2>/dev/null || true
unset 'pid[etcd]'
"${client[@]}" make "$tmp/d.safetensors" $((8 << 20)) 4
out=$(digest 4 "$id_c") && fail "node4 got $id_c with etcd down"
case "$out" in *Unavailable*"cluster catalogue at http://$etcd_ip:2379 unreachable"*) ;;
  *) fail "node4 with etcd down answered '$out'" ;; esac
id_d=$(put 4 "$tmp/d.safetensors") || fail "a local put on node4 with etcd down failed"
[ "$(digest 4 "$id_d" | cut -d' ' -f1)" = $((8 << 20)) ] || fail "node4 cannot read its own $id_d"
start_etcd
got=$(get_when_listed 2 "$id_d") || fail "node2's get of $id_d (put during the outage) after etcd returned: $got"
[ "$got" = "$(digest 4 "$id_d")" ] || fail "node2 got '$got' for $id_d"
got=$(get_when_listed 4 "$id_c") || fail "node4's get of $id_c after etcd returned: $got"
[ "$got" = "$want" ] || fail "node4 got '$got' for $id_c"
pass "etcd stopped (UNAVAILABLE, local put ok) and restarted (re-registered)"

# 5. A corrupt source: node1 comes back flipping a byte of every leaf it serves; it and node4
# hold E. node3's pull catches each bad leaf, fetches it from node4, and names node1.
start_daemon 1 --transfer-corrupt-for-tests
"${client[@]}" make "$tmp/e.safetensors" $((32 << 20)) 5
id_e=$(put 1 "$tmp/e.safetensors")
[ "$(put 4 "$tmp/e.safetensors")" = "$id_e" ] || fail "node4 put E under another id"
want=$(digest 4 "$id_e")
for _ in $(seq 50); do   # both advertisements
  n=$(ip netns exec "${tag}e" curl -s -X POST "http://$etcd_ip:2379/v3/kv/range" \
    -d "{\"key\":\"$(printf '/tensorreg/replicas/%s/' "$id_e" | base64 -w0)\",\"range_end\":\"$(printf '/tensorreg/replicas/%s0' "$id_e" | base64 -w0)\",\"count_only\":true}" |
    /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin).get("count", 0))')
  [ "$n" = 2 ] && break
  sleep 0.2
done
got=$(digest 3 "$id_e") || fail "node3's get of $id_e next to a corrupt source: $got"
[ "$got" = "$want" ] || fail "node3 got '$got' for $id_e"
grep -q "pulled $id_e.*corrupt: node1 .*does not match its digest" "$tmp/d3.log" || fail "node3 did not report node1 corrupt"
pass "corrupt source: every bad leaf caught and fetched from node4, node1 reported"

# 6. A daemon restarted with --persist-dir: node4 comes back with a persist directory and puts
# F durable (its copy on disk waited for); stopped with SIGTERM (its keys go with its lease) and
# started again on the same directory, it advertises F again as a replica, and node2 pulls F
# from it, the only host that ever held F: the same bytes.
stop_daemon 4
start_daemon 4 --persist-dir "$tmp/persist4"
"${client[@]}" make "$tmp/f.safetensors" $((20 << 20)) 7
id_f=$(put_durable 4 "$tmp/f.safetensors") || fail "durable put on node4: $id_f"
want=$(digest 4 "$id_f")
for _ in $(seq 50); do
  [ "$(ls_state 4 "$id_f")" = replica ] && break
  sleep 0.2
done
[ "$(ls_state 4 "$id_f")" = replica ] || fail "node4 does not advertise $id_f: '$(ls_state 4 "$id_f")'"
stop_daemon 4
[ "$(ls_state 4 "$id_f")" = none ] || fail "node4's $id_f is still listed after it stopped"
start_daemon 4 --persist-dir "$tmp/persist4"
for _ in $(seq 50); do   # what the engine restored at start is advertised by the node's thread
  [ "$(ls_state 4 "$id_f")" = replica ] && break
  sleep 0.2
done
[ "$(ls_state 4 "$id_f")" = replica ] || fail "node4 restarted does not advertise $id_f again"
got=$(digest 2 "$id_f") || fail "node2's get of $id_f from the restarted node4: $got"
[ "$got" = "$want" ] || fail "node2 got '$got' for $id_f, node4 held '$want' before its restart"
grep -q "pulled $id_f .*leaves by source: node4 [1-9]" "$tmp/d2.log" ||
  fail "node2 did not pull $id_f from node4: $(grep "pulled $id_f" "$tmp/d2.log")"
pass "daemon restarted with --persist-dir: node4 advertises $id_f again, node2 pulled it from node4"

# 7. A shared persist volume (docs/cluster.md §8): node1 and node3 come back on one persist
# directory, volume "models". node1 puts G durable; `cluster ls` lists the copy on the volume
# for both; node1 stops (SIGTERM: its replica key goes with its lease, the disk key stays).
# node2, off the volume and the only one asked, gets G: it asks node3, which loads the
# volume's copy and serves it.
for n in 1 3; do
  stop_daemon "$n"
  start_daemon "$n" --persist-dir "$tmp/volume" --persist-volume models
done
"${client[@]}" make "$tmp/g.safetensors" $((20 << 20)) 8
id_g=$(put_durable 1 "$tmp/g.safetensors") || fail "durable put on node1: $id_g"
want=$(digest 1 "$id_g")
for _ in $(seq 50); do
  ls_json --socket "$tmp/d2.sock" | grep -q "\"volume_copies\":\[{\"artifact_id\":\"$id_g\"" && break
  sleep 0.2
done
ls_json --socket "$tmp/d2.sock" >"$tmp/cluster_ls_volume.json" || fail "cluster ls: $(cat "$tmp/cluster_ls_volume.json")"
/usr/bin/python3 - "$tmp/cluster_ls_volume.json" "$id_g" <<'PY' || fail "cluster ls --json with a volume: $(cat "$tmp/cluster_ls_volume.json")"
import json, sys
hosts = {h["host_id"]: h for h in json.load(open(sys.argv[1]))}
id_g = sys.argv[2]
for n in ("node1", "node3"):
    assert hosts[n]["persist_volume"] == "models", hosts[n]
    assert [c["artifact_id"] for c in hosts[n]["volume_copies"]] == [id_g], hosts[n]
for n in ("node2", "node4"):
    assert hosts[n]["persist_volume"] == "" and hosts[n]["volume_copies"] == [], hosts[n]
PY
table=$(ip netns exec "${tag}2" "$cli" cluster ls --etcd "etcd://$etcd_ip:2379/tensorreg") || fail "cluster ls: $table"
echo "$table" | grep -q "^  $id_g .* volume models (listed by node[13])$" || fail "cluster ls does not list $id_g on the volume: $table"
stop_daemon 1
got=$(digest 2 "$id_g") || fail "node2's get of $id_g, held on the volume only: $got"
[ "$got" = "$want" ] || fail "node2 got '$got' for $id_g, node1 held '$want'"
grep -q "cluster: $id_g is on persist volume models only: asked node3 to load it" "$tmp/d2.log" ||
  fail "node2 did not ask node3 for $id_g: $(grep "$id_g" "$tmp/d2.log")"
grep -q "pulled $id_g .*leaves by source: node3 [1-9]" "$tmp/d2.log" ||
  fail "node2 did not pull $id_g from node3: $(grep "pulled $id_g" "$tmp/d2.log")"
grep -q "loaded artifact $id_g .* back from the persist directory" "$tmp/d3.log" ||
  fail "node3 did not load $id_g from the volume: $(grep "$id_g" "$tmp/d3.log")"
pass "shared persist volume: node2 got $id_g through node3, which loaded node1's copy from the volume"
echo "netns_cluster: all cases passed in $(($(date +%s) - started)) s"
