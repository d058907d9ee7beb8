"""main.py under torchrun, where only rank STOP_RANK sends itself SIGUSR1, right after global step
STOP_AFTER_STEP, or with STOP_AT_FEATURE_BATCH instead right after that batch of the feature pass of
the Trainer method STOP_IN (update_pseudo_labels, evaluate): the other ranks must stop at the same
step (batch) without having had the signal."""
import os
import sys

import main as launcher
from tests.stop_util import feature_pass_signalling_at_batch, train_step_signalling_after
from utils.distributed import exit_process
from utils.trainer import Trainer

if __name__ == "__main__":
    rank = int(os.environ["STOP_RANK"])
    if "STOP_AT_FEATURE_BATCH" in os.environ:
        name = os.environ["STOP_IN"]
        setattr(Trainer, name, feature_pass_signalling_at_batch(name, int(os.environ["STOP_AT_FEATURE_BATCH"]),
                                                                rank=rank))
    else:
        Trainer.train_step = train_step_signalling_after(int(os.environ["STOP_AFTER_STEP"]), rank=rank)
    exit_process(launcher.command_line_status(sys.argv[1:]))
