"""The cluster definitions in cluster/ pass validation (offline) and keep their security properties.

Launcher YAMLs: Ray's own schema (`ray.autoscaler._private.util.prepare_config` merges the provider's
defaults.yaml, `validate_config` checks ray-schema.json and the node-type rules). KubeRay manifests: the
hand-written schema of KubeRay's Go types in `kuberay_schema.py`, plus Ray's KubeRay autoscaler, which
derives (and validates) an autoscaling config from a RayCluster spec exactly as it does in a cluster.
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from rlft.run_config import load_experiment
from tests.cluster.kuberay_schema import SCHEMAS

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
LAUNCHER_YAMLS = ["aws-gpu.yaml", "gcp-gpu.yaml"]
MANIFESTS = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_start_lines(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bray start\b", c)]


# -- cluster launcher ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_passes_rays_schema(name):
    config = prepare_config(copy.deepcopy(_load(name)))
    validate_config(config)
    assert config["provider"]["type"] == name.split("-")[0]


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_head_schedules_nothing_and_gpu_workers_autoscale(name):
    config = prepare_config(copy.deepcopy(_load(name)))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0
    gpu = [t for n, t in types.items() if n != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no GPU worker group"
    assert all(t["min_workers"] == 0 < t["max_workers"] <= config["max_workers"] for t in gpu)
    assert "2.60.0" in config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_token_auth_on_every_node_and_dashboard_on_localhost(name):
    config = _load(name)
    head, worker = _ray_start_lines(config["head_start_ray_commands"]), _ray_start_lines(config["worker_start_ray_commands"])
    assert len(head) == len(worker) == 1
    for line in head + worker:
        assert "RAY_AUTH_MODE=token ray start" in line
    assert "--dashboard-host=127.0.0.1" in head[0]
    assert "0.0.0.0" not in yaml.safe_dump(config)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_ray_schema_rejects_a_broken_launcher_yaml():
    """The validation above can fail: a misspelt top-level key and a head type that does not exist."""
    config = _load("aws-gpu.yaml")
    config["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))
    config = _load("gcp-gpu.yaml")
    config["head_node_type"] = "head_gpu"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(config))


# -- KubeRay -----------------------------------------------------------------------------------------


def _cluster_spec(manifest: dict) -> dict:
    return manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest_matches_kuberay_types(name):
    manifest = _load(name)
    jsonschema.validate(manifest, SCHEMAS[manifest["kind"]])


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest_token_auth_cpu_head_gpu_workers(name):
    spec = _cluster_spec(_load(name))
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert not spec["headGroupSpec"].get("enableIngress", False)
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        shm = [m["name"] for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm and any(v["name"] == shm[0] and v["emptyDir"]["medium"] == "Memory" for v in pod["volumes"])


@pytest.mark.parametrize("name", MANIFESTS)
def test_rays_kuberay_autoscaler_reads_the_cluster_spec(name):
    """Ray derives the same node types the autoscaler would use in the cluster (and validates them)."""
    manifest = _load(name)
    cr = {"metadata": {"name": manifest["metadata"]["name"], "namespace": "default"}, "spec": _cluster_spec(manifest)}
    config = _derive_autoscaling_config_from_ray_cr(cr)
    types = config["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert types["gpu"]["resources"]["GPU"] == 1 and types["gpu"]["resources"]["CPU"] == 8
    assert types["gpu"]["min_workers"] == 0 < types["gpu"]["max_workers"]


def test_kuberay_schema_rejects_misspelt_fields():
    manifest = _load("kuberay/raycluster.yaml")
    broken = copy.deepcopy(manifest)
    broken["spec"]["workerGroupSpec"] = broken["spec"].pop("workerGroupSpecs")
    with pytest.raises(jsonschema.ValidationError, match="workerGroupSpec"):
        jsonschema.validate(broken, SCHEMAS["RayCluster"])
    broken = copy.deepcopy(manifest)
    broken["spec"]["authOptions"]["mode"] = "tokens"
    with pytest.raises(jsonschema.ValidationError, match="tokens"):
        jsonschema.validate(broken, SCHEMAS["RayCluster"])
    broken = copy.deepcopy(manifest)
    del broken["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        jsonschema.validate(broken, SCHEMAS["RayCluster"])


def test_rayjob_entrypoint_runs_a_valid_sweep_config_of_this_repo():
    job = _load("kuberay/rayjob.yaml")
    args = job["spec"]["entrypoint"].split()
    assert args[:4] == ["python", "-m", "rlft.cli", "sweep"]
    image_root = "/home/ray/rlft/"  # where cluster/Dockerfile puts the project
    assert args[4].startswith(image_root)
    config = CLUSTER.parent / args[4][len(image_root):]
    storage = args[args.index("--storage-path") + 1]
    task, run, grid = load_experiment(config, {"run.storage_path": storage})
    assert grid and "alpha" in grid.params and run.is_cloud_storage
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "WORKDIR /home/ray/rlft" in dockerfile and "COPY --chown=ray:users tune_configs" in dockerfile
    assert f"FROM rayproject/ray:{ray.__version__}" in dockerfile


# -- local test cluster scripts ------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["start_local_cluster.sh", "stop_local_cluster.sh"])
def test_local_cluster_scripts_parse(script):
    subprocess.run(["bash", "-n", str(CLUSTER / script)], check=True, timeout=10)
