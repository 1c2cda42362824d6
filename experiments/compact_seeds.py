"""Compact seeds against the original image-resolution float16 ones: bytes, seed mIoU and CRF-mask mIoU.

For each stored form (resolution x encoding) the seeds of one split are made with the seeds stage's own worker
(``extract_seeds.SeedExtractor``), written file by file with the stage's writer (``batch_stage.write_table_file``:
the seeds table's codecs), scored with the evaluation's worker (``evaluate.Scorer``, every threshold of the
default grid, the best reported), and turned into pseudo masks with the masks stage's ``mask_row`` (CRF on, the
form's own best threshold, as the pipeline does) and scored. Everything in this process, one thread, no Ray:
the stages' code without the cluster. "today" is the original contract: image resolution, float16, snappy.

Bytes per class·pixel = the seeds files' bytes / sum over rows of len(classes) x height x width.

Run: nice -n 15 python experiments/compact_seeds.py --data runs/exp/data --checkpoint runs/exp/train
         [--split train] [--scales 1.0] [--forms today,image/uint8,grid/float16,grid/uint8,short-side:32/uint8]
         [--refine | --no-refine] [--out runs/compact_seeds]
Prints one JSON line per form, then a table; writes <out>/compact_seeds.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ray_wsss.core import schema, storage
from ray_wsss.core.errors import RecordError
from ray_wsss.core.metrics import parse_threshold_grid
from ray_wsss.harness import batch_stage, training
from ray_wsss.stages import evaluate, extract_seeds, make_masks

DEFAULT_FORMS = "today,image/uint8,grid/float16,grid/uint8,short-side:32/uint8"


def parse_form(text: str) -> tuple[str, dict]:
    """``today`` or ``<resolution>[:<short side>]/<encoding>`` -> (label, ExtractSeedsConfig fields)."""
    if text == "today":
        return text, {"resolution": "image", "encoding": "float16"}
    resolution, encoding = text.split("/")
    resolution, _, side = resolution.partition(":")
    return text, {"resolution": resolution, "encoding": encoding, "short_side": int(side) if side else None}


def samples_by_file(data: str, split: str) -> dict[str, list[dict]]:
    """The split's samples rows, per samples file (the seeds stage's tasks)."""
    wanted = batch_stage.samples_files(data, None, [split])
    return {name: pq.read_table(uri).to_pylist()
            for name, uri in sorted(batch_stage.committed_files(data, "samples", None).items()) if name in wanted}


def _score(worker: evaluate.Scorer, records: list[dict], label: str) -> None:
    _, failures = worker.process(records)
    if failures:
        raise RuntimeError(f"{label}: {failures[:3]}")


def run_form(label: str, fields: dict, args: argparse.Namespace, samples: dict[str, list[dict]],
             class_names: list[str], out: str) -> dict:
    cfg = extract_seeds.ExtractSeedsConfig(data=args.data, checkpoint=args.checkpoint, out=out,
                                           scales=tuple(args.scales), refine=args.refine, **fields)
    extractor = extract_seeds.SeedExtractor(cfg, training.find_checkpoint(args.checkpoint, None))
    seed_format = cfg.seed_format()
    started = time.process_time()
    seeds: dict[str, list[dict]] = {}
    for name, rows in samples.items():
        seeds[name] = []
        for start in range(0, len(rows), cfg.batch_size):
            made, failed = extractor.process(rows[start:start + cfg.batch_size])
            if failed:
                raise RuntimeError(f"{label}: {failed[:3]}")
            seeds[name] += made
    seed_cpu = time.process_time() - started

    table_bytes = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, rows in seeds.items():
            table = pa.Table.from_pylist(rows, schema=schema.SEEDS)
            # "today": every column snappy, as before the seeds table had its own codecs
            path = batch_stage.write_table_file(tmp, name, table, None, None if label == "today" else "seeds")
            table_bytes += os.path.getsize(path)
    class_pixels = sum(len(r["classes"]) * r["height"] * r["width"] for rows in seeds.values() for r in rows)

    eval_cfg = evaluate.EvaluateConfig(pred=out, data=args.data, kind="seeds")
    thresholds = parse_threshold_grid(eval_cfg.thresholds)
    scorer = evaluate.Scorer(eval_cfg, len(class_names), thresholds, seed_format)
    for name, rows in seeds.items():
        by_id = {s["image_id"]: s for s in samples[name]}
        _score(scorer, [{**r, "samples": by_id[r["image_id"]]} for r in rows], label)
    seed_scores = scorer.acc.best(class_names)

    threshold = float(seed_scores["threshold"])
    labelling = make_masks.MakeMasksConfig(threshold=threshold).labelling(threshold)
    masks = evaluate.Scorer(dataclasses.replace(eval_cfg, kind="masks"), len(class_names), thresholds)
    for name, rows in seeds.items():
        by_id = {r["image_id"]: r for r in rows}
        for sample in samples[name]:
            try:
                mask = make_masks.mask_row({**sample, "seeds": by_id.get(sample["image_id"])}, labelling, seed_format)
            except RecordError as err:
                raise RuntimeError(f"{label}: {err}") from err
            _score(masks, [{**mask, "samples": sample}], label)
    mask_scores = masks.acc.scores(class_names)
    return {"form": label, **{k: v for k, v in fields.items() if v is not None},
            "bytes_per_class_pixel": round(table_bytes / class_pixels, 4), "table_bytes": table_bytes,
            "seed_miou": round(seed_scores["miou"], 4), "seed_threshold": threshold,
            "mask_miou": round(mask_scores["miou"], 4), "images": sum(len(r) for r in seeds.values()),
            "seed_cpu_s": round(seed_cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared sample shards (jobs/prepare_data.py)")
    parser.add_argument("--checkpoint", required=True, help="a classifier's checkpoint or training --out")
    parser.add_argument("--split", default="train")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--refine", action=argparse.BooleanOptionalAction, default=False,
                        help="patch-affinity refinement (default off: the pipeline's from-scratch setting)")
    parser.add_argument("--forms", default=DEFAULT_FORMS)
    parser.add_argument("--out", default="runs/compact_seeds")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the seeds and CRF actors' one CPU
    class_names = storage.read_json(storage.join(args.data, "dataset.json"))["class_names"]
    samples = samples_by_file(args.data, args.split)
    results = []
    for text in args.forms.split(","):
        label, fields = parse_form(text.strip())
        results.append(run_form(label, fields, args, samples, class_names, os.path.join(args.out, "seeds")))
        print(json.dumps(results[-1]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    report = {"args": vars(args), "load_average": os.getloadavg(), "results": results}
    with open(os.path.join(args.out, "compact_seeds.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(format_table(results))


def format_table(results: list[dict]) -> str:
    base = results[0]
    lines = ["| form | bytes / class·pixel | seed mIoU (thr) | Δ seed | CRF-mask mIoU | Δ mask |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['form']} | {r['bytes_per_class_pixel']:.4f} | {r['seed_miou']:.4f} "
                     f"({r['seed_threshold']:.2f}) | {r['seed_miou'] - base['seed_miou']:+.4f} | {r['mask_miou']:.4f}"
                     f" | {r['mask_miou'] - base['mask_miou']:+.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
