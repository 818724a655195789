"""Packet capture on the lab's fabric with tcpdump: what really crossed between nodes."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ambimesh.lab.topology import LabPlan

_PORTS = re.compile(r" IP [\d.]+\.(\d+) > [\d.]+\.(\d+):")
START_TIMEOUT = 10.0


@dataclass
class CaptureResult:
    pcap: Path
    raw: bytes
    summary: list[str]

    @property
    def packets(self) -> int:
        return len(self.summary)

    def ports(self) -> set[int]:
        """Every TCP port seen on either side of the captured packets."""
        found: set[int] = set()
        for line in self.summary:
            match = _PORTS.search(line)
            if match:
                found.update(int(p) for p in match.groups())
        return found

    def contains(self, needle: bytes) -> bool:
        return needle in self.raw


@contextmanager
def fabric_capture(plan: LabPlan, node: str, pcap: Path) -> Iterator[list[CaptureResult]]:
    """Capture TCP on ``node``'s port of the fabric; the result is appended on exit."""
    pcap.unlink(missing_ok=True)
    argv = [
        "ip",
        "netns",
        "exec",
        plan.fabric_netns,
        "tcpdump",
        "-Z",
        "root",
        "-i",
        plan.node(node).fabric_veth,
        "-U",
        "--immediate-mode",
        "-nn",
        "-s",
        "0",
        "-w",
        str(pcap),
        "tcp",
    ]
    sniffer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results: list[CaptureResult] = []
    try:
        _wait_listening(sniffer)
        yield results
        time.sleep(0.3)  # let the last segments (FIN/ACK) land
    finally:
        sniffer.terminate()
        sniffer.communicate(timeout=10)
    read = subprocess.run(
        ["tcpdump", "-nn", "-r", str(pcap)], capture_output=True, text=True, check=False
    )
    results.append(CaptureResult(pcap, pcap.read_bytes(), read.stdout.splitlines()))


def _wait_listening(sniffer: subprocess.Popen[bytes]) -> None:
    """tcpdump says "listening on" on stderr once packets are being captured."""
    assert sniffer.stderr is not None
    deadline = time.monotonic() + START_TIMEOUT
    line = b""
    while time.monotonic() < deadline:
        line = sniffer.stderr.readline()
        if b"listening on" in line or not line:
            break
    if b"listening on" not in line:
        raise RuntimeError(f"tcpdump did not start capturing: {line.decode(errors='replace')}")
