"""Trainer and setup of ``train_net.py`` (detectron2's engine, CPU-aware DDP, COCO evaluation)."""
from .trainer import Trainer, create_ddp_model, load_config, main, setup

__all__ = ["Trainer", "create_ddp_model", "load_config", "main", "setup"]
