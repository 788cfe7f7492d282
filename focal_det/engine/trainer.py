"""
The training/evaluation engine of ``train_net.py``, as library code so that other entry points
(``make demo``, tests, user scripts) reuse the same ``Trainer`` and ``setup``.

Everything is detectron2's ``DefaultTrainer`` except:
  * ``build_evaluator`` returns a COCO evaluator (``focal_det.evaluation``);
  * checkpoints go through ``FocalCheckpointer`` (``build_checkpointer``): atomic saves, safe
    loading, Detectron RetinaNet ``.pkl`` conversion, a clear message when offline;
  * DistributedDataParallel is built by the overridable ``build_ddp_model``, which passes
    ``device_ids=None`` for CPU models: detectron2's ``create_ddp_model`` always passes
    ``device_ids=[local_rank]``, which PyTorch rejects for CPU modules, so multi-process CPU
    training (gloo) could not start;
  * ``setup`` falls back to ``MODEL.DEVICE = "cpu"`` with a warning when CUDA is absent, so the
    paper configs (detectron2's default device is "cuda") can be evaluated or smoke-trained on CPU.
  * reliability (docs/reliability.md): ``setup`` checks every config key/value/combination
    and NUM_CLASSES against the datasets before any work (``focal_det.config_check``);
    checkpoints are written atomically, never with NaN weights, tagged as last only when their
    weights proved healthy, and loaded without running code (``SafeDetectionCheckpointer``); a
    non-finite loss stops with the iteration, the loss and advice that works
    (``explain_non_finite_loss``), and no evaluation follows it; ``--resume`` applies changed
    SOLVER values and names other changes (``check_resumed_run``); ``--eval-only`` refuses
    weights that miss the head; the train loader drops degenerate boxes, names unreadable images
    and resumes its data stream exactly (``focal_det.data.sanitize``,
    ``focal_det.data.resumable``, ``ResumableDataHook``).
"""
import contextlib
import logging
import os
from collections import OrderedDict
from unittest import mock

import torch
from detectron2.config import get_cfg
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import DefaultTrainer, default_setup, hooks
from detectron2.engine import create_ddp_model as _d2_create_ddp_model
from detectron2.engine import defaults as _d2_defaults
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import FocalCheckpointer, check_eval_weights
from ..config import add_focal_config
from ..config_check import (
    check_config,
    check_dataset_classes,
    merge_config_file,
    merge_config_list,
)
from ..data.augment import build_train_augmentations
from ..data.resumable import build_resumable_train_loader
from ..data.sanitize import (
    FileNamingMapper,
    check_dataset_files,
    load_dataset_dicts,
    naming_annotation_file,
)
from ..evaluation import build_coco_evaluator
from ..modeling.test_time_augmentation import FocalRetinaNetWithTTA
from .hooks import (
    EvalAfterSuccessHook,
    ResumableDataHook,
    RunConfigHook,
    check_resumed_run,
    explain_non_finite_loss,
    find_resumable_sampler,
    solver_state,
)

__all__ = ["Trainer", "load_config", "setup", "main", "create_ddp_model"]

logger = logging.getLogger(__name__)


def create_ddp_model(model, *, fp16_compression=False, **kwargs):
    """
    detectron2's :func:`create_ddp_model` that also works for CPU models.

    With more than one process, wraps ``model`` in DistributedDataParallel. detectron2 passes
    ``device_ids=[local_rank]`` unconditionally; PyTorch requires ``device_ids=None`` for a
    module whose parameters live on the CPU, so we pass that instead when the model is on CPU.
    """
    if comm.get_world_size() > 1 and "device_ids" not in kwargs:
        on_cuda = any(p.is_cuda for p in model.parameters())
        kwargs["device_ids"] = [comm.get_local_rank()] if on_cuda else None
    return _d2_create_ddp_model(model, fp16_compression=fp16_compression, **kwargs)


