"""cluster.yaml, deploy/kuberay-rayjob.yaml, the Dockerfile and ray_wsss.harness.cluster agree and pass Ray's checks.

No cluster or Docker engine is needed: cluster.yaml goes through the autoscaler's own
prepare/validate code (the one `ray up` runs), the rest is parsed statically.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

from ray_wsss.harness import cluster

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
RAY_VERSION = next(re.fullmatch(r"ray\[.*\]==(\S+)", d).group(1)
                   for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
PY_TAG = "py" + re.search(r">=\s*3\.(\d+)", PYPROJECT["project"]["requires-python"]).expand(r"3\1")
# GPUs and vCPUs of the instance types cluster.yaml may use; add a row when you change a type.
INSTANCE_GPUS = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8,
                 "g6.12xlarge": 4, "p4d.24xlarge": 8}
INSTANCE_VCPUS = {"c6i.4xlarge": 16, "c6i.8xlarge": 32, "c7i.4xlarge": 16, "c7i.8xlarge": 32}
INSTALLERS = re.compile(r"\b(pip3?|conda|mamba|uv|apt(-get)?|yum|dnf|curl|wget|git)\b")
POOL_NAMES = {cluster.CPU_POOL_RESOURCE, cluster.GPU_POOL_RESOURCE, cluster.POOLS_MARKER_RESOURCE}


def _yaml(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.fixture(scope="module")
def raw_config() -> dict:
    return _yaml("cluster.yaml")


@pytest.fixture(scope="module")
def autoscaling(raw_config) -> AutoscalingConfig:
    """The config as autoscaler v2 (the `ray up` default in Ray 2.60) reads it: defaults merged, validated."""
    return AutoscalingConfig(copy.deepcopy(raw_config), skip_content_hash=True)


def _node_types(config: dict) -> dict:
    return config["available_node_types"]


def _worker_types(config: dict) -> dict:
    return {k: v for k, v in _node_types(config).items() if k != config["head_node_type"]}


def _custom(resources: dict) -> dict:
    return {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}


# ---------------------------------------------------------------- cluster.yaml

def test_cluster_yaml_passes_ray_schema(raw_config):
    validate_config(prepare_config(copy.deepcopy(raw_config)))


def test_ray_schema_check_rejects_a_typo(raw_config):
    """The validator above is live: a misspelt node-type key fails it."""
    broken = copy.deepcopy(raw_config)
    broken["available_node_types"]["cpu_crf"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(broken))


def test_custom_resources_are_the_library_constants(raw_config):
    for name, node_type in _node_types(raw_config).items():
        unknown = set(_custom(node_type["resources"])) - POOL_NAMES
        assert not unknown, f"{name} advertises {unknown}, not defined in ray_wsss/cluster.py"
    workers = _worker_types(raw_config)
    for pool in (cluster.CPU_POOL_RESOURCE, cluster.GPU_POOL_RESOURCE):
        assert any(t["resources"].get(pool) and t["max_workers"] > 0 for t in workers.values()), pool


def test_head_takes_no_work_and_marks_the_pools(autoscaling):
    head = autoscaling.get_head_node_type()
    resources = autoscaling.get_node_resources(head)
    assert resources["CPU"] == 0
    assert resources[cluster.POOLS_MARKER_RESOURCE] == 1
    assert not set(_custom(resources)) & {cluster.CPU_POOL_RESOURCE, cluster.GPU_POOL_RESOURCE}
    for name in _worker_types(autoscaling.get_raw_config_mutable()):
        assert cluster.POOLS_MARKER_RESOURCE not in autoscaling.get_node_resources(name), name


def test_pool_sizes_match_the_instances(raw_config):
    """gpu_pool = GPUs per node, crf_pool = vCPUs per node; each pool on its own node kind only."""
    for name, node_type in _worker_types(raw_config).items():
        instance = node_type["node_config"]["InstanceType"]
        custom = _custom(node_type["resources"])
        if cluster.GPU_POOL_RESOURCE in custom:
            assert instance in INSTANCE_GPUS, f"{name}: add {instance} to INSTANCE_GPUS"
            assert custom == {cluster.GPU_POOL_RESOURCE: INSTANCE_GPUS[instance]}, name
        else:
            assert instance in INSTANCE_VCPUS, f"{name}: {instance} is not a known CPU instance type"
            assert custom == {cluster.CPU_POOL_RESOURCE: INSTANCE_VCPUS[instance]}, name


def test_images_per_node_type(autoscaling):
    """CPU image on the head and CRF nodes, GPU image on GPU nodes; one repository, the project's version."""
    raw = autoscaling.get_raw_config_mutable()
    version = PYPROJECT["project"]["version"]
    repos = set()
    for name in _node_types(raw):
        image = autoscaling.get_docker_config(name)["image"]
        repo, _, tag = image.rpartition(":")
        repos.add(repo)
        gpu = cluster.GPU_POOL_RESOURCE in autoscaling.get_node_resources(name)
        assert tag == f"{version}-{'gpu' if gpu else 'cpu'}", f"{name}: {image}"
    assert len(repos) == 1 and not repos & {"rayproject/ray"}, repos


