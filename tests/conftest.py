import os
import sys

import torch

torch.set_num_threads(int(os.environ.get("BOUNDPROP_TEST_THREADS", "1")))
sys.path.insert(0, os.path.dirname(__file__))