class Trainer(DefaultTrainer):
    """
    detectron2's DefaultTrainer for FocalRetinaNet. Extend it as you would DefaultTrainer:
    override ``build_hooks``, ``build_train_loader``, ``build_test_loader``, ``build_evaluator``,
    ``build_model``, ``build_optimizer``, ``build_lr_scheduler`` or ``build_ddp_model``.
    """

    def __init__(self, cfg):
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger(name="focal_det")  # DefaultTrainer sets up detectron2's logger only
        with self._own_builders(cfg):
            super().__init__(cfg)

    @contextlib.contextmanager
    def _own_builders(self, cfg):
        # DefaultTrainer.__init__ calls two module-level functions of detectron2.engine.defaults
        # that no subclass can override: create_ddp_model (device_ids=[local_rank] even for a
        # CPU model, which PyTorch refuses) and DetectionCheckpointer. While it runs, they are
        # this class's build_ddp_model and build_checkpointer, given ``cfg`` (its
        # auto_scale_workers changes only the batch size, the LR and the schedule).
        def ddp(model, **kwargs):
            return self.build_ddp_model(cfg, model)

        def checkpointer(model, save_dir, **checkpointables):
            return self.build_checkpointer(cfg, model, save_dir, **checkpointables)

        with mock.patch.object(_d2_defaults, "create_ddp_model", ddp), mock.patch.object(
            _d2_defaults, "DetectionCheckpointer", checkpointer
        ):
            yield

    def train(self):
        """
        Run training.

        Returns:
            the results of the last evaluation (``TEST.EVAL_PERIOD``; at least the one after the
            last iteration when the period is > 0), or None when evaluation is off.
            DefaultTrainer returns them only when ``TEST.EXPECTED_RESULTS`` is set.
        """
        res = super().train()
        if hasattr(self.checkpointer, "confirm_pending"):  # the final checkpoint: run finished
            self.checkpointer.confirm_pending()
        return res if res is not None else getattr(self, "_last_eval_results", None)

    def resume_or_load(self, resume=True):
        """
        detectron2's, and on ``--resume``: stop if the model no longer fits the checkpoint,
        apply this config's SOLVER values (detectron2 keeps the checkpoint's LR) and log what
        else changed since the checkpoint (``check_resumed_run``).
        """
        fresh = solver_state(self.optimizer, self.scheduler)  # before the checkpoint's replace it
        super().resume_or_load(resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            check_resumed_run(self, fresh)

    def run_step(self):
        # A NaN/Inf loss stops with the iteration, the loss and a hint; nothing is saved after.
        with explain_non_finite_loss(self.cfg, self.iter, self.checkpointer):
            super().run_step()
        # This loss was computed on the weights of the last checkpoint (if one was just saved):
        # only a healthy one makes that checkpoint the "last good" one.
        history = self.storage.histories().get("total_loss")
        if history is not None and hasattr(self.checkpointer, "judge_pending"):
            self.checkpointer.judge_pending(history.latest(), self.iter)

    def build_hooks(self):
        ret = super().build_hooks()
        ret = [
            EvalAfterSuccessHook(h._period, h._func, h._eval_after_train)  # no AP after a failure
            if type(h) is hooks.EvalHook
            else h
            for h in ret
        ]
        ret.append(RunConfigHook(self.cfg))  # compared with the new config on --resume
        sampler = find_resumable_sampler(self._trainer.data_loader)
        if sampler is not None:
            ret.append(ResumableDataHook(sampler))  # data stream seed + position on --resume
        return ret

    @classmethod
    def build_train_loader(cls, cfg):
        """
        Returns:
            detectron2's train loader over the sanitised dataset (degenerate boxes dropped,
            unreadable images named), with a data stream that ``--resume`` continues exactly
            (``focal_det.data.resumable``); detectron2's own loader, over the same sanitised
            dataset and mapper, for samplers other than ``TrainingSampler``.
        """
        mapper = FileNamingMapper(
            DatasetMapper(cfg, True, augmentations=build_train_augmentations(cfg))
        )
        dicts = load_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            logger.warning(
                f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN}: --resume will not "
                "continue the data stream exactly (only TrainingSampler does)."
            )
            return build_detection_train_loader(cfg, mapper=mapper, dataset=dicts)
        return build_resumable_train_loader(cfg, dicts, mapper)[0]

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        check_dataset_files(dataset_name)  # a clear message for a missing COCO folder
        with naming_annotation_file(dataset_name):  # ... and for a truncated json
            return build_detection_test_loader(
                cfg, dataset_name, mapper=FileNamingMapper(DatasetMapper(cfg, False))
            )

    @classmethod
    def build_checkpointer(cls, cfg, model, save_dir="", **checkpointables):
        """
        Returns:
            FocalCheckpointer: detectron2's checkpointer with atomic saves, safe loading, the
            Detectron RetinaNet ``.pkl`` converter and a clear offline message.
        """
        return FocalCheckpointer(
            model, save_dir, max_abs_weight=cfg.SOLVER.CHECKPOINT_MAX_ABS_WEIGHT,
            confirm_with_next_loss=True, **checkpointables,
        )  # fmt: skip

    @classmethod
    def build_ddp_model(cls, cfg, model):
        """
        Returns:
            the model wrapped in DistributedDataParallel when there is more than one process
            (``broadcast_buffers=False`` as detectron2), else ``model`` itself.
        """
        return create_ddp_model(model, broadcast_buffers=False)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """
        Evaluate ``model`` with test-time augmentation (``FocalRetinaNetWithTTA``: TEST.AUG.
        MIN_SIZES, MAX_SIZE, FLIP), as detectron2's tools/train_net.py does for R-CNNs.

        Returns:
            the results of :meth:`test`, each key suffixed with "_TTA" (e.g. "bbox_TTA");
            detections written to ``OUTPUT_DIR/inference_TTA``.
        """
        logger.info("Running inference with test-time augmentation ...")
        model = FocalRetinaNetWithTTA(cfg, model)
        evaluators = [
            cls.build_evaluator(
                cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA")
            )
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, model, evaluators)
        return OrderedDict({k + "_TTA": v for k, v in res.items()})

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """
        Returns:
            a COCO evaluator (bbox AP) for ``dataset_name`` writing its results JSON to
            ``output_folder`` (default ``OUTPUT_DIR/inference``).
        """
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return build_coco_evaluator(cfg, dataset_name, output_folder)


