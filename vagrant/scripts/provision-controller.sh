#!/usr/bin/env bash
# Controller VM: ambimesh-controller (deploy/systemd) with the YAML directory
# /etc/ambimesh/config (vagrant/config plus pod IPs and UIDs: podvm config), the join
# tokens and the mesh root CA made on the host (vagrant/scripts/bundle.sh).
# Args: CONTROLLER_IP NODE=IP,NODE=IP
set -euo pipefail
install_ambimesh "$1"
node_addresses=$2
id ambimesh >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin ambimesh
say "config directory /etc/ambimesh/config from vagrant/config"
/opt/ambimesh/bin/python -m ambimesh.lab.podvm config --config /opt/ambimesh/src/vagrant/config \
    --out /etc/ambimesh/config --node-address "$node_addresses"
chmod 755 /etc/ambimesh/config
chmod 644 /etc/ambimesh/config/*.yaml
install -m 640 -g ambimesh /tmp/ambimesh/tokens.yaml /etc/ambimesh/tokens.yaml
install -d -m 700 -o ambimesh -g ambimesh /var/lib/ambimesh /var/lib/ambimesh/controller
install -m 600 -o ambimesh -g ambimesh /tmp/ambimesh/root-key.pem /var/lib/ambimesh/controller/root-key.pem
install -m 644 -o ambimesh -g ambimesh /tmp/ambimesh/root-cert.pem /var/lib/ambimesh/controller/root-cert.pem
rm -f /tmp/ambimesh/root-key.pem /tmp/ambimesh/tokens.yaml
cat >/etc/default/ambimesh <<ENV
AMBIMESH_LOG_LEVEL=INFO
ENV
say "systemctl enable --now ambimesh-controller"
systemctl enable --now ambimesh-controller.service
systemctl restart ambimesh-controller.service
for _ in $(seq 600); do
    if ss -ltn | grep -q ':15012 '; then say "controller listening on :15012"; exit 0; fi
    sleep 1
done
journalctl -u ambimesh-controller --no-pager | tail -20
echo "the controller did not listen on :15012 within 600 s (software emulation is slow)" >&2
exit 1
