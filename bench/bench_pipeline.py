"""Where the README's main command spends its time: `python jobs/pipeline.py`, stage by stage.

    python bench/bench_pipeline.py [--out runs/bench-pipeline] [--config pipeline.yaml] [--num-cpus N]

Runs the same pipeline as ``jobs/pipeline.py`` (same defaults, same local Ray) and prints, per stage: wall
seconds, CPU seconds of the whole process tree (driver, Ray workers and actors, Ray's own processes),
the load average at its start and end; then, for both trainings, each epoch's split into waiting for
input, training steps and held-out scoring (from ``metrics.jsonl``). The machine is shared: CPU seconds
are the figure that holds up under other load; wall seconds are what a user waits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _measure

from ray_wsss.core import config as config_lib
from ray_wsss.core import storage
from ray_wsss.stages import pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-pipeline")
    parser.add_argument("--config", help="pipeline YAML (as jobs/pipeline.py --config)")
    parser.add_argument("--num-cpus", type=int, help="Ray's CPUs (default: the machine's, as the job)")
    args = parser.parse_args()

    import logging

    import ray

    from ray_wsss.harness.cluster import LOCAL_RUNTIME_ENV

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_lib.load(pipeline.PipelineConfig, args.config, {"out": args.out})
    cpu = _measure.CpuMonitor()
    started = time.time()
    with _measure.measured(cpu) as startup:
        ray.init(num_cpus=args.num_cpus, log_to_driver=True, runtime_env=LOCAL_RUNTIME_ENV)
    rows = [{"stage": "ray.init", **startup}]
    for name, uri, thunk in pipeline.stage_runners(cfg):
        print(f"[bench] stage {name} -> {uri}", flush=True)
        with _measure.measured(cpu) as m:
            result = thunk()
        rows.append({"stage": name, "skipped": bool(result.get("skipped")),
                     "metrics": pipeline.headline_metrics(name, result), **m})
        print(f"[bench] {name}: {json.dumps(rows[-1], default=str)}", flush=True)
    total = time.time() - started
    ray.shutdown()
    cpu.stop()

    print(f"\n{'stage':<14}{'wall s':>9}{'CPU s':>9}{'driver':>8}{'workers':>9}{'ray sys':>9}  load 1-min start/end")
    for row in rows:
        cpu = row["cpu_s"]
        print(f"{row['stage']:<14}{row['wall_s']:>9.1f}{cpu['total']:>9.1f}{cpu['driver']:>8.1f}"
              f"{cpu['ray workers']:>9.1f}{cpu['ray system']:>9.1f}  {row['load_before'][0]}/{row['load_after'][0]}")
    print(f"{'total':<14}{total:>9.1f}{sum(r['cpu_s']['total'] for r in rows):>9.1f}")
    for stage in ("train", "deeplab"):
        metrics_uri = storage.join(cfg.uri(stage), "metrics.jsonl")
        if not storage.exists(metrics_uri):
            continue
        history = [json.loads(line) for line in storage.read_bytes(metrics_uri).decode().splitlines() if line]
        keys = ("data_wait_seconds", "step_seconds", "validation_seconds", "epoch_seconds", "epoch_cpu_seconds")
        print(f"\n{stage} epochs: " + " ".join(f"{k}" for k in keys))
        for row in history:
            print(f"  {row['epoch']:>3} " + " ".join(f"{row.get(k, float('nan')):>8.1f}" for k in keys))
    print("\nworker CPU seconds by what the processes ran (Ray's process titles):")
    for row in rows:
        top = list(row["cpu_s"]["workers_by_name"].items())[:5]
        print(f"  {row['stage']:<14}" + ", ".join(f"{k} {v}" for k, v in top))
    for row in rows[1:]:
        print(f"{row['stage']}: {row['metrics']}")
    with open(os.path.join(args.out, "bench_pipeline.json"), "w") as f:
        json.dump({"rows": rows, "total_wall_s": total}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