def load_config(config_file, opts=(), world_size=None):
    """
    The checked, unfrozen config: detectron2 defaults -> focal_det keys -> ``config_file`` ->
    ``opts`` (``KEY VALUE`` pairs) -> CPU when CUDA is absent -> :func:`check_config`.
    """
    cfg = get_cfg()
    add_focal_config(cfg)
    # Checked merges: an unknown key / wrong type names the key, its file and the closest key;
    # YAML is read with yaml.safe_load only.
    if config_file:
        merge_config_file(cfg, config_file)
    merge_config_list(cfg, opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("detectron2").warning(
            "MODEL.DEVICE=%s but CUDA is not available: running on CPU instead.",
            cfg.MODEL.DEVICE,
        )
        cfg.MODEL.DEVICE = "cpu"
    check_config(cfg, world_size=world_size)  # settings that cannot work together
    return cfg


def setup(args):
    """
    Build the frozen config of a run from parsed command-line arguments (detectron2's
    ``default_argument_parser``): :func:`load_config` of ``args.config_file`` and ``args.opts``
    -> the datasets' classes checked -> freeze -> ``default_setup`` (logging, config backup,
    seeding).
    """
    cfg = load_config(args.config_file, args.opts, world_size=comm.get_world_size())
    check_dataset_classes(cfg)  # NUM_CLASSES against the registered datasets' classes
    cfg.freeze()
    default_setup(cfg, args)
    # detectron2 sets up its own loggers only: focal_det's INFO would not show, its WARNINGs
    # would come unformatted.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="focal_det")
    return cfg


def main(args, trainer_cls=Trainer):
    """
    Train (``trainer.train()``) or, with ``args.eval_only``, evaluate ``MODEL.WEIGHTS`` on
    ``DATASETS.TEST``; with ``TEST.AUG.ENABLED`` also with test-time augmentation
    (:meth:`Trainer.test_with_TTA`, results keyed "bbox_TTA"). Call it through detectron2's
    ``launch`` for multi-process runs.

    Returns:
        the evaluation results (dict) on the main process (None when training without
        evaluation).
    """
    cfg = setup(args)
    if args.eval_only:
        model = trainer_cls.build_model(cfg)
        checkpointer = trainer_cls.build_checkpointer(cfg, model, cfg.OUTPUT_DIR)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        check_eval_weights(cfg, model, checkpointer)
        res = trainer_cls.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(trainer_cls.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:  # after training, as detectron2's tools/train_net.py
        trainer.register_hooks(
            [hooks.EvalHook(0, lambda: trainer_cls.test_with_TTA(cfg, trainer.model))]
        )
    return trainer.train()