def test_spot_with_an_on_demand_gpu_fallback(autoscaling):
    raw = autoscaling.get_raw_config_mutable()
    types = autoscaling.get_node_type_configs()
    gpu = {n: t for n, t in _worker_types(raw).items() if cluster.GPU_POOL_RESOURCE in t["resources"]}
    spot = {n for n, t in gpu.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"}
    on_demand = set(gpu) - spot
    assert spot and on_demand
    assert max(types[n].priority for n in on_demand) < min(types[n].priority for n in spot)
    crf = [t for t in _worker_types(raw).values() if cluster.CPU_POOL_RESOURCE in t["resources"]]
    assert all(t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in crf)


def test_nothing_is_installed_at_run_time(autoscaling):
    """After Ray's AWS defaults are merged in (they add `pip install`s), no node runs an installer."""
    raw = autoscaling.get_raw_config_mutable()
    commands = autoscaling.get_head_setup_commands() + autoscaling.get_head_start_ray_commands() \
        + autoscaling.get_worker_start_ray_commands()
    for name in _node_types(raw):
        commands += autoscaling.get_worker_setup_commands(name) + autoscaling.get_initialization_commands(name)
    assert not [c for c in commands if INSTALLERS.search(c)]


def test_token_auth_on_every_node(raw_config):
    assert raw_config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in raw_config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key


# ---------------------------------------------------------------- network exposure

def _security_group_script():
    spec = importlib.util.spec_from_file_location("aws_security_group", REPO / "scripts" / "aws_security_group.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SG_SCRIPT = _security_group_script()
MY_CIDR = "198.18.7.21/32"  # stands for the user's own network in these tests


def _with_cidr(raw_config: dict, cidr: str) -> dict:
    config = copy.deepcopy(raw_config)
    config["provider"]["security_group"]["IpPermissions"][0]["IpRanges"][0]["CidrIp"] = cidr
    return config


def test_ssh_only_from_a_cidr_the_user_sets(raw_config):
    group = raw_config["provider"]["security_group"]
    assert group["GroupName"]
    (rule,) = group["IpPermissions"]
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
    # The shipped CIDR is a placeholder that reaches nobody, and the script refuses it until it is set.
    problems = SG_SCRIPT.ingress_problems(group["IpPermissions"])
    assert len(problems) == 1 and "placeholder" in problems[0]
    group = _with_cidr(raw_config, MY_CIDR)["provider"]["security_group"]
    assert SG_SCRIPT.ingress_problems(group["IpPermissions"]) == []
    for everyone in ("0.0.0.0/0", "::/0"):
        assert "whole internet" in SG_SCRIPT.ingress_problems([{**rule, "IpRanges": [{"CidrIp": everyone}]}])[0]


def test_every_node_uses_the_prepared_group_so_ray_adds_no_rule(raw_config):
    """With SecurityGroupIds on every node type, Ray's AWS bootstrap creates and changes no group
    (it returns before calling AWS at all)."""
    ids = {json.dumps(t["node_config"].get("SecurityGroupIds")) for t in _node_types(raw_config).values()}
    assert len(ids) == 1 and ids != {"null"}
    from ray.autoscaler._private.aws.config import _configure_security_group

    config = prepare_config(copy.deepcopy(raw_config))
    assert _configure_security_group(copy.deepcopy(config)) == config


@pytest.fixture()
def aws(monkeypatch):
    """moto's in-process AWS (a default VPC with subnets in every zone); never the loopback S3 server."""
    from moto import mock_aws

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        import boto3

        yield boto3.client("ec2", region_name="us-west-2")


def _ingress(ec2, group_id: str) -> list[dict]:
    return ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]["IpPermissions"]


def test_the_script_group_then_ray_bootstrap_leave_ssh_to_the_cidr(raw_config, aws):
    from ray.autoscaler._private.aws.config import _configure_security_group, _configure_subnet

    config = _with_cidr(raw_config, MY_CIDR)
    group_id = SG_SCRIPT.ensure_group(config, ec2=aws)
    assert SG_SCRIPT.ensure_group(config, ec2=aws) == group_id  # found again, not created twice
    for node_type in _node_types(config).values():
        node_type["node_config"]["SecurityGroupIds"] = [group_id]
    bootstrapped = _configure_security_group(_configure_subnet(prepare_config(config)))
    assert {tuple(t["node_config"]["SecurityGroupIds"]) for t in _node_types(bootstrapped).values()} == {(group_id,)}
    rules = _ingress(aws, group_id)
    open_to = {(r.get("FromPort"), ip["CidrIp"]) for r in rules for ip in r["IpRanges"]}
    assert open_to == {(22, MY_CIDR)}
    (nodes,) = [r for r in rules if r["IpProtocol"] == "-1"]
    assert [pair["GroupId"] for pair in nodes["UserIdGroupPairs"]] == [group_id]  # node to node only


def test_ray_bootstrap_alone_would_open_ssh_to_everyone(raw_config, aws):
    """Why the script exists: a group Ray 2.60 creates gets SSH from 0.0.0.0/0 next to the configured
    CIDR. If this starts failing, Ray has fixed it and the script may go."""
    from ray.autoscaler._private.aws.config import _configure_security_group, _configure_subnet

    config = _with_cidr(raw_config, MY_CIDR)
    for node_type in _node_types(config).values():
        node_type["node_config"].pop("SecurityGroupIds")
    bootstrapped = _configure_security_group(_configure_subnet(prepare_config(config)))
    group_id = _node_types(bootstrapped)["head"]["node_config"]["SecurityGroupIds"][0]
    opened = {(r.get("FromPort"), ip["CidrIp"]) for r in _ingress(aws, group_id) for ip in r["IpRanges"]}
    assert (22, "0.0.0.0/0") in opened


def test_the_script_refuses_an_open_config_or_group(raw_config, aws):
    with pytest.raises(SG_SCRIPT.SecurityGroupError, match="placeholder"):
        SG_SCRIPT.ensure_group(raw_config, ec2=aws)
    with pytest.raises(SG_SCRIPT.SecurityGroupError, match="whole internet"):
        SG_SCRIPT.ensure_group(_with_cidr(raw_config, "0.0.0.0/0"), ec2=aws)
    vpc = aws.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    name = raw_config["provider"]["security_group"]["GroupName"]
    existing = aws.create_security_group(GroupName=name, VpcId=vpc, Description="made by hand")["GroupId"]
    aws.authorize_security_group_ingress(GroupId=existing, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    with pytest.raises(SG_SCRIPT.SecurityGroupError, match=f"{existing}.*already exists and is open"):
        SG_SCRIPT.ensure_group(_with_cidr(raw_config, MY_CIDR), ec2=aws)


def test_dashboard_listens_on_the_head_only(raw_config):
    """Reached through `ray dashboard cluster.yaml` (SSH -L to the head's localhost), never bound to 0.0.0.0."""
    start = " ".join(raw_config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in json.dumps(raw_config)
    assert "ray dashboard cluster.yaml" in (REPO / "README.md").read_text()


def test_rayjob_dashboard_stays_inside_the_cluster(rayjob):
    """KubeRay's operator polls the dashboard through the head Service, so it must listen on the pod
    network there; it is never exposed beyond the cluster (no LoadBalancer, NodePort or Ingress)."""
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}


# ---------------------------------------------------------------- the local Ray token file

TOKEN_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """A private HOME, so the tests never touch the user's own ~/.ray/auth_token."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in TOKEN_ENV:
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_token_is_private_and_an_existing_one_kept(home):
    path = cluster.private_auth_token(create=True)
    assert path == home / ".ray" / "auth_token"
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    token = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)  # what Ray's own generator writes
    assert cluster.private_auth_token(create=True).read_text() == token


def test_a_readable_token_is_tightened(home):
    path = home / ".ray" / "auth_token"
    path.parent.mkdir()
    path.write_text("0" * 64)
    path.chmod(0o644)
    assert cluster.private_auth_token(create=False) == path
    assert _mode(path) == 0o600 and path.read_text() == "0" * 64


def test_no_token_file_is_made_when_ray_needs_none(home, monkeypatch):
    assert cluster.private_auth_token(create=False) is None  # joining a cluster: never invent a token
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert cluster.private_auth_token(create=True) is None
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "f" * 64)
    assert cluster.private_auth_token(create=True) is None
    assert not (home / ".ray").exists()


def test_a_job_starting_local_ray_leaves_the_token_private(home):
    """The jobs' init_ray() on a fresh HOME under umask 022: Ray 2.60 itself writes the token 0644."""
    code = ("import sys; sys.path.insert(0, 'jobs'); import _cli, ray; _cli.init_ray(); "
            "assert ray.cluster_resources()['CPU'] >= 1; ray.shutdown()")
    env = {k: v for k, v in os.environ.items() if k not in TOKEN_ENV}
    with tempfile.TemporaryDirectory(prefix="rt", dir="/tmp") as ray_tmp:  # short: Ray's socket paths
        env.update(HOME=str(home), RAY_TMPDIR=ray_tmp, PYTHONPATH=str(REPO))  # RAY_TMPDIR: join no other Ray
        subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=300,
                       preexec_fn=lambda: os.umask(0o022))
    path = home / ".ray" / "auth_token"
    assert _mode(path) == 0o600 and re.fullmatch(r"[0-9a-f]{64}", path.read_text())


# ---------------------------------------------------------------- pool_resources

def test_pool_resources_empty_without_the_pool():
    laptop = {"CPU": 8.0, "GPU": 1.0, "memory": 1e10}
    assert cluster.pool_resources("cpu", 1, laptop) == {}
    assert cluster.pool_resources(cluster.GPU_POOL_RESOURCE, 1, laptop) == {}


def test_pool_resources_when_advertised_or_scaled_to_zero():
    cpu_pool = cluster.CPU_POOL_RESOURCE
    assert cluster.pool_resources("cpu", 2, {"CPU": 16, cpu_pool: 16}) == {cpu_pool: 2.0}
    gpu_pool = cluster.GPU_POOL_RESOURCE
    assert cluster.pool_resources(gpu_pool, 1, {gpu_pool: 4}) == {gpu_pool: 1.0}
    # Only the head is up: the marker says the pools exist, so asking for one scales it up.
    head_only = {"CPU": 0.0, cluster.POOLS_MARKER_RESOURCE: 1.0}
    assert cluster.pool_resources("gpu", 0.5, head_only) == {cluster.GPU_POOL_RESOURCE: 0.5}


def test_pool_resources_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown node pool 'tpu'"):
        cluster.pool_resources("tpu", 1, {})
    with pytest.raises(ValueError, match="positive"):
        cluster.pool_resources("cpu", 0, {cluster.CPU_POOL_RESOURCE: 4})


def test_pool_resources_reads_the_live_cluster(ray_local):
    assert "CPU" in ray_local.cluster_resources()
    assert cluster.pool_resources("cpu", 1) == {}


# ---------------------------------------------------------------- KubeRay RayJob

@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _yaml("deploy/kuberay-rayjob.yaml")


def _start_resources(group: dict) -> dict:
    """KubeRay's rayStartParams form '"{\\"name\\": n}"' -> {name: n}."""
    value = group["rayStartParams"].get("resources")
    return json.loads(value.strip('"').replace('\\"', '"')) if value else {}


def _container(group: dict) -> dict:
    (container,) = group["template"]["spec"]["containers"]
    return container


def test_rayjob_shape(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["rayVersion"] == RAY_VERSION


def test_rayjob_pools_match_library_and_pod_sizes(rayjob):
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    head = cluster_spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert _start_resources(head) == {cluster.POOLS_MARKER_RESOURCE: 1}
    pools = {}
    for group in cluster_spec["workerGroupSpecs"]:
        limits = _container(group)["resources"]["limits"]
        resources = _start_resources(group)
        assert len(resources) == 1 and set(resources) <= POOL_NAMES, group["groupName"]
        if cluster.GPU_POOL_RESOURCE in resources:
            assert resources[cluster.GPU_POOL_RESOURCE] == int(limits["nvidia.com/gpu"]), group["groupName"]
        else:
            assert resources == {cluster.CPU_POOL_RESOURCE: int(limits["cpu"])}, group["groupName"]
            assert "nvidia.com/gpu" not in limits
        pools.update(resources)
    assert set(pools) == {cluster.CPU_POOL_RESOURCE, cluster.GPU_POOL_RESOURCE}


def test_rayjob_uses_the_cluster_yaml_images_and_s3_secret(rayjob, autoscaling):
    head_image = autoscaling.get_docker_config(autoscaling.get_head_node_type())["image"]
    gpu_image = autoscaling.get_raw_config_mutable()["docker"]["image"]
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    for group in groups:
        container = _container(group)
        expected = gpu_image if cluster.GPU_POOL_RESOURCE in _start_resources(group) else head_image
        assert container["image"] == expected
        secrets = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secrets


# ---------------------------------------------------------------- Dockerfile

def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, args = current.strip().partition(" ")
        logical.append((keyword.upper(), " ".join(args.split())))
        current = ""
    return logical


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _instructions((REPO / "Dockerfile").read_text())


def _stages(dockerfile: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, its FROM first (the global ARGs before the first are dropped)."""
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in dockerfile:
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def test_dockerfile_base_is_the_pinned_ray(dockerfile):
    first_from = next(i for i, (k, _) in enumerate(dockerfile) if k == "FROM")
    assert ("ARG", "RAY_IMAGE_VARIANT=gpu") in dockerfile[:first_from]
    base = f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-${{RAY_IMAGE_VARIANT}}"
    build, runtime = _stages(dockerfile)
    assert build[0][1] == f"{base} AS build" and runtime[0][1] == base  # the wheels fit the runtime's Python


def test_dockerfile_keeps_the_compiler_in_the_build_stage(dockerfile):
    build, runtime = _stages(dockerfile)
    compiler = re.compile(r"\b(build-essential|gcc|g\+\+|clang|apt-get)\b")
    assert any(compiler.search(a) for k, a in build if k == "RUN")
    assert not [a for _, a in runtime if compiler.search(a)]
    (wheel,) = [a for k, a in build if k == "RUN" and "pip wheel" in a]
    compiled = re.search(r"grep -E '\^\((.*?)\)", wheel).group(1).split("|")
    names = {re.split(r"[=<>\[ ]", d)[0] for d in PYPROJECT["project"]["dependencies"]}
    assert "pydensecrf2" in compiled and set(compiled) <= names
    (install,) = [a for k, a in runtime if k == "RUN" and "-r /tmp/build/requirements.txt" in a]
    assert "--mount=type=bind,from=build" in install  # mounted: no layer keeps the wheels
    assert f"--only-binary {','.join(compiled)}" in install and "--find-links /tmp/build/wheels" in install


def test_dockerfile_installs_only_at_build_time(dockerfile):
    keywords = [k for k, _ in dockerfile]
    assert not {"ENTRYPOINT", "CMD"} & set(keywords), "keep the base image's; Ray's launchers run `ray start`"
    for stage in _stages(dockerfile):
        user = "ray"  # the base image's user; USER does not carry over between stages
        for keyword, args in stage:
            user = args if keyword == "USER" else user
            if "apt-get" in args:
                assert keyword == "RUN" and user == "root", args
            if "pip install" in args:
                assert not re.search(r"--force-reinstall|--upgrade|\s-U\b", args), args
        assert user == "ray"


def test_dockerfile_layers_deps_before_code(dockerfile):
    runtime = _stages(dockerfile)[-1]

    def index(pred) -> int:
        return next(i for i, (k, a) in enumerate(runtime) if pred(k, a))

    pyproject = index(lambda k, a: k == "COPY" and a.split()[-2] == "pyproject.toml")
    deps = index(lambda k, a: k == "RUN" and "pip install" in a and "-r /tmp/build/requirements.txt" in a)
    code = index(lambda k, a: k == "COPY" and "ray_wsss" in a)
    project = index(lambda k, a: k == "RUN" and "pip install" in a and a.rstrip().split("&&")[0].strip().endswith("."))
    assert pyproject < deps < code < project
    assert "--no-deps" in runtime[project][1]


def test_dockerfile_requirements_are_pyprojects(dockerfile):
    """Run the Dockerfile's own requirements extraction against this checkout."""
    run = next(a for k, a in dockerfile if k == "RUN" and "tomllib" in a)
    code = re.search(r'python -c "(.*?)"', run).group(1)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == PYPROJECT["project"]["dependencies"]


def test_docker_context_has_the_code_and_not_the_junk(dockerfile):
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "runs", "**/__pycache__"} <= ignored
    for keyword, args in dockerfile:
        if keyword == "COPY":
            sources = [s for s in shlex.split(args) if not s.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), source
                assert source not in ignored, f"{source} is copied but .dockerignore drops it"


def test_rayjob_entrypoint_runs_the_image_copy_of_jobs(dockerfile, rayjob):
    """The RayJob uploads no code, so its script must be where the Dockerfile puts jobs/."""
    app_dir = next(a.split("=", 1)[1] for k, a in dockerfile if k == "ARG" and a.startswith("APP_DIR="))
    assert ("WORKDIR", "${APP_DIR}") in dockerfile and ("COPY", "--chown=ray jobs ./jobs") in dockerfile
    script = shlex.split(rayjob["spec"]["entrypoint"])[1]
    assert script.startswith(f"{app_dir}/jobs/") and script.endswith(".py")
