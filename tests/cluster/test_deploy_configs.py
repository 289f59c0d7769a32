"""The deployment configs parse, pass their schemas, and give the actors the resources they need.

- ``deploy/ray-cluster.yaml`` (``ray up``): validated with Ray's own cluster-config schema after
  Ray fills in the provider defaults, as ``ray up`` does (offline: no cloud calls).
- ``deploy/kuberay-raycluster.yaml``: a ``ray.io/v1`` RayCluster whose ``edge`` and ``cloud``
  worker groups declare the custom resources through rayStartParams.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from edgespec.orchestrator.deploy import ROLE_SHARE
from edgespec.orchestrator.names import CLOUD_RESOURCE, EDGE_RESOURCE

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROLES = (EDGE_RESOURCE, CLOUD_RESOURCE)


@pytest.fixture(scope="module")
def ray_up_config() -> dict:
    return yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return yaml.safe_load((DEPLOY / "kuberay-raycluster.yaml").read_text())


def _prepared(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_ray_up_config_passes_rays_schema(ray_up_config):
    prepared = _prepared(ray_up_config)
    assert prepared["head_node_type"] == "head"
    assert set(prepared["available_node_types"]) == {"head", *ROLES}


def test_ray_up_schema_check_is_real(ray_up_config):
    import jsonschema

    bad = copy.deepcopy(ray_up_config)
    bad["available_node_types"][EDGE_RESOURCE]["resourcez"] = {"edge": 1}  # misspelt key
    with pytest.raises(jsonschema.ValidationError):
        _prepared(bad)


@pytest.mark.parametrize("role", ROLES)
def test_ray_up_node_types_declare_the_role_resources(ray_up_config, role):
    node_type = ray_up_config["available_node_types"][role]
    assert node_type["resources"].get(role, 0) >= ROLE_SHARE
    assert node_type["min_workers"] >= 1
    other = CLOUD_RESOURCE if role == EDGE_RESOURCE else EDGE_RESOURCE
    assert other not in node_type["resources"]  # a node has one role
    assert not ray_up_config["available_node_types"]["head"]["resources"].get(role)


def test_ray_up_start_commands_start_a_head_and_join_it(ray_up_config):
    head = " ".join(ray_up_config["head_start_ray_commands"])
    workers = " ".join(ray_up_config["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in workers
    setup = " ".join(ray_up_config["setup_commands"])
    assert "torch==2.13.0" in setup and "~/edgespec" in setup


def test_raycluster_is_a_kuberay_v1_raycluster(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert raycluster["kind"] == "RayCluster"
    assert raycluster["metadata"]["name"]
    spec = raycluster["spec"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert [g["groupName"] for g in spec["workerGroupSpecs"]] == list(ROLES)
    # KubeRay passes rayStartParams to `ray start` and requires every value to be a string.
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for key, value in group["rayStartParams"].items():
            assert isinstance(value, str), (key, value)


def _group(raycluster: dict, role: str) -> dict:
    return next(g for g in raycluster["spec"]["workerGroupSpecs"] if g["groupName"] == role)


@pytest.mark.parametrize("role", ROLES)
def test_raycluster_worker_groups_declare_the_role_resources(raycluster, role):
    group = _group(raycluster, role)
    # KubeRay's format: a JSON object inside a quoted string, '"{\"edge\": 1}"'.
    raw = group["rayStartParams"]["resources"]
    assert raw.startswith('"') and raw.endswith('"')
    resources = json.loads(raw[1:-1].replace('\\"', '"'))
    assert resources == {role: 1}
    assert resources[role] >= ROLE_SHARE
    assert group["replicas"] >= 1 and group["minReplicas"] <= group["replicas"]


def test_raycluster_cloud_pods_get_a_gpu_and_images_match_the_dockerfile(raycluster):
    cloud = _group(raycluster, CLOUD_RESOURCE)["template"]["spec"]["containers"][0]
    assert cloud["resources"]["limits"]["nvidia.com/gpu"] == "1"
    images = {
        c["image"]
        for g in [raycluster["spec"]["headGroupSpec"], *raycluster["spec"]["workerGroupSpecs"]]
        for c in g["template"]["spec"]["containers"]
    }
    assert len(images) == 1  # one image everywhere: actors import the same code on every node
    base = re.search(r"^FROM rayproject/ray:(\S+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert base is not None
    assert base.group(1).startswith(raycluster["spec"]["rayVersion"] + "-")
