"""cluster.yaml passes Ray's own cluster-launcher validation (the steps `ray up` runs before it
talks to the cloud: prepare_config = defaults + node types, then validate_config = the JSON
schema and cross-field checks), and says what the README promises. No cloud access needed."""
from __future__ import annotations

import copy
import re

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.cli_helpers import ROOT

CLUSTER_YAML = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def config(text) -> dict:
    return yaml.safe_load(text)


def commands(config: dict, *keys: str) -> str:
    return "\n".join(cmd for key in keys for cmd in config.get(key, []))


def test_cluster_yaml_passes_rays_validation(config):
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    # what prepare_config filled in is Ray's, what we wrote is kept
    assert prepared["head_node_type"] == "head"
    assert prepared["max_workers"] == config["max_workers"]


def test_node_types(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0  # no evaluators on the head
    gpu = [t for name, t in types.items() if name != config["head_node_type"]]
    assert gpu and all(t["resources"]["GPU"] >= 1 for t in gpu)
    assert all(t["min_workers"] == 0 and 1 <= t["max_workers"] <= config["max_workers"] for t in gpu)


def test_every_node_runs_this_project_at_the_same_version(config):
    assert config["file_mounts"] == {"~/mbp-search": "."}  # this checkout, synced by `ray up`
    setup = commands(config, "setup_commands", "head_setup_commands", "worker_setup_commands")
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = commands(config, key)
        assert "-e ~/mbp-search" in cmds and f'"ray[default]=={ray.__version__}"' in cmds, (
            f"{key} must install this checkout and the Ray of the machine running `ray up` ({ray.__version__})")
    assert "--python 3.11" in setup


def test_head_runs_the_service_on_loopback(config):
    start = commands(config, "head_start_ray_commands")
    serve = next(line for line in config["head_start_ray_commands"] if "search serve" in line)
    assert "--host 127.0.0.1" in serve and "--ray-address auto" in serve and "--token" not in serve
    assert start.index("ray start --head") < start.index("search serve")
    assert "--address=$RAY_HEAD_IP:6379" in commands(config, "worker_start_ray_commands")


def test_local_provider_variant_in_the_comments_validates(config, text):
    block = re.search(r"# --- local provider variant ---\n(.*?)# --- end local provider variant ---", text, re.S)
    assert block, "the local/on-prem variant is missing from cluster.yaml's comments"
    variant = yaml.safe_load("\n".join(line.removeprefix("# ") for line in block.group(1).splitlines()))
    local = {k: v for k, v in copy.deepcopy(config).items() if k not in ("available_node_types", "head_node_type")}
    local.update(variant)
    prepared = prepare_config(local)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "local" and len(prepared["provider"]["worker_ips"]) == 2


def test_mac_instructions(text):
    for needed in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1", "--resources '{\"coreml\": 1}'", "--node-ip-address",
                   f'"ray[default]=={ray.__version__}"', "--python 3.11"):
        assert needed in text, needed
