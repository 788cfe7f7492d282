import logging
import os

import pytest
import torch

# Two cores are easy to oversubscribe; tests are small, so one intra-op thread is plenty and
# keeps parallel runs from fighting over OpenMP threads.
torch.set_num_threads(int(os.environ.get("FOCAL_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _focal_det_logs_reach_caplog(caplog):
    # focal_det.engine.setup() configures the "focal_det" logger with detectron2's setup_logger,
    # which stops its propagation to the root logger, where caplog listens: give caplog's
    # handler to "focal_det" itself (propagation off, so that no record is captured twice).
    logger = logging.getLogger("focal_det")
    propagate = logger.propagate
    logger.propagate = False
    logger.addHandler(caplog.handler)
    yield
    logger.removeHandler(caplog.handler)
    logger.propagate = propagate
