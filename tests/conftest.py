import os

import torch

# Two cores are easy to oversubscribe; tests are small, so one intra-op thread is plenty and
# keeps parallel runs from fighting over OpenMP threads.
torch.set_num_threads(int(os.environ.get("FOCAL_TEST_THREADS", "1")))
