#!/usr/bin/env bash
# Node VM: ambimesh-agent and ambimesh-ztunnel (deploy/systemd) with this node's join
# token, then its pods as network namespaces (python -m ambimesh.lab.podvm up: the lab's
# netns/veth/cgroup/pause builder, routes to the other node's pods over the VM link).
# Does not wait for readiness: the controller may still be booting; the agent compiles its
# BPF programs under software emulation (minutes). Args: NODE CONTROLLER_IP NODE=IP,NODE=IP
set -euo pipefail
node=$1
install_ambimesh "$2"
node_addresses=$3
install -m 600 /tmp/ambimesh/join-token /etc/ambimesh/join-token
rm -f /tmp/ambimesh/join-token
cat >/etc/default/ambimesh <<ENV
AMBIMESH_CONTROLLER=controller:15012
AMBIMESH_NODE=$node
AMBIMESH_LOG_LEVEL=INFO
ENV
say "pods of $node (podvm up)"
/opt/ambimesh/bin/python -m ambimesh.lab.podvm up --config /opt/ambimesh/src/vagrant/config \
    --node "$node" --node-address "$node_addresses"
say "systemctl enable --now ambimesh-agent ambimesh-ztunnel"
systemctl enable ambimesh-agent.service ambimesh-ztunnel.service
systemctl restart ambimesh-agent.service ambimesh-ztunnel.service
