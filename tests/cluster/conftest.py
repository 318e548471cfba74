"""Fixture of the cluster tests: a token-authenticated two-node Ray cluster on 127.0.0.1 started with
cluster/start_local_cluster.sh (its own temp dir and ports; stopped by its stop script, never `ray stop`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.cluster.faulty import ROOT

START = ROOT / "cluster" / "start_local_cluster.sh"
STOP = ROOT / "cluster" / "stop_local_cluster.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in process group `pgid`."""
    out = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True, timeout=10).stdout
    return any(int(g) == pgid and not s.startswith("Z") for g, s in (line.split()[:2] for line in out.splitlines()))


class LocalCluster:
    """Handle of a running cluster/start_local_cluster.sh cluster."""

    def __init__(self, directory: str, dashboard_port: int) -> None:
        self.dir = Path(directory)
        self.address = f"http://127.0.0.1:{dashboard_port}"
        self.token_path = self.dir / "auth_token"
        self.token = self.token_path.read_text().strip()
        self.pgids = [int((self.dir / f).read_text()) for f in ("head.pid", "worker.pid")]

    def nodes(self) -> list[dict]:
        req = urllib.request.Request(f"{self.address}/api/v0/nodes?detail=0",
                                     headers={"Authorization": f"Bearer {self.token}"})
        return json.load(urllib.request.urlopen(req, timeout=10))["data"]["result"]["result"]


@pytest.fixture(scope="module")
def local_cluster():
    """Head (0 CPUs) + one 2-CPU worker on 127.0.0.1, token auth on; stopped (and checked gone) afterwards."""
    pytest.importorskip("aiohttp", reason="the Ray Jobs server needs ray[default]: pip install -e '.[cluster]'")
    directory = tempfile.mkdtemp(prefix="rlftc", dir="/tmp")  # short: Ray puts Unix sockets under it
    dashboard_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RLFT_CLUSTER_DIR=directory, RLFT_GCS_PORT=str(free_port()), RLFT_DASHBOARD_PORT=str(dashboard_port),
               RLFT_CLIENT_PORT=str(free_port()), RLFT_WORKER_CPUS="2", RLFT_OBJECT_STORE_MB="100",
               RLFT_START_TIMEOUT="90", RAY=str(Path(sys.executable).with_name("ray")), PYTHONPATH=str(ROOT))
    started = time.monotonic()
    proc = subprocess.run(["bash", str(START)], env=env, capture_output=True, text=True, timeout=150)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        cluster = LocalCluster(directory, dashboard_port)
        cluster.start_output, cluster.start_seconds = proc.stdout, time.monotonic() - started
        yield cluster
    finally:
        pgids = [int(p.read_text()) for p in Path(directory).glob("*.pid")]
        subprocess.run(["bash", str(STOP)], env=env, capture_output=True, text=True, timeout=60)
        deadline = time.monotonic() + 15
        while any(group_alive(g) for g in pgids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(group_alive(g) for g in pgids), "the local cluster left processes behind"
        shutil.rmtree(directory, ignore_errors=True)
