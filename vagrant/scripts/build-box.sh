#!/usr/bin/env bash
# Builds the Vagrant box `ambimesh-bookworm` (libvirt provider) from Debian packages, once:
# there is no box download here (shared notes "vagrant-here"). Skips everything if the box
# is already known to vagrant; --force rebuilds it.
#
#  1. debootstrap bookworm (minbase + systemd, sshd, ifupdown, DHCP client, sudo, dbus) and,
#     in a chroot, Debian's kernel with its own headers (bcc compiles against them), bcc,
#     libbpf, python3-venv, iproute2, tcpdump, curl: nothing is installed inside the VMs
#     later, they need no internet;
#  2. the project's Python dependencies as a venv /opt/ambimesh from wheels made on this
#     host (vagrant/scripts/bundle.sh); provisioning adds ambimesh itself;
#  3. user vagrant (Vagrant's insecure key, passwordless sudo), eth0 by DHCP, host keys
#     made at first boot;
#  4. a 4 GB raw disk (one MBR partition, ext4 without 64bit/metadata_csum, extlinux),
#     converted to qcow2, packed as NAME.box and added with `vagrant box add`.
# Needs root and scripts/setup.sh --vagrant. Work files in $AMBIMESH_VAGRANT_WORK
# (default /var/tmp/ambimesh-vagrant); every mount and loop device is undone on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
work=${AMBIMESH_VAGRANT_WORK:-/var/tmp/ambimesh-vagrant}
box=${AMBIMESH_BOX:-ambimesh-bookworm}
say() { printf '[build-box] %s\n' "$*"; }
die() { printf '[build-box] ERROR: %s\n' "$*" >&2; exit 1; }
step() { say "$1: $(( SECONDS - started )) s"; started=$SECONDS; }
[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot, loop devices)"
if [ "${1:-}" != "--force" ] && vagrant box list 2>/dev/null | grep -q "^$box "; then
    say "box $box present (vagrant box list); --force rebuilds it"
    exit 0
fi
for tool in debootstrap extlinux sfdisk qemu-img vagrant; do
    command -v "$tool" >/dev/null || die "$tool missing: run scripts/setup.sh --vagrant"
done
rootfs=$work/rootfs
mnt=$work/mnt
loop=
cleanup() {
    for m in "$rootfs/dev/pts" "$rootfs/dev" "$rootfs/proc" "$rootfs/sys" "$mnt"; do
        mountpoint -q "$m" 2>/dev/null && umount -l "$m"
    done
    [ -n "$loop" ] && losetup -d "$loop" 2>/dev/null
    true
}
trap cleanup EXIT
mkdir -p "$work"
started=$SECONDS
total=$SECONDS

