"""Each rank gathers an object, logs a line to OUT_DIR/rankR.log, prints one to stdout without a newline
or a flush, then ends through `du.exit_process` with status 3 on rank 1 and 0 on rank 0 (whose group was
destroyed already, as main.py's finished runs do).

Usage: exit_process.py OUT_DIR
"""
import logging
import sys
from pathlib import Path

from utils import distributed as du


def main(out_dir: str) -> None:
    # block-buffered, as when a launcher starts python without -u (srun; torchrun passes -u)
    sys.stdout = open(sys.stdout.fileno(), "w", buffering=8192, closefd=False)
    info = du.init_distributed("cpu", threads_per_rank=1)
    gathered = du.all_gather_object(info.rank)
    handler = logging.FileHandler(Path(out_dir) / f"rank{info.rank}.log")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger(__name__).info("rank %d gathered %s", info.rank, gathered)
    print(f"rank {info.rank} ends", end="")
    if info.rank == 0:
        du.cleanup_distributed(synchronize=False)
    du.exit_process(3 if info.rank == 1 else 0)


if __name__ == "__main__":
    main(sys.argv[1])
