"""
The README's main job (``make demo``). PLACEHOLDER until the demo-dataset issue lands: trains a
tiny FocalRetinaNet for a few iterations on synthetic images and prints the losses.
"""
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from focal_det import add_focal_config


def tiny_cfg():
    cfg = get_cfg()
    add_focal_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    cfg.MODEL.RETINANET.NUM_CONVS = 1
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [
        [x, x * 2 ** (1 / 3), x * 2 ** (2 / 3)] for x in [32, 64, 128, 256, 512]
    ]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    return cfg


def main(iters=5):
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    img = torch.rand(3, 128, 160) * 255
    inst = Instances((128, 160))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 70.0, 90.0], [80.0, 10.0, 150.0, 60.0]]))
    inst.gt_classes = torch.tensor([0, 2])
    batch = [{"image": img, "instances": inst}]
    with EventStorage():
        for it in range(iters):
            losses = model(batch)
            total = sum(losses.values())
            opt.zero_grad()
            total.backward()
            opt.step()
            print(f"iter {it}: " + ", ".join(f"{k}={v.item():.4f}" for k, v in losses.items()))


if __name__ == "__main__":
    main()
