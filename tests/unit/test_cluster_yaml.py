"""``cluster.yaml`` against what ``ray up`` really does with it (Ray 2.60).

- Offline, the same steps as ``ray.autoscaler._private.commands._bootstrap_config``:
  ``prepare_config`` (merge with Ray's AWS defaults) then ``validate_config`` (Ray's
  ``ray-schema.json`` plus its cross-field checks). Broken copies must fail the same way.
- Against a moto EC2/IAM server on loopback: the AWS provider's bootstrap (key pair, subnets,
  security group, instance-type resource detection) and ``create_node`` for every node type,
  i.e. everything ``ray up`` does before it opens SSH.
- The node commands themselves, run through Ray's own shell wrapper in a temporary HOME with a
  stand-in ``ray`` executable (a real ``ray stop`` would stop every Ray process on the machine):
  the environment the ``ray start`` process sees is what the raylet hands to the job driver,
  Ray Train workers and their DataLoader workers.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
ENV_FILE = "dfmvr.env"


def _load() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _load_for_moto(group_id: str) -> dict[str, Any]:
    """The config with its instance profiles moved into moto's account and its security group
    replaced by ``group_id`` (made in moto as docs/cluster.md makes it), so the test keeps
    working once a user has put their own ids into cluster.yaml."""
    from moto.core import DEFAULT_ACCOUNT_ID

    config = _load()
    for spec in config["available_node_types"].values():
        profile = spec["node_config"]["IamInstanceProfile"]
        head, _, name = profile["Arn"].partition(":instance-profile/")
        profile["Arn"] = f"{head.rsplit(':', 1)[0]}:{DEFAULT_ACCOUNT_ID}:instance-profile/{name}"
        spec["node_config"]["SecurityGroupIds"] = [group_id]
    return config


SSH_CIDR = "203.0.113.0/24"


def _make_cluster_group(ec2, cidr: str) -> str:
    """docs/cluster.md's step 0 with boto3: SSH from ``cidr``, all traffic between members."""
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    group = ec2.create_security_group(GroupName="dfmvr-cluster", Description="dfmvr Ray cluster", VpcId=vpc)["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=group, IpProtocol="tcp", FromPort=22, ToPort=22, CidrIp=cidr)
    ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]}])
    return group


