#!/bin/sh
# Entrypoint of the maglev-lb image for the docker-compose lab: `maglev-entrypoint ROLE [ARGS]`.
# Roles: router, node, backend NAME, client; etcd NAME ADDRESS and fleet-seed for
# docker-compose.etcd.yml. Each prepares its container the way `maglev lab up`
# prepares a namespace (see lab/topology.py for why each step matters), then runs its process
# in the foreground so Docker supervises it.
set -eu

# Native XDP loses CHECKSUM_PARTIAL metadata: compute checksums in software on every sender.
no_offload() {
    for dev in $(ls /sys/class/net); do
        [ "$dev" = lo ] || ethtool -K "$dev" tx off >/dev/null 2>&1 || true
    done
}

role="${1:-}"
[ $# -gt 0 ] && shift
case "$role" in
router)
    no_offload
    dir=/run/frr-lab
    mkdir -p "$dir"
    cp /etc/maglev/frr/bgpd.conf "$dir/bgpd.conf"
    cp /etc/maglev/frr/bfdd.conf "$dir/bfdd.conf"
    echo "hostname zebra" > "$dir/zebra.conf"
    chown -R frr:frr "$dir"
    /usr/lib/frr/zebra -d -f "$dir/zebra.conf" -i "$dir/zebra.pid" -z "$dir/zserv.api" --vty_socket "$dir"
    while [ ! -S "$dir/zserv.api" ]; do sleep 0.1; done
    # BFD with every node (bgpd's `neighbor X bfd profile maglev`): a dead node leaves in ~0.3 s.
    /usr/lib/frr/bfdd -d -f "$dir/bfdd.conf" -i "$dir/bfdd.pid" -z "$dir/zserv.api" --vty_socket "$dir" \
        --bfdctl "$dir/bfdd.sock"
    echo "router: FRR bgpd in the foreground; vtysh --vty_socket $dir -c 'show ip route 10.100.0.1'"
    exec /usr/lib/frr/bgpd -f "$dir/bgpd.conf" -i "$dir/bgpd.pid" -z "$dir/zserv.api" --vty_socket "$dir"
    ;;
node)
    no_offload
    # Pins need a bpffs; Docker does not mount one.
    mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
    mkdir -p /run/maglev
    [ -s /run/maglev/api-token ] || (head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; echo) > /run/maglev/api-token
    chmod 600 /run/maglev/api-token
    # bpf_fib_lookup needs forwarding on and resolved backend neighbours ("managed": the kernel
    # keeps them resolved without traffic).
    sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
    for b in ${MAGLEV_BACKENDS:-}; do ip neigh replace "$b" dev eth0 managed extern_learn || true; done
    exec maglev node --config /etc/maglev/node.yaml
    ;;
backend)
    name="${1:?backend needs its name}"
    no_offload
    # DSR: replies go to the client straight through the router.
    ip route replace 10.0.0.0/24 via 10.1.0.1
    ip -6 route replace fd00::/64 via fd00:1::1
    mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
    maglev backend setup --vip 10.100.0.1 --vip fd00:100::1 --interface eth0 --decap bpf
    exec python -m lab.backend_server --name "$name" --vip 10.100.0.1 --vip fd00:100::1 --port 80 --health-port 8080
    ;;
etcd)
    # A member of the lab's etcd cluster (docker-compose.etcd.yml): etcd NAME ADDRESS.
    name="${1:?etcd needs its name}"; addr="${2:?etcd needs its address}"
    exec etcd --name "$name" --data-dir "/var/lib/etcd-lab/$name" \
        --listen-client-urls "http://$addr:2379" --advertise-client-urls "http://$addr:2379" \
        --listen-peer-urls "http://$addr:2380" --initial-advertise-peer-urls "http://$addr:2380" \
        --initial-cluster "$MAGLEV_ETCD_CLUSTER" --initial-cluster-token maglev-lab \
        --heartbeat-interval 100 --election-timeout 1000 --log-level warn
    ;;
fleet-seed)
    # The lab's VIPs into etcd, the way an operator writes them; exits non-zero (and compose
    # retries) until the cluster answers. Re-applying the same file writes nothing.
    exec maglev fleet apply /etc/maglev/vips.d/lab.yaml
    ;;
client)
    no_offload
    # The VIPs are reachable only through the router.
    ip route replace 10.100.0.0/24 via 10.0.0.1
    ip -6 route replace fd00:100::/64 via fd00::1
    echo "client: try  docker compose exec client curl -s http://10.100.0.1/"
    exec sleep infinity
    ;;
*)
    echo "usage: maglev-entrypoint router|node|backend NAME|client|etcd NAME ADDRESS|fleet-seed" >&2
    exit 2
    ;;
esac
