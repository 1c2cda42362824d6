"""Run the whole pipeline: prepare, train, seeds, masks, DeepLab, segment, evaluate.

    python jobs/pipeline.py                                   # synthetic data, local Ray, ./runs/default
    python jobs/pipeline.py --data s3://b/VOCdevkit/VOC2012 --format voc --split train_aug,val \
        --out s3://b/voc-acr --use-gpu
    python jobs/pipeline.py --method mct-v2 --config sweeps/best.yaml --out runs/mct
    python jobs/pipeline.py --config psa.yaml --until eval_masks   # psa.yaml: "masks: {method: psa}"

Each stage writes under --out/<stage>/ and is skipped when already committed, so rerunning the
same command after a crash carries on. Stage settings go in the YAML under the stage's name
(prepare:, train:, seeds:, affinity_labels:, affinity:, masks:, deeplab:, segment:), and the protocol of
every evaluation under evaluate:. With masks: {method: psa} (or psa+crf) the pipeline trains AffinityNet
(affinity_labels, affinity) before the masks; --affinity-seeds unrefined trains it on seeds extracted without
refinement (ACR's recipe). configs/ holds the papers' recipes (README: "Reproducing the papers").
"""
import _cli

from ray_wsss.stages import pipeline

if __name__ == "__main__":
    cfg = _cli.parse_config(pipeline.PipelineConfig, __doc__)
    _cli.init_ray()
    _cli.print_summary(pipeline.run(cfg))
