#!/usr/bin/env bash
# make image-smoke: run the image's own programs and see the node come up.
# `podman run` is refused by this machine's runtime (docs/install.md says exactly how), so
# the versions are printed through `buildah run --isolation chroot`, and the node runs
# from the image's root filesystem (`buildah mount`) under unshare + chroot with the
# image's PATH, inside a network namespace and a cgroup of this script's own (so the BPF
# programs the agent attaches touch nothing else). `buildah run` cannot host the node: it
# shows the host's /sys read-only, and bpffs must be writable for the pins.
# Checks: every component prints its version; controller + agent + ztunnel start and
# ztunnel's readiness turns 200 (the agent compiled and loaded its BPF with the image's
# bcc and kernel headers, and handed ztunnel its snapshot); then `ambimesh uninstall`,
# from the image, removes what the agent left. Cleans up on any exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
version=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("ambimesh"))')
image=${AMBIMESH_IMAGE:-localhost/ambimesh:$version}
tag=ambsmoke$$
cgroup2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
cg=$cgroup2/$tag
pins=/sys/fs/bpf/$tag
say() { printf '[smoke] %s\n' "$*"; }
ctr=""
cleanup() {
    [ -n "$ctr" ] && { buildah umount "$ctr" >/dev/null 2>&1; buildah rm "$ctr" >/dev/null 2>&1; } || true
    if [ -d "$cg" ]; then
        for pid in $(cat "$cg/cgroup.procs" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        sleep 0.5
        rmdir "$cg" 2>/dev/null || true
    fi
    ip netns del "$tag" 2>/dev/null || true
    rm -rf "$pins"
}
trap cleanup EXIT INT TERM
started=$SECONDS
ctr=$(buildah from --quiet "$image")
run() {
    buildah run --isolation chroot --user 0:0 "$ctr" -- "$@"
}
for c in agent ztunnel controller waypoint; do run "ambimesh-$c" --version; done

ip netns add "$tag"
ip netns exec "$tag" ip link set lo up
mkdir "$cg"
script='set -eu
d=/tmp/smoke; rm -rf $d; mkdir -p $d/config
printf "node-1: smoke-token\n" > $d/tokens.yaml; echo smoke-token > $d/token
ambimesh-controller --config-dir $d/config --tokens $d/tokens.yaml --state-dir $d/state \
    --listen 127.0.0.1:15012 > $d/controller.log 2>&1 &
controller=$!
for i in $(seq 100); do [ -f $d/state/root-cert.pem ] && break; sleep 0.1; done
node="--node node-1 --controller 127.0.0.1:15012 --root-cert $d/state/root-cert.pem --token-file $d/token"
with-kernel-headers ambimesh-agent $node --socket $d/ztunnel.sock --bpf-pin-dir '"$pins"' \
    > $d/agent.log 2>&1 &
agent=$!
ambimesh-ztunnel $node --agent-socket $d/ztunnel.sock > $d/ztunnel.log 2>&1 &
ztunnel=$!
python3_ok=0
for i in $(seq 240); do
    if out=$(python3 -c "import urllib.request as u; print(u.urlopen(\"http://127.0.0.1:15021/healthz/ready\", timeout=1).read().decode())" 2>/dev/null); then
        echo "ztunnel readiness after $((i / 2)) s: 200 $out"; python3_ok=1; break
    fi
    sleep 0.5
done
python3 -c "import urllib.request as u; print(u.urlopen(\"http://127.0.0.1:15014/metrics\", timeout=2).read().decode())" \
    | grep -E "^ambimesh_(ztunnel_connected|config_synced|bpf_programs_attached) " || true
kill $controller $agent $ztunnel 2>/dev/null || true
wait 2>/dev/null || true
if [ $python3_ok = 0 ]; then tail -20 $d/agent.log $d/ztunnel.log $d/controller.log; exit 1; fi
ambimesh uninstall --pin-dir '"$pins"' --cgroup-root '"$cg"' --socket $d/ztunnel.sock'
rootfs=$(buildah mount "$ctr")
image_path=$(buildah inspect --type image --format '{{range .OCIv1.Config.Env}}{{println .}}{{end}}' "$image" | sed -n 's/^PATH=//p')
# In this script's cgroup and netns (nsenter, not ip netns exec: that remounts /sys and
# would hide bpffs), a private mount namespace with the host's /sys (bpffs, cgroup2), a
# fresh /proc and /tmp, then chroot into the image with the image's PATH, as uid 0.
sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' _ "$cg" \
    nsenter --net="/var/run/netns/$tag" unshare --mount --propagation private sh -c '
        set -e; root=$1; shift
        mount -t proc proc "$root/proc"
        mount --rbind /sys "$root/sys"
        mount --rbind /dev "$root/dev"
        mount -t tmpfs tmpfs "$root/tmp"
        exec chroot "$root" /usr/bin/env -i PATH="$1" HOME=/root sh -c "$2"' \
    _ "$rootfs" "$image_path" "$script"
[ ! -e "$pins" ] || { say "FAIL: $pins left behind"; exit 1; }
say "ok in $(( SECONDS - started )) s"
