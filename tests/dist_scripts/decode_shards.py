"""Decode an image folder once across the ranks (utils.trainer.decode_once), counting the files each
rank decodes; rank r saves OUT_DIR/rank{r}.pt: {"decoded": names, "images": the whole copy, "sees": the
ranks whose writes into the copy it sees (the ranks it shares the copy's memory with)} or {"error": the
one-line error}.

Usage: decode_shards.py FOLDER OUT_DIR GATHER_BLOCK_BYTES
Environment: NODES, a node name per rank ("a,a,b,b": two nodes of two ranks), to act several nodes on
one machine.
"""
import os
import sys
from pathlib import Path

import torch

import data.datasets
import utils.trainer
from data.config import DataConfig
from data.datasets import UnreadableImageError, build_dataset
from utils import distributed as du


def main(folder: str, out_dir: str, block_bytes: int) -> None:
    info = du.init_distributed("cpu", threads_per_rank=1)
    dataset = build_dataset(DataConfig(name="imagefolder", root=folder), split="train")
    decoded: list[str] = []
    load = data.datasets.load_image_file

    def counting_load(path, **kwargs):
        decoded.append(Path(path).name)
        return load(path, **kwargs)

    data.datasets.load_image_file = counting_load
    if os.environ.get("NODES"):
        du.node_name = lambda: os.environ["NODES"].split(",")[info.rank]
    try:
        train, _ = utils.trainer.decode_once(dataset, dataset, "data.decode_once", dist_info=info,
                                             gather_block_bytes=block_bytes)
        result = {"decoded": decoded, "images": train.images.clone()}
        # Rank r writes 200 + r into the copy's element r (a black corner pixel of the first image).
        flat = train.images.view(-1)
        du.barrier()
        flat[info.rank] = 200 + info.rank
        du.barrier()
        result["sees"] = [r for r in range(info.world_size) if flat[r] == 200 + r]
    except UnreadableImageError as exc:
        result = {"error": exc.one_line}
    torch.save(result, Path(out_dir) / f"rank{info.rank}.pt")
    du.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    du.exit_process(0)  # not through finalization: see exit_process
