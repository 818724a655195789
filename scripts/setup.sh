#!/usr/bin/env bash
# Idempotent machine + project setup shared by `make demo` and `make test`.
# Installs what is missing (apt packages, kernel headers for bcc, .venv) and says what it does.
# --bench (`make bench`) adds the benchmark's load tools and the `bench` extra (Envoy, py-spy).
set -euo pipefail
cd "$(dirname "$0")/.."
bench=0
[ "${1:-}" = "--bench" ] && bench=1
# --image (`make image`): podman, buildah and debootstrap build the container image.
image=0
[ "${1:-}" = "--image" ] && image=1
# --vagrant (`make test-vagrant`): vagrant + vagrant-libvirt, libvirt/QEMU (software emulation)
# and the box build's tools (vagrant/README.md). Without recommends, as verified here.
vagrant=0
[ "${1:-}" = "--vagrant" ] && vagrant=1

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (eBPF, network namespaces and cgroups need it); try: sudo make ..."
# Two setups at once (two make targets in parallel) would race on dpkg and the venv: one waits.
exec 9>/run/lock/ambimesh-setup.lock
flock -n 9 || { say "waiting for another setup to finish (/run/lock/ambimesh-setup.lock)"; \
    flock -w 1200 9 || die "another setup held /run/lock/ambimesh-setup.lock for 20 min"; }
[ -e /sys/kernel/btf/vmlinux ] || [ -e /proc/sys/net/core/bpf_jit_enable ] \
    || die "this kernel has no BPF support (no /proc/sys/net/core/bpf_jit_enable)"
cgroup2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
[ -n "$cgroup2" ] || die "no cgroup v2 hierarchy is mounted; mount one (mount -t cgroup2 none /sys/fs/cgroup/unified)"
say "cgroup v2 at $cgroup2"
# The agent pins its eBPF maps and links here so pods stay captured across agent restarts.
if awk '$2 == "/sys/fs/bpf" && $3 == "bpf" { found = 1 } END { exit !found }' /proc/mounts; then
    say "bpffs at /sys/fs/bpf"
else
    say "mounting bpffs at /sys/fs/bpf"
    mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)"
fi

apt_pkgs=(python3-bpfcc libbpf1 iproute2 tcpdump python3-venv curl)
[ "$bench" = 1 ] && apt_pkgs+=(iperf3 wrk nginx-light)
[ "$image" = 1 ] && apt_pkgs+=(podman buildah debootstrap fuse-overlayfs uidmap)
[ "$vagrant" = 1 ] && apt_pkgs+=(vagrant vagrant-libvirt libvirt-daemon-system
    libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils debootstrap
    extlinux syslinux-common dnsmasq-base iptables fdisk)
nginx_before=$(command -v nginx || true)
missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
kver=$(uname -r)
if [ ! -e "/lib/modules/$kver/build/include" ]; then
    hdr="linux-headers-$(dpkg --print-architecture)"
    dpkg-query -W -f='${Status}' "$hdr" 2>/dev/null | grep -q "install ok installed" || missing+=("$hdr")
fi
if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null || die "apt-get update failed"
    recommends=()
    [ "$vagrant" = 1 ] && recommends=(--no-install-recommends)
    apt-get -o DPkg::Lock::Timeout=600 install -y -q "${recommends[@]}" "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
else
    say "apt packages present: ${apt_pkgs[*]}"
fi
if [ "$bench" = 1 ] && [ -z "$nginx_before" ] && command -v systemctl >/dev/null \
    && systemctl is-enabled --quiet nginx 2>/dev/null; then
    # The bench starts its own nginx inside lab pods; Debian's default site on :80 is not wanted.
    say "disabling the nginx service the package just enabled (the bench runs its own)"
    systemctl disable --now nginx >/dev/null 2>&1 || true
fi

if [ ! -e "/lib/modules/$kver/build/include" ]; then
    # The running kernel ships no headers (e.g. a VM kernel): bcc compiles against Debian's.
    arch_dir=$(ls -d /usr/src/linux-headers-*-"$(dpkg --print-architecture)" 2>/dev/null | sort -V | tail -1)
    [ -n "$arch_dir" ] || die "no kernel headers under /usr/src; install linux-headers-$(dpkg --print-architecture)"
    common_dir="${arch_dir%-*}-common"
    say "kernel $kver has no headers: linking /lib/modules/$kver/{build,source} -> $arch_dir, $common_dir"
    mkdir -p "/lib/modules/$kver"
    ln -sfn "$arch_dir" "/lib/modules/$kver/build"
    ln -sfn "$common_dir" "/lib/modules/$kver/source"
else
    say "kernel headers for $kver present"
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$python is older than 3.11"
if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $("$python" --version)"
    "$python" -m venv .venv
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -e "$site/bcc" ]; then
    say "making Debian's bcc (only that package) importable in .venv"
    ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
fi
stamp=.venv/.installed
extras=dev
if [ "$bench" = 1 ]; then stamp=.venv/.installed-bench; extras=dev,bench; fi
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "pip install -e .[$extras]"
    .venv/bin/pip install -q --disable-pip-version-check -e ".[$extras]" || die "pip install failed"
    touch "$stamp"
else
    say ".venv up to date"
fi

.venv/bin/python - <<'PY' || die "bcc cannot compile a BPF program (kernel headers? see above)"
from bcc import BPF
BPF(text="int probe(void *ctx) { return 0; }").cleanup()
PY
say "bcc compiles BPF programs: ok"
