#!/usr/bin/env bash
# make test-vagrant: the mesh across three real VMs, then everything removed again.
#
#  1. scripts/setup.sh --vagrant (Debian packages, idempotent); build-box.sh (only if the
#     box is missing);
#  2. a network namespace of its own for libvirt (virtlogd + libvirtd started here, by PID),
#     a storage pool under the work directory;
#  3. vagrant up controller, then node-1 and node-2 (provisioned from the bundle: units,
#     pods), all of it inside that namespace;
#  4. waits for both ztunnels' readiness, labels namespace demo ambient on the controller
#     and waits until both agents have enrolled their pod;
#  5. pod demo/client (node-1) calls http://server.demo/hello (demo/server on node-2) while
#     tcpdump captures the VM link (the libvirt bridge): the call must answer, the link
#     must carry TCP 15008 and never the request in plaintext (nor port 8080);
#  6. node-1's ztunnel metrics must count the connection as reporter="source", node-2's as
#     reporter="destination", both with connection_security_policy="mutual_tls";
#  7. node-1's agent is restarted: the new one must reopen the pinned maps, links and
#     programs (by path, with the unit's capabilities only), enroll the pod again, detach
#     its predecessor's cgroup programs, and the call must still answer.
# On exit, pass or fail: vagrant destroy, the pool and its volumes, libvirt's networks,
# libvirtd and virtlogd (by PID), the namespace, /run/libvirt if it was not there before.
# Every wait is bounded. Prints each step's duration and the total.
set -euo pipefail
cd "$(dirname "$0")/.."
vdir=$PWD
repo=$(cd .. && pwd)
export AMBIMESH_VAGRANT_WORK=${AMBIMESH_VAGRANT_WORK:-/var/tmp/ambimesh-vagrant}
work=$AMBIMESH_VAGRANT_WORK
ns=ambimesh-vagrant
pool=ambimesh-vagrant
export AMBIMESH_VAGRANT_POOL=$pool
export LIBVIRT_DEFAULT_URI=qemu:///system
run_dir=$work/run
say() { printf '[test-vagrant %s] %s\n' "$(date +%T)" "$*"; }
die() { printf '[test-vagrant %s] FAIL: %s\n' "$(date +%T)" "$*" >&2; exit 1; }
step() { say "$1: $(( SECONDS - started )) s"; started=$SECONDS; }
inns() { ip netns exec "$ns" "$@"; }
started=$SECONDS
total=$SECONDS

[ "$(id -u)" -eq 0 ] || die "must run as root (libvirt, network namespaces)"
"$repo/scripts/setup.sh" --vagrant
"$vdir/scripts/build-box.sh"
# The bundle is made here, on the host's network; vagrant (in the namespace) keeps it.
"$vdir/scripts/bundle.sh"
export AMBIMESH_BUNDLE_FROZEN=1
say "provisioning from commit $(cat "$work/bundle/HEAD")"
step "setup, box and bundle"

if ip netns list | grep -qw "$ns"; then
    die "network namespace $ns exists: an earlier run is still up or was not cleaned (ip netns del $ns after checking)"
fi
run_libvirt_existed=0
[ -e /run/libvirt ] && run_libvirt_existed=1
libvirtd_pid=
virtlogd_pid=
tcpdump_pid=

