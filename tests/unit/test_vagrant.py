"""Static checks of vagrant/ (the VMs themselves run only in `make test-vagrant`)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from ambimesh.lab import podvm

ROOT = Path(__file__).resolve().parents[2]
VAGRANT = ROOT / "vagrant"


def test_scripts_parse_and_vagrantfile_names_existing_files() -> None:
    scripts = sorted((VAGRANT / "scripts").glob("*.sh"))
    assert {s.name for s in scripts} >= {
        "build-box.sh",
        "bundle.sh",
        "run-test.sh",
        "provision-common.sh",
        "provision-controller.sh",
        "provision-node.sh",
    }
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)
    vagrantfile = (VAGRANT / "Vagrantfile").read_text()
    for role in re.findall(r'provision_script\("(\w+)"\)', vagrantfile):
        assert (VAGRANT / "scripts" / f"provision-{role}.sh").is_file()
    assert 'synced_folder ".", "/vagrant", disabled: true' in vagrantfile
    assert 'lv.driver = "qemu"' in vagrantfile


def test_run_test_always_tears_down() -> None:
    text = (VAGRANT / "scripts" / "run-test.sh").read_text()
    assert "trap teardown EXIT" in text
    for needle in ("vagrant destroy -f", "pool-undefine", "net-destroy", "ip netns del"):
        assert needle in text
    # daemons are stopped by the PID they wrote, never by name
    assert "pkill" not in text and "killall" not in text
    assert "test-vagrant:" in (ROOT / "Makefile").read_text()


def test_config_plans_pods_on_both_nodes(tmp_path: Path) -> None:
    plan = podvm.load_plan(VAGRANT / "config")
    assert [n.name for n in plan.nodes] == ["node-1", "node-2"]
    pods = {p.ref: p for p in plan.pods}
    assert pods["demo/client"].node == "node-1" and pods["demo/server"].node == "node-2"
    # UIDs are derived, so the controller VM and the node VMs agree without talking
    assert podvm.load_plan(VAGRANT / "config").pods == plan.pods
    addresses = podvm.parse_addresses("node-1=192.168.56.11,node-2=192.168.56.12")
    podvm.write_config(plan, tmp_path, addresses)
    docs = [d for d in yaml.safe_load_all((tmp_path / "pods.yaml").read_text()) if d]
    server = next(d for d in docs if d["kind"] == "Pod" and d["metadata"]["name"] == "server")
    assert server["status"]["hostIP"] == "192.168.56.12"
    assert server["metadata"]["uid"] == pods["demo/server"].uid
    namespaces = yaml.safe_load((VAGRANT / "config" / "namespaces.yaml").read_text())
    assert namespaces["metadata"]["labels"]["ambimesh.io/dataplane-mode"] == "none"
