"""Shared fixtures: a local Ray instance and a real S3-compatible server (moto) on loopback."""
from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = REPO.parent / "shared" / "data" / "coco-mini"
sys.path.insert(0, str(REPO / "tests"))  # plain helper modules such as fixtures_data


def pytest_configure(config):
    import torch

    # Ray workers share the machine's 2 cores with this process; one thread here avoids thrashing.
    torch.set_num_threads(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's server on loopback, as Ray's and s3fs's own tests use; the client is never mocked."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in
             ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    # Standard AWS variables, so code paths that take credentials from the environment are tested.
    os.environ.update({
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    })
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture()
def s3_bucket(s3_endpoint):
    """A fresh bucket per test; returns its s3:// URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


def start_local_ray(attempts: int = 3, **kwargs):
    """ray.init, retried: on a loaded 2-core machine a raylet can miss Ray's fixed 30 s start-up window."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            return ray.init(**kwargs)
        except Exception:
            ray.shutdown()
            if attempt == attempts:
                raise


def ensure_local_ray():
    """Start the tests' local Ray (2 CPUs, no dashboard) unless this process is connected to a Ray already."""
    import ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False,
                        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    return ray


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Restart the local Ray for a test that uses ``ray_local`` if an earlier test shut it down.

    The fixture is session-scoped (one start per session), so its body runs once; a test with its
    own cluster (tests/test_pipeline_multinode.py) shuts the local Ray down. This runs before any
    fixture of ``item`` is set up, module-scoped ones that depend on ``ray_local`` included.
    """
    if "ray_local" in item.fixturenames and "ray" in sys.modules:
        import ray

        if not ray.is_initialized():
            ensure_local_ray()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (starting Ray costs seconds).

    Restarted by :func:`pytest_runtest_setup` for later tests if a test shut it down.
    """
    yield ensure_local_ray()
    import ray

    ray.shutdown()