teardown() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    say "teardown (exit status $rc)"
    [ -n "$tcpdump_pid" ] && kill "$tcpdump_pid" 2>/dev/null
    if [ -n "$libvirtd_pid" ]; then
        (cd "$vdir" && timeout 300 ip netns exec "$ns" vagrant destroy -f) >"$run_dir/destroy.log" 2>&1 \
            || say "vagrant destroy failed (log: $run_dir/destroy.log); removing domains with virsh"
        for d in $(inns virsh list --all --name 2>/dev/null | grep '^ambimesh-'); do
            inns virsh destroy "$d" >/dev/null 2>&1
            inns virsh undefine "$d" --nvram >/dev/null 2>&1 || inns virsh undefine "$d" >/dev/null 2>&1
            say "removed domain $d"
        done
        for net in ambimesh-vms vagrant-libvirt; do
            if inns virsh net-info "$net" >/dev/null 2>&1; then
                inns virsh net-destroy "$net" >/dev/null 2>&1
                inns virsh net-undefine "$net" >/dev/null 2>&1
                say "removed libvirt network $net"
            fi
        done
        if inns virsh pool-info "$pool" >/dev/null 2>&1; then
            for vol in $(inns virsh vol-list --pool "$pool" 2>/dev/null | awk 'NR > 2 && NF { print $1 }'); do
                inns virsh vol-delete --pool "$pool" "$vol" >/dev/null 2>&1 && say "deleted volume $vol"
            done
            inns virsh pool-destroy "$pool" >/dev/null 2>&1
            inns virsh pool-undefine "$pool" >/dev/null 2>&1
            say "removed storage pool $pool"
        fi
        kill "$libvirtd_pid" 2>/dev/null && say "stopped libvirtd ($libvirtd_pid)"
    fi
    if [ -n "$virtlogd_pid" ]; then
        kill "$virtlogd_pid" 2>/dev/null && say "stopped virtlogd ($virtlogd_pid)"
    fi
    # dnsmasq of a libvirt network that outlived its libvirtd (by its pidfile).
    for pidfile in /run/libvirt/network/*.pid; do
        [ -e "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        if [ -n "$pid" ] && [ "$(readlink "/proc/$pid/ns/net" 2>/dev/null)" != "$(readlink /proc/1/ns/net)" ]; then
            kill "$pid" 2>/dev/null && say "stopped a left-over dnsmasq ($pid)"
        fi
    done
    ip netns del "$ns" 2>/dev/null && say "deleted network namespace $ns"
    [ "$run_libvirt_existed" = 0 ] && rm -rf /run/libvirt
    rm -rf "$work/pool" "$vdir/.vagrant"
    say "total $(( SECONDS - total )) s: $([ "$rc" = 0 ] && echo PASS || echo FAIL)"
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

rm -rf "$run_dir"
mkdir -p "$run_dir" "$work/pool"
say "network namespace $ns; virtlogd and libvirtd inside it"
ip netns add "$ns"
inns ip link set lo up
inns virtlogd -d -p "$run_dir/virtlogd.pid"
for _ in $(seq 50); do [ -s "$run_dir/virtlogd.pid" ] && break; sleep 0.2; done
virtlogd_pid=$(cat "$run_dir/virtlogd.pid" 2>/dev/null) || die "virtlogd did not start"
inns libvirtd -d -p "$run_dir/libvirtd.pid"
for _ in $(seq 50); do [ -s "$run_dir/libvirtd.pid" ] && break; sleep 0.2; done
libvirtd_pid=$(cat "$run_dir/libvirtd.pid" 2>/dev/null) || die "libvirtd did not start"
for _ in $(seq 60); do inns virsh version >/dev/null 2>&1 && break; sleep 0.5; done
inns virsh version >/dev/null 2>&1 || die "libvirtd (pid $libvirtd_pid) does not answer virsh"
inns virsh pool-define-as "$pool" dir --target "$work/pool" >/dev/null
inns virsh pool-start "$pool" >/dev/null
step "libvirt in $ns (libvirtd $libvirtd_pid, virtlogd $virtlogd_pid, pool $pool)"

vup() {
    say "vagrant up $* (log: $run_dir/up-$1.log)"
    (cd "$vdir" && timeout 2400 ip netns exec "$ns" vagrant up --no-color "$@") >"$run_dir/up-$1.log" 2>&1 \
        || { tail -40 "$run_dir/up-$1.log"; die "vagrant up $* failed"; }
}
vup controller
step "vagrant up controller (box upload into the pool, boot, provisioning)"
vup node-1 node-2
step "vagrant up node-1 node-2"

(cd "$vdir" && inns vagrant ssh-config) >"$run_dir/ssh-config" 2>/dev/null || die "vagrant ssh-config failed"
vm() { local host=$1; shift; inns ssh -F "$run_dir/ssh-config" -o ConnectTimeout=20 "$host" "$@"; }
wait_for() {  # wait_for SECONDS WHAT HOST COMMAND
    local limit=$1 what=$2 host=$3 cmd=$4 t0=$SECONDS
    until vm "$host" "$cmd" >/dev/null 2>&1; do
        if (( SECONDS - t0 > limit )); then
            vm node-1 'sudo journalctl -u ambimesh-agent -u ambimesh-ztunnel --no-pager | tail -30' || true
            vm node-2 'sudo journalctl -u ambimesh-agent -u ambimesh-ztunnel --no-pager | tail -30' || true
            die "$what did not happen within $limit s"
        fi
        sleep 5
    done
    say "$what ($(( SECONDS - t0 )) s)"
}
for node in node-1 node-2; do
    wait_for 1200 "$node: ztunnel ready" "$node" 'curl -sf http://127.0.0.1:15021/healthz/ready'
done
step "ztunnels ready"

say "labeling namespace demo ambimesh.io/dataplane-mode=ambient on the controller"
vm controller "sudo sed -i 's|ambimesh.io/dataplane-mode: none|ambimesh.io/dataplane-mode: ambient|' /etc/ambimesh/config/namespaces.yaml"
for node in node-1 node-2; do
    wait_for 600 "$node: pod enrolled" "$node" \
        'curl -sf http://127.0.0.1:15014/metrics | grep -Eq "^ambimesh_enrolled_pods 1(\.0)?$"'
done
step "namespace labeled, pods enrolled"

bridge=$(inns virsh net-info ambimesh-vms | awk '/^Bridge:/ { print $2 }')
[ -n "$bridge" ] || die "no bridge for libvirt network ambimesh-vms"
say "capturing the VM link ($bridge) into $run_dir/link.pcap"
inns tcpdump -i "$bridge" -U -s 0 -w "$run_dir/link.pcap" 'tcp and net 198.19.0.0/16' \
    >"$run_dir/tcpdump.log" 2>&1 &
tcpdump_pid=$!
sleep 3
kill -0 "$tcpdump_pid" 2>/dev/null || { cat "$run_dir/tcpdump.log"; die "tcpdump did not start"; }
podvm='sudo /opt/ambimesh/bin/python -m ambimesh.lab.podvm exec --config /opt/ambimesh/src/vagrant/config --timeout 120'
answer=$(vm node-1 "$podvm demo/client -- curl -s -m 60 http://server.demo/hello") \
    || die "demo/client on node-1 could not call http://server.demo/hello"
say "demo/client (node-1) -> http://server.demo/hello (node-2): $answer"
[ -n "$answer" ] || die "empty answer from server.demo"
sleep 3
kill "$tcpdump_pid"; wait "$tcpdump_pid" 2>/dev/null || true; tcpdump_pid=
hbone=$(tcpdump -nr "$run_dir/link.pcap" 'tcp port 15008' 2>/dev/null | wc -l)
plain=$(tcpdump -nr "$run_dir/link.pcap" 'tcp port 8080 or tcp port 80' 2>/dev/null | wc -l)
say "on the VM link: $hbone packets on TCP 15008, $plain on 8080/80"
tcpdump -nr "$run_dir/link.pcap" 2>/dev/null | head -5
(( hbone > 0 )) || die "no HBONE (TCP 15008) packets on the VM link"
(( plain == 0 )) || die "plaintext packets (8080/80) on the VM link"
if tcpdump -Anr "$run_dir/link.pcap" 2>/dev/null | grep -q 'GET /hello'; then
    die "the request 'GET /hello' crossed the VM link in plaintext"
fi
step "cross-VM call over mTLS (capture on the link)"

metric() { vm "$1" 'curl -sf http://127.0.0.1:15020/metrics' | grep '^istio_tcp_connections_opened_total' \
    | grep "reporter=\"$2\"" | grep 'connection_security_policy="mutual_tls"' || true; }
src=$(metric node-1 source)
dst=$(metric node-2 destination)
say "node-1 metrics: ${src:-none}"
say "node-2 metrics: ${dst:-none}"
[ -n "$src" ] || die "node-1's ztunnel counts no mutual_tls connection as reporter=source"
[ -n "$dst" ] || die "node-2's ztunnel counts no mutual_tls connection as reporter=destination"
step "node metrics"

# The controller's own metrics (istiod's names): the push streams of both nodes' agent and
# ztunnel, and each one's ACK of the label's version timed.
cmetrics=$(vm controller 'curl -sf http://127.0.0.1:15016/metrics') \
    || die "the controller serves no metrics on :15016"
xds=$(awk '$1 == "pilot_xds" { print int($2) }' <<<"$cmetrics")
converged=$(awk '$1 == "pilot_proxy_convergence_time_count" { print int($2) }' <<<"$cmetrics")
say "controller metrics: pilot_xds ${xds:-missing}, pilot_proxy_convergence_time_count ${converged:-missing}"
[ "$xds" = 4 ] || die "the controller's pilot_xds is ${xds:-missing}, not 4 (agent and ztunnel of 2 nodes)"
(( ${converged:-0} >= 4 )) || die "the controller timed ${converged:-no} ACKs of the label, not all 4"
step "controller metrics"

# The restart path: pinned maps and links exist, the unit's capabilities only (no drop-in).
old_pid=$(vm node-1 'systemctl show -p MainPID --value ambimesh-agent.service')
crashes=$(vm node-1 'systemctl show -p NRestarts --value ambimesh-agent.service')
since=$(vm node-1 'date +%s')
say "restarting node-1's agent (pid $old_pid, $crashes automatic restarts so far)"
vm node-1 'sudo systemctl restart ambimesh-agent.service'
wait_for 900 "node-1: restarted agent enrolled the pod again" node-1 \
    "pid=\$(systemctl show -p MainPID --value ambimesh-agent.service); [ \"\$pid\" != 0 ] && [ \"\$pid\" != $old_pid ] \
     && curl -sf http://127.0.0.1:15014/metrics | grep -Eq '^ambimesh_enrolled_pods 1(\.0)?$'"
restarts=$(vm node-1 'systemctl show -p NRestarts --value ambimesh-agent.service')
[ "$restarts" = "$crashes" ] || die "node-1's restarted agent crashed (systemd restarts: $crashes -> $restarts)"
vm node-1 "sudo journalctl -u ambimesh-agent.service --since @$since --no-pager" >"$run_dir/agent-restart.log" 2>&1 || true
stale=$(grep -c 'detached stale ambimesh_' "$run_dir/agent-restart.log" || true)
say "the restarted agent detached $stale stale programs of its predecessor (log: $run_dir/agent-restart.log)"
if grep -q 'stays attached' "$run_dir/agent-restart.log"; then
    die "the restarted agent left a predecessor's program attached: $(grep -m1 'stays attached' "$run_dir/agent-restart.log")"
fi
(( stale > 0 )) || die "the restarted agent detached none of its predecessor's cgroup programs"
answer=$(vm node-1 "$podvm demo/client -- curl -s -m 60 http://server.demo/hello") \
    || die "demo/client could not call http://server.demo/hello after the agent restart"
[ -n "$answer" ] || die "empty answer from server.demo after the agent restart"
say "after the restart: demo/client -> http://server.demo/hello: $answer"
step "node-1 agent restart (pinned maps reopened), call again"
say "PASS"