def _prepare_and_validate(config: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _gpu_worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = config["head_node_type"]
    return {
        name: spec
        for name, spec in config["available_node_types"].items()
        if name != head and spec["node_config"]["InstanceType"].split(".")[0] in ("g5", "g6", "p4d", "p5")
    }


# ---------------------------------------------------------------------------------------------
# Ray's schema and cross-field checks


def test_cluster_yaml_passes_rays_own_validation():
    prepared = _prepare_and_validate(_load())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["cluster_name"] == "dfmvr"
    # Ray's AWS defaults fill every top-level key we leave out; the ones that would run
    # commands on our nodes must be ours.
    raw = _load()
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in raw, f"cluster.yaml: {key} missing, so Ray's AWS default would run instead"
    assert prepared["head_setup_commands"] == raw["setup_commands"]
    assert prepared["worker_setup_commands"] == raw["setup_commands"]


def _unknown_top_level_key(c: dict) -> None:
    c["max_worker"] = 8


def _worker_without_node_config(c: dict) -> None:
    next(iter(_gpu_worker_types(c).values())).pop("node_config")


def _fractional_gpu_resource(c: dict) -> None:
    next(iter(_gpu_worker_types(c).values()))["resources"] = {"GPU": 0.5}


def _head_type_not_defined(c: dict) -> None:
    c["head_node_type"] = "no_such_type"


def _min_workers_above_global_max(c: dict) -> None:
    next(iter(_gpu_worker_types(c).values()))["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize(
    "break_it,error",
    [
        (_unknown_top_level_key, jsonschema.ValidationError),
        (_worker_without_node_config, jsonschema.ValidationError),
        (_fractional_gpu_resource, jsonschema.ValidationError),
        (_head_type_not_defined, ValueError),
        (_min_workers_above_global_max, ValueError),
    ],
)
def test_broken_copies_fail_validation(break_it: Callable[[dict], None], error: type[Exception]):
    config = _load()
    break_it(config)
    with pytest.raises(error):
        _prepare_and_validate(config)


# ---------------------------------------------------------------------------------------------
# What the config promises


def test_gpu_workers_autoscale_and_the_head_has_no_gpu():
    config = _load()
    gpu = _gpu_worker_types(config)
    assert gpu, "cluster.yaml: expected a worker type on a GPU instance family (g5, g6, p4d, p5)"
    for name, spec in gpu.items():
        assert spec.get("min_workers", 0) == 0, f"{name}: idle GPUs should scale to zero"
        assert spec["max_workers"] >= 1, f"{name}: max_workers must allow at least one GPU node"
        assert spec["max_workers"] <= config["max_workers"]
    head = config["available_node_types"][config["head_node_type"]]
    assert head["node_config"]["InstanceType"].split(".")[0] in ("m5", "m6i", "m7i", "c5", "r5")
    assert head["resources"].get("GPU", 0) == 0


def test_every_node_has_an_ami_id_and_an_instance_profile():
    for name, spec in _load()["available_node_types"].items():
        node = spec["node_config"]
        assert re.fullmatch(r"ami-[0-9a-f]{8}(?:[0-9a-f]{9})?", node["ImageId"]), f"{name}: ImageId {node['ImageId']!r}"
        arn = node["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), f"{name}: {arn!r}"


def test_head_binds_the_dashboard_to_loopback_only():
    head_start = " ".join(_load()["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    # nothing in the file binds a control plane to every interface or turns Ray's token auth off
    text = CLUSTER_YAML.read_text()
    assert "0.0.0.0" not in text.replace("0.0.0.0/0", "")
    assert "RAY_AUTH_MODE=disabled" not in text


def test_every_node_type_names_the_cluster_group():
    """A group Ray makes itself opens SSH to 0.0.0.0/0 (ray.autoscaler._private.aws.config); with
    SecurityGroupIds on every node type Ray makes none and changes none."""
    groups = [spec["node_config"].get("SecurityGroupIds") for spec in _load()["available_node_types"].values()]
    assert all(g and len(g) == 1 for g in groups) and len({g[0] for g in groups}) == 1, groups
    docs = (REPO / "docs" / "cluster.md").read_text()
    assert "authorize-security-group-ingress" in docs and "--port 22 --cidr $MY_CIDR" in docs


def test_file_mounts_carry_what_pip_install_needs():
    config = _load()
    mounts = dict(config["file_mounts"])
    # Ray's auth token goes from the user's home to every node's (never from the repository)
    assert mounts.pop("~/.ray/auth_token") == "~/.ray/auth_token"
    for remote, local in mounts.items():
        assert (REPO / local).exists(), f"file_mounts[{remote!r}]: {local!r} does not exist in the repository"
        assert remote.startswith("~/dfmvr/"), remote
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    mounted = {Path(local).as_posix().removeprefix("./") for local in mounts.values()}
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert needed <= mounted, f"file_mounts lack {sorted(needed - mounted)}"


def test_setup_installs_the_pytorch3d_extra_into_a_python_311_venv():
    setup = _load()["setup_commands"]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "pytorch3d" in pyproject["project"]["optional-dependencies"]
    # "~" does not expand inside quotes: the path must use $HOME.
    assert any('pip install -e "$HOME/dfmvr[pytorch3d]"' in cmd for cmd in setup), setup
    assert any("--python 3.11" in cmd for cmd in setup), "easypytorch3d only ships a CPython 3.11 wheel"


_SECRET_PATTERNS = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # access key ids
    re.compile(r"aws_secret_access_key|aws_access_key_id|aws_session_token", re.IGNORECASE),
    re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),  # secret-key shaped
]


def test_no_aws_credentials_in_the_file():
    text = CLUSTER_YAML.read_text()
    for pattern in _SECRET_PATTERNS:
        assert not pattern.search(text), f"cluster.yaml matches {pattern.pattern!r}: use instance profiles"


@pytest.mark.parametrize(
    "planted",
    ["    - export KEY_ID=AKIAIOSFODNN7EXAMPLE",  # AWS's documentation example values
     "    aws_access_key_id: x",
     "    - export S=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"],
)
def test_secret_scan_finds_a_planted_credential(planted: str):
    text = CLUSTER_YAML.read_text() + "\n" + planted + "\n"
    assert any(p.search(text) for p in _SECRET_PATTERNS), planted


# ---------------------------------------------------------------------------------------------
# The commands, run through Ray's shell wrapper


def _run_node_command(cmd: str, home: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    from ray.autoscaler._private.command_runner import _with_interactive

    argv = _with_interactive(cmd)
    # Ray hands this list to ssh; the remote shell removes the quoting of the last item.
    argv[-1] = shlex.split(argv[-1])[0]
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "TERM": "dumb", **(extra_env or {})}
    return subprocess.run(argv, env=env, cwd=home, capture_output=True, text=True, timeout=60)


@pytest.fixture
def node_home(tmp_path: Path) -> Path:
    """A fresh HOME with the environment-file setup commands applied and a recording ``ray``."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("")
    setup = [c for c in _load()["setup_commands"] if ENV_FILE in c]
    assert setup, f"setup_commands: expected a command writing ~/{ENV_FILE}"
    for cmd in setup:
        done = _run_node_command(cmd, home)
        assert done.returncode == 0, done.stderr
    ray = home / "venv" / "bin" / "ray"
    ray.parent.mkdir(parents=True)
    ray.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "records = os.environ['RECORD_DIR']\n"
        "with open(os.path.join(records, str(len(os.listdir(records)))), 'w') as f:\n"
        "    json.dump({'argv': sys.argv[1:], 'env': dict(os.environ)}, f)\n"
    )
    ray.chmod(ray.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "records").mkdir()
    return home


def _start_calls(node_home: Path, commands: list[str], extra_env: dict[str, str]) -> list[dict]:
    records = node_home.parent / "records"
    for cmd in commands:
        done = _run_node_command(cmd, node_home, {"RECORD_DIR": str(records), **extra_env})
        assert done.returncode == 0, f"{cmd!r} failed: {done.stderr}"
    calls = [json.loads((records / name).read_text()) for name in sorted(os.listdir(records), key=int)]
    return [c for c in calls if c["argv"][:1] == ["start"]]


def _expected_env(config: dict[str, Any]) -> dict[str, str]:
    # RAY_AUTH_MODE: Ray 2.60 turns token authentication on by default only for local clusters
    return {"AWS_DEFAULT_REGION": config["provider"]["region"], "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token"}


def test_head_ray_start_gets_the_job_environment(node_home: Path):
    config = _load()
    (call,) = _start_calls(node_home, config["head_start_ray_commands"], {})
    assert "--head" in call["argv"] and "--dashboard-host=127.0.0.1" in call["argv"]
    assert "--disable-usage-stats" in call["argv"]
    env = call["env"]
    for key, value in _expected_env(config).items():
        assert env.get(key) == value, f"{key}: expected {value!r}, got {env.get(key)!r}"
    assert env["DFMVR_DATA_URL"].startswith("s3://"), env["DFMVR_DATA_URL"]
    assert re.fullmatch(r"https?://\S+", env["MLFLOW_TRACKING_URI"]), env["MLFLOW_TRACKING_URI"]
    # the venv's ray (and so its python for `ray job submit -- python ...`) comes first
    assert env["PATH"].split(":")[0] == str(node_home / "venv" / "bin")


def test_worker_ray_start_joins_the_head_with_the_same_environment(node_home: Path):
    config = _load()
    (call,) = _start_calls(node_home, config["worker_start_ray_commands"], {"RAY_HEAD_IP": "10.0.3.7"})
    assert "--address=10.0.3.7:6379" in call["argv"]
    assert "--head" not in call["argv"]
    env = call["env"]
    for key, value in _expected_env(config).items():
        assert env.get(key) == value
    assert env["DFMVR_DATA_URL"].startswith("s3://") and env["MLFLOW_TRACKING_URI"]
    assert env["NCCL_SOCKET_IFNAME"]


def test_interactive_shells_source_the_environment_file(node_home: Path):
    done = _run_node_command("echo \"url=$DFMVR_DATA_URL\"", node_home)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^url=s3://\S+$", done.stdout, re.MULTILINE), done.stdout


# ---------------------------------------------------------------------------------------------
# The AWS provider's bootstrap and node launch, against moto on loopback


@pytest.fixture(scope="module")
def moto_aws(tmp_path_factory: pytest.TempPathFactory):
    from moto.server import ThreadedMotoServer
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.aws import utils as aws_utils

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    home = tmp_path_factory.mktemp("launcher-home")
    caches = (aws_utils.resource_cache, aws_utils.client_cache, aws_config._get_subnets_or_die)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_CONFIG_FILE": str(home / "absent-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "absent-credentials"),
            "HOME": str(home),  # Ray writes the cluster's SSH key to ~/.ssh
        }.items():
            mp.setenv(key, value)
        mp.delenv("AWS_PROFILE", raising=False)
        for cache in caches:
            cache.cache_clear()
        import boto3

        iam = boto3.client("iam", region_name="us-east-1")
        for spec in _load()["available_node_types"].values():
            name = spec["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
            iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": []}))
            iam.create_instance_profile(InstanceProfileName=name)
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
        try:
            yield boto3.client("ec2", region_name=_load()["provider"]["region"])
        finally:
            for cache in caches:
                cache.cache_clear()
            server.stop()


@pytest.fixture(scope="module")
def cluster_group(moto_aws) -> str:
    return _make_cluster_group(moto_aws, SSH_CIDR)


@pytest.fixture(scope="module")
def resolved(moto_aws, cluster_group) -> dict[str, Any]:
    """``cluster.yaml`` as ``ray up`` resolves it against (moto's) AWS. Slow (10 to 20 s here): moto
    pages through its whole instance-type catalogue for Ray's resource detection."""
    from ray.autoscaler._private.commands import _bootstrap_config

    return _bootstrap_config(_load_for_moto(cluster_group), no_config_cache=True)


@pytest.mark.integration
def test_aws_bootstrap_and_launch_on_moto(moto_aws, resolved, cluster_group):
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_NODE_NAME, TAG_RAY_USER_NODE_TYPE

    types = resolved["available_node_types"]
    head_type = resolved["head_node_type"]
    # resources detected from the real instance-type catalogue (moto ships AWS's)
    assert types[head_type]["resources"].get("GPU", 0) == 0 and types[head_type]["resources"]["CPU"] >= 4
    for name in _gpu_worker_types(resolved):
        assert types[name]["resources"]["GPU"] >= 1, types[name]["resources"]
    for spec in types.values():
        assert spec["node_config"]["KeyName"] and spec["node_config"]["SecurityGroupIds"] == [cluster_group]
    # Ray made no group of its own and left ours as it was: from outside, only SSH from our CIDR
    groups = moto_aws.describe_security_groups()["SecurityGroups"]
    assert not [g["GroupName"] for g in groups if g["GroupName"].startswith("ray-autoscaler")]
    (ours,) = [g for g in groups if g["GroupId"] == cluster_group]
    outside = [(p.get("FromPort"), p.get("ToPort"), r["CidrIp"]) for p in ours["IpPermissions"]
               for r in p.get("IpRanges", [])]
    assert outside == [(22, 22, SSH_CIDR)], ours["IpPermissions"]

    provider = AWSNodeProvider(resolved["provider"], resolved["cluster_name"])
    for name, spec in types.items():
        kind = "head" if name == head_type else "worker"
        provider.create_node(copy.deepcopy(spec["node_config"]),
                             {TAG_RAY_NODE_KIND: kind, TAG_RAY_USER_NODE_TYPE: name, TAG_RAY_NODE_NAME: f"t-{name}"}, 1)
    launched = {}
    for reservation in moto_aws.describe_instances()["Reservations"]:
        for inst in reservation["Instances"]:
            tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
            launched[tags[TAG_RAY_USER_NODE_TYPE]] = inst
    assert set(launched) == set(types)
    for name, inst in launched.items():
        node = types[name]["node_config"]
        assert [g["GroupId"] for g in inst["SecurityGroups"]] == [cluster_group]
        assert inst["InstanceType"] == node["InstanceType"]
        assert inst["IamInstanceProfile"]["Arn"] == node["IamInstanceProfile"]["Arn"]


@pytest.mark.integration
def test_misspelt_ec2_parameter_is_refused_at_launch(resolved):
    from botocore.exceptions import ParamValidationError
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    worker = next(iter(_gpu_worker_types(resolved)))
    node = copy.deepcopy(resolved["available_node_types"][worker]["node_config"])
    node["InstanceTyp"] = node.pop("InstanceType")
    provider = AWSNodeProvider(resolved["provider"], resolved["cluster_name"])
    with pytest.raises(ParamValidationError, match="InstanceTyp"):
        provider.create_node(node, {}, 1)