# 1. The root filesystem.
mirror=$(awk '/^URIs:/ { print $2; exit } /^deb / { print $2; exit }' \
    /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
rm -rf "$rootfs"
say "debootstrap bookworm from $mirror (log: $work/debootstrap.log)"
debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,udev,openssh-server,ifupdown,isc-dhcp-client,sudo,python3-minimal,dbus,iproute2 \
    bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log"; die "debootstrap failed"; }
step "debootstrap"
mount --bind /dev "$rootfs/dev"
mount --bind /dev/pts "$rootfs/dev/pts"
mount -t proc proc "$rootfs/proc"
mount -t sysfs sys "$rootfs/sys"
cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/" 2>/dev/null || true
say "chroot: kernel, headers, bcc, libbpf, python3-venv, tcpdump (log: $work/chroot.log)"
# A clean environment in the chroot: the host's PIP_*/proxy settings mean nothing there.
clean_env=(/usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
    DEBIAN_FRONTEND=noninteractive)
chroot "$rootfs" "${clean_env[@]}" sh -ec '
    apt-get update -q
    apt-get install -y -q --no-install-recommends linux-image-amd64 linux-headers-amd64 \
        initramfs-tools python3 python3-venv python3-bpfcc libbpf1 iproute2 tcpdump curl \
        ca-certificates procps less
    apt-get clean
' >"$work/chroot.log" 2>&1 || { tail -20 "$work/chroot.log"; die "apt-get in the chroot failed"; }
step "kernel and packages"

# 2. The Python dependencies (wheels from the host; ambimesh itself comes at provisioning).
"$repo/vagrant/scripts/bundle.sh"
mkdir -p "$rootfs/tmp/wheels"
tar -C "$rootfs/tmp/wheels" --strip-components=1 -xf "$work/bundle/ambimesh-bundle.tar" wheels
chroot "$rootfs" "${clean_env[@]}" sh -ec '
    python3 -m venv /opt/ambimesh
    /opt/ambimesh/bin/pip install -q --no-index --find-links /tmp/wheels ambimesh
    /opt/ambimesh/bin/pip uninstall -q -y ambimesh
    site=$(/opt/ambimesh/bin/python -c "import sysconfig; print(sysconfig.get_paths()[\"purelib\"])")
    ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
    rm -rf /tmp/wheels
' >>"$work/chroot.log" 2>&1 || { tail -20 "$work/chroot.log"; die "venv in the chroot failed"; }
step "venv /opt/ambimesh (dependencies)"

# 3. Vagrant's expectations.
cat >"$rootfs/etc/network/interfaces" <<'IF'
source /etc/network/interfaces.d/*
auto lo
iface lo inet loopback
allow-hotplug eth0
iface eth0 inet dhcp
IF
echo "ambimesh-box" >"$rootfs/etc/hostname"
chroot "$rootfs" sh -ec '
    id vagrant >/dev/null 2>&1 || useradd -m -s /bin/bash vagrant
    echo "vagrant ALL=(ALL) NOPASSWD: ALL" >/etc/sudoers.d/vagrant
    chmod 0440 /etc/sudoers.d/vagrant
    echo "UseDNS no" >/etc/ssh/sshd_config.d/vagrant.conf
    rm -f /etc/ssh/ssh_host_*
    echo "root:vagrant" | chpasswd
'
pubkey=$(dpkg -L vagrant | grep 'keys/vagrant.pub$' | head -1)
[ -n "$pubkey" ] || die "the vagrant package ships no keys/vagrant.pub"
install -d -m 700 "$rootfs/home/vagrant/.ssh"
install -m 600 "$pubkey" "$rootfs/home/vagrant/.ssh/authorized_keys"
chroot "$rootfs" chown -R vagrant:vagrant /home/vagrant/.ssh
cat >"$rootfs/etc/systemd/system/ssh-hostkeys.service" <<'UNIT'
[Unit]
Description=Make this VM's own SSH host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
[Install]
WantedBy=multi-user.target
UNIT
chroot "$rootfs" systemctl enable ssh-hostkeys.service >/dev/null 2>&1
for m in "$rootfs/dev/pts" "$rootfs/dev" "$rootfs/proc" "$rootfs/sys"; do umount -l "$m"; done
kver=$(ls "$rootfs/lib/modules" | sort -V | tail -1)
[ -e "$rootfs/lib/modules/$kver/build/include" ] || die "no headers for kernel $kver in the box"
step "vagrant user, network, ssh"

# 4. Disk image and box.
raw=$work/disk.raw
rm -f "$raw"
truncate -s 4G "$raw"
echo 'start=2048, type=83, bootable' | sfdisk -q "$raw"
loop=$(losetup -f --show -o 1048576 "$raw")
mkfs.ext4 -q -O ^64bit,^metadata_csum -L root "$loop"
uuid=$(blkid -s UUID -o value "$loop")
mkdir -p "$mnt"
mount "$loop" "$mnt"
cp -a "$rootfs"/. "$mnt"/
echo "UUID=$uuid / ext4 errors=remount-ro 0 1" >"$mnt/etc/fstab"
mkdir -p "$mnt/boot/extlinux"
cat >"$mnt/boot/extlinux/extlinux.conf" <<CONF
DEFAULT linux
TIMEOUT 1
LABEL linux
  LINUX /boot/vmlinuz-$kver
  INITRD /boot/initrd.img-$kver
  APPEND root=UUID=$uuid ro net.ifnames=0 biosdevname=0 console=ttyS0
CONF
extlinux --install "$mnt/boot/extlinux" >/dev/null 2>&1
umount "$mnt"
losetup -d "$loop"
loop=
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none
rm -rf "$work/box"
mkdir -p "$work/box"
qemu-img convert -f raw -O qcow2 "$raw" "$work/box/box.img"
rm -f "$raw"
echo '{"provider":"libvirt","format":"qcow2","virtual_size":4}' >"$work/box/metadata.json"
tar -C "$work/box" -cf "$work/$box.box" metadata.json box.img
rm -rf "$work/box" "$rootfs"
step "disk image ($(du -m "$work/$box.box" | cut -f1) MB)"
vagrant box add --force --name "$box" "$work/$box.box" >/dev/null
rm -f "$work/$box.box"
step "vagrant box add"
say "box $box built in $(( SECONDS - total )) s (kernel $kver)"
