"""Run as `python -m tests.cluster.node_loss OUT_DIR`: a sweep on a local three-node cluster survives the
loss of a worker node.

`ray.cluster_utils.Cluster` starts a head with no CPUs and two 1-CPU worker nodes (each node its own
raylet and object store, all on this machine). A two-trial sweep of `CountingLearner` runs one trial
per worker node; once the alpha=0.5 trial is past its first checkpoint (iteration 3), the node it runs
on is killed (its raylet and every process on it, no graceful shutdown). Tune sees the trial's actor
die, and `FailureConfig(max_failures)` restarts the trial from its last checkpoint on the node that is
left. The script prints one line `RESULT {json}`: the node removed, the iteration it was removed at and
each trial's status, final iteration and objective; the test reads the trials' progress.csv itself.

Run it in a fresh process with RAY_TMPDIR set (its own Ray temp dir): it starts and ends its own Ray.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from tests.cluster.faulty import ROOT, experiment

ITERATIONS = 12


def experiment_config(out: str) -> dict:
    data = experiment(os.path.join(out, "results"), "node_loss", ITERATIONS, 3, sleep_s=0.4,
                      progress_file=os.path.join(out, "progress_{alpha}.txt"))
    data["run"]["max_failures"] = 2
    return data


def main(out: str) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from rlft.run_config import experiment_from_dict
    from rlft.run.tune import run_experiment

    env = {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, resources={f"worker{i}": 1}) for i in range(2)]
    summary: dict = {"nodes_before": 3}
    try:
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
        cluster.wait_for_nodes()
        data = experiment_config(out)
        task, run, grid = experiment_from_dict(data)

        def remove_a_busy_node() -> None:
            """Waits for a trial checkpoint, then kills the worker node that runs the alpha=0.5 trial."""
            deadline = time.monotonic() + 120
            progress = Path(out, "progress_0.5.txt")
            while time.monotonic() < deadline:  # first checkpoint is at iteration 3; kill during 4..
                if progress.exists() and len(progress.read_text().splitlines()) >= 4:
                    break
                time.sleep(0.1)
            lines = progress.read_text().split("\n")
            node_id = lines[-2].split()[1]  # the node the alpha=0.5 trial runs on
            for node in workers:
                if node.node_id == node_id:
                    summary["removed_node"] = node_id
                    summary["removed_at_iteration"] = int(lines[-2].split()[0])
                    cluster.remove_node(node, allow_graceful=False)
                    return
            summary["removed_node"] = None

        killer = threading.Thread(target=remove_a_busy_node, daemon=True)
        killer.start()
        results = run_experiment(data, run, grid, os.path.join(out, "results", "node_loss"))
        killer.join(timeout=5)
        summary["nodes_alive_after"] = sum(n["Alive"] for n in ray.nodes())
        summary["trials"] = [{"alpha": r.config.get("alpha"), "error": None if r.error is None else str(r.error),
                              "iteration": r.metrics.get("iteration"), "objective": r.metrics.get("objective"),
                              "path": r.path} for r in results]
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(summary))  # Tune prints to stdout too: the test reads this line
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
