"""Which node pool a piece of work should run on, by custom resource.

``cluster.yaml`` (and ``deploy/kuberay-rayjob.yaml``) give each worker type a custom resource:
CPU nodes advertise ``crf_pool`` (one unit per vCPU) and GPU nodes ``gpu_pool`` (one unit per GPU);
the head advertises ``wsss_pools`` to say "this cluster has the pools, even while they are scaled
to zero". A stage asks for a pool with :func:`pool_resources`, e.g. the dense CRF::

    ds.map_batches(RefineMasks, num_cpus=1, resources=pool_resources("cpu", 1), ...)

On a laptop or a plain ``ray start`` cluster none of these resources exist and the helper returns
``{}``, so the same job runs everywhere.

Why custom resources and not node labels: the autoscaler launches the node type whose resources
cover the pending demand, so ``{"crf_pool": 1}`` both places a task and scales the CPU pool from
zero, with autoscaler v1 and v2 alike; and Ray Data's ``map_batches(resources=...)``, Ray Train's
``ScalingConfig(resources_per_worker=...)`` and ``@ray.remote(resources=...)`` take them directly.
Ray 2.60 also accepts ``label_selector`` in ``Dataset.map_batches`` and ``ScalingConfig``, but only
autoscaler v2 scales on label demand (v1's resource-demand scheduler ignores labels), and labels are
not visible in ``ray.cluster_resources()``, which is what makes the laptop fallback a one-liner.

GPU work needs no pool: asking for a GPU already lands on a GPU node. ``gpu_pool`` is for work that
must share a GPU node without holding a GPU.
"""
from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

CPU_POOL_RESOURCE = "crf_pool"
GPU_POOL_RESOURCE = "gpu_pool"
POOLS_MARKER_RESOURCE = "wsss_pools"
POOLS = {"cpu": CPU_POOL_RESOURCE, "gpu": GPU_POOL_RESOURCE}


def pool_resource_name(pool: str) -> str:
    """``"cpu"``/``"gpu"`` (or the resource name itself) -> the custom resource name."""
    if pool in POOLS:
        return POOLS[pool]
    if pool in POOLS.values():
        return pool
    raise ValueError(f"unknown node pool {pool!r}; expected one of {sorted(POOLS)} or {sorted(POOLS.values())}")


def pool_resources(pool: str, amount: float = 1.0,
                   cluster_resources: Mapping[str, float] | None = None) -> dict[str, float]:
    """``{resource: amount}`` for ``pool`` if the cluster has that pool, else ``{}``.

    ``cluster_resources`` defaults to ``ray.cluster_resources()`` (needs a connected Ray). A pool
    counts as present when a live node advertises it, or when the head advertises the pools marker:
    an autoscaled pool at zero nodes shows no resource yet, and asking for it is what scales it up.
    """
    name = pool_resource_name(pool)
    if amount <= 0:
        raise ValueError(f"pool amount must be positive, got {amount}")
    if cluster_resources is None:
        import ray

        cluster_resources = ray.cluster_resources()
    if cluster_resources.get(name, 0) > 0 or cluster_resources.get(POOLS_MARKER_RESOURCE, 0) > 0:
        return {name: float(amount)}
    return {}


def model_actor_args(use_gpu: bool) -> dict:
    """Ray remote args for an actor that holds a model: a GPU (on the GPU pool's nodes) or one CPU.

    The pool's size is not set here: it autoscales with the resources the cluster has or gains, up to a
    stage's ``num_actors`` (see ``harness.batch_stage``).
    """
    if use_gpu:
        return {"num_gpus": 1, "resources": pool_resources(GPU_POOL_RESOURCE, 1)}
    return {"num_cpus": 1}


def cpu_pool_actor_args(num_cpus: float) -> dict:
    """Ray remote args for CPU-bound work (the dense CRF): ``num_cpus`` on the CPU pool's nodes when the cluster
    has that pool (so it never takes the CPUs GPU nodes keep for their model actors), plain CPUs otherwise."""
    return {"num_cpus": num_cpus, "resources": pool_resources(CPU_POOL_RESOURCE, num_cpus)}


# runtime_env for a local Ray started by a job or script: see quiet_worker_logging.
LOCAL_RUNTIME_ENV = {"worker_process_setup_hook": "ray_wsss.harness.cluster.quiet_worker_logging"}


def quiet_worker_logging() -> None:
    """Ray worker setup hook for clusters without a dashboard (a plain ``pip install ray[train,data,tune]``).

    Without the dashboard there is no state API, and Train V2's placement-group cleaner warns about
    that every second for the whole run. The cleaner still works from the controller's side.
    """
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def private_auth_token(create: bool) -> Path | None:
    """Keep Ray's token file readable by this user only; with ``create``, write it before Ray does.

    Ray 2.60's ``ray.init()`` starting a local cluster turns token auth on and, when there is no
    token, writes ``~/.ray/auth_token`` with the process umask: 0644 under the usual 022, so any
    local user could read the token and run code on the cluster. With ``create`` (a job about to
    start a local cluster) a missing default token file is written first, 0600 in a 0700 folder,
    holding the same kind of token as Ray's generator (``secrets.token_hex(32)``); Ray then finds it
    and writes nothing. A token file readable by others is made 0600. Returns the file, or None when
    the token comes from ``RAY_AUTH_TOKEN``, auth is disabled, or there is no file.
    """
    env = os.environ
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled" or env.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if create and "RAY_AUTH_TOKEN_PATH" not in env:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # keep the existing token: other clusters and clients use it
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            log.info("wrote a new Ray auth token to %s (readable by you only)", path)
    if not path.is_file():
        return None
    info = path.stat()
    if stat.S_IMODE(info.st_mode) & 0o077 and info.st_uid == os.getuid():
        path.chmod(0o600)
        log.warning("%s was readable by other users (mode %o); it is now 0600", path, stat.S_IMODE(info.st_mode))
    return path
