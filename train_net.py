#!/usr/bin/env python
"""
Train or evaluate a focal_det model with detectron2's engine.

Examples (see README "Training and evaluation on COCO"):

    # Table 1b's best row on 8 GPUs
    ./train_net.py --config-file configs/table1b/retinanet_R_50_FPN_600_fl_gamma2.0_alpha0.25.yaml \
        --num-gpus 8
    # evaluate a checkpoint
    ./train_net.py --config-file configs/retinanet_R101_FPN_800.yaml --eval-only \
        MODEL.WEIGHTS /path/to/model_final.pth
    # two CPU worker processes (gloo) on a small config
    ./train_net.py --config-file configs/quick/retinanet_tiny_quick.yaml --num-gpus 2 \
        --dist-url tcp://127.0.0.1:29501

The Trainer and setup() live in focal_det.engine; override Trainer methods there or subclass it.
"""
from detectron2.engine import default_argument_parser, launch

import focal_det  # noqa: F401  (registers FocalRetinaNet, heads, losses)
from focal_det.engine import main as _main
from focal_det.engine.launch_checks import dist_url_problem


def main(args):
    return _main(args)


if __name__ == "__main__":
    parser = default_argument_parser()
    args = parser.parse_args()
    print("Command Line Args:", args)
    problem = dist_url_problem(args)  # a busy port: say so before spawning workers
    if problem:
        parser.error(problem)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
