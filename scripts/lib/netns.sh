# shellcheck shell=bash
# scripts/lib/netns.sh — hosts in network namespaces, for the cluster's test, its benches and
# the demo (docs/cluster.md §6). Sourced by bash; needs root and iproute2.
#
# The hosts sit on a bridge that lives in a namespace of its own, so nothing is made in the
# caller's namespace and no address outside the private /24 is touched. Every namespace made is
# appended to `netns_made`; the caller removes them in its own cleanup (netns_remove_all).

netns_made=()

# netns_free_subnet THIRD...: "10.S.T", for the first S in 201..250 and T in THIRD... whose /24
# no interface or route of this host uses; nothing (and status 1) when all are taken.
netns_free_subnet() {
  local second third candidate
  for second in $(seq 201 250); do
    for third in "$@"; do
      candidate="10.$second.$third"
      if ! ip -4 addr show | grep -q "inet $candidate\." && ! ip -4 route show | grep -q "^$candidate\."; then
        echo "$candidate"
        return 0
      fi
    done
  done
  return 1
}

# netns_can_create: whether this machine lets us make a network namespace.
netns_can_create() {
  local probe="trprobe$$"
  ip netns add "$probe" 2>/dev/null || return 1
  ip netns del "$probe"
}

# netns_bridge NS: namespace NS with bridge br0 up.
netns_bridge() {
  ip netns add "$1"
  netns_made+=("$1")
  ip -n "$1" link add br0 type bridge
  ip -n "$1" link set br0 up
}

# netns_host BRIDGE_NS NS PORT ADDR: namespace NS whose eth0 (ADDR/24) is joined to BRIDGE_NS's
# br0 through the veth end PORT there; lo up.
# IPv4 only: a fresh link's IPv6 address stays tentative for a second or two, and a UCX
# connection that picked it failed with "Destination is unreachable".
netns_host() {
  local bridge=$1 ns=$2 port=$3 addr=$4 knob
  ip netns add "$ns"
  netns_made+=("$ns")
  for knob in all default; do
    # /proc/sys/net is the writer's namespace's; a kernel without IPv6 has no such file.
    ip netns exec "$ns" sh -c "echo 1 > /proc/sys/net/ipv6/conf/$knob/disable_ipv6" 2>/dev/null || true
  done
  ip -n "$bridge" link add "$port" type veth peer name eth0 netns "$ns"
  ip -n "$bridge" link set "$port" master br0 up
  ip -n "$ns" addr add "$addr/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
}

# netns_etcd NS IP DATA_DIR [NAME]: runs etcd in NS, clients on IP:2379, until it is killed.
# Run it in the background (`netns_etcd ... >log 2>&1 &`): $! is then etcd's own pid.
netns_etcd() {
  local name=${4:-e}
  exec ip netns exec "$1" etcd --name "$name" --data-dir "$3" --listen-client-urls "http://$2:2379" \
    --advertise-client-urls "http://$2:2379" --listen-peer-urls http://127.0.0.1:2380 \
    --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster "$name=http://127.0.0.1:2380"
}

# netns_wait_etcd NS IP: waits up to 10 s until etcd in NS answers a range request; status 1
# when it does not.
netns_wait_etcd() {
  local _
  for _ in $(seq 100); do
    ip netns exec "$1" curl -s -m 1 -X POST "http://$2:2379/v3/kv/range" -d '{"key":"eA=="}' >/dev/null 2>&1 &&
      return 0
    sleep 0.1
  done
  return 1
}

# netns_remove_all: removes every namespace made here (what runs in them has to be gone).
netns_remove_all() {
  local ns
  for ns in "${netns_made[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  netns_made=()
}
