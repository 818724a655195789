#!/usr/bin/env bash
# Prepended to provision-controller.sh and provision-node.sh by the Vagrantfile (a shell
# provisioner uploads one script): install_ambimesh CONTROLLER_IP, inside a VM, as root,
# installs ambimesh from the bundle the file provisioner uploaded to /tmp/ambimesh.
# The source goes to /opt/ambimesh/src, ambimesh into the venv /opt/ambimesh (its
# dependencies are in the box already; any new one comes from the bundle's wheels), the
# systemd units from deploy/systemd into /etc/systemd/system. Idempotent.
set -euo pipefail
say() { printf '[provision %s] %s\n' "$(hostname)" "$*"; }
install_ambimesh() {
local controller_ip=$1
local bundle=/tmp/ambimesh/ambimesh-bundle.tar
[ -s "$bundle" ] || { echo "no $bundle: the file provisioner did not run" >&2; exit 1; }
say "unpacking the bundle into /opt/ambimesh/src"
rm -rf /opt/ambimesh/src /opt/ambimesh/wheels
mkdir -p /opt/ambimesh
tar -C /opt/ambimesh -xf "$bundle"
say "pip install ambimesh (no index: the bundle's wheels)"
/opt/ambimesh/bin/pip install -q --disable-pip-version-check --no-index \
    --find-links /opt/ambimesh/wheels ambimesh
/opt/ambimesh/bin/pip install -q --disable-pip-version-check --no-index --no-deps \
    --force-reinstall --find-links /opt/ambimesh/wheels ambimesh
install -d -m 755 /etc/ambimesh
install -m 644 /tmp/ambimesh/root-cert.pem /etc/ambimesh/root-cert.pem
install -m 644 /opt/ambimesh/src/deploy/systemd/*.service /etc/systemd/system/
grep -q " controller$" /etc/hosts || echo "$controller_ip controller" >>/etc/hosts
systemctl daemon-reload
}
