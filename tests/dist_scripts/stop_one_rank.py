"""main.py under torchrun, where only rank STOP_RANK sends itself SIGUSR1, right after global step
STOP_AFTER_STEP: the other ranks must stop at the same step without having had the signal."""
import os
import sys

import main as launcher
from tests.stop_util import train_step_signalling_after
from utils.trainer import Trainer

if __name__ == "__main__":
    Trainer.train_step = train_step_signalling_after(int(os.environ["STOP_AFTER_STEP"]),
                                                     rank=int(os.environ["STOP_RANK"]))
    launcher.main(sys.argv[1:])
