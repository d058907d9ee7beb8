"""Every shipped config (config/*.yml) through main.py, one epoch per stage, on small real data: a check
that the real-size configs run end to end (their stages, image sizes, augmentations, PCL's levels,
SCAN / NNM loading the SimCLR run before them), which the test suite's demo-size runs cannot show.

    python bench/every_config.py                           # all of them on the CPU (about 31 min here)
    python bench/every_config.py --only pcl,stl10_r18      # the configs whose name holds any of these
    python bench/every_config.py --device cuda --data .devdata

What is substituted, and nothing else (the config's backbone, image size, optimiser and losses stay):
- `train.batch_size_per_rank=8`, one epoch per stage (`train.epochs` and each stage's `method.*_epochs`),
  no warm-up, one k-means restart, an evaluation every epoch, `data.num_workers=0`;
- the data: MNIST configs read `mnist.npz` (`mnist_5k` demos their own digits), CIFAR-10 configs the
  test images of `cifar10_test.npz`, 300 of them or enough for the largest clustering (`data.limit`);
  every other dataset (CIFAR-100, STL-10, the ImageNet subsets, Tiny-ImageNet) is an image folder of
  CIFAR-10 test images upscaled to the config's size, with the config's class folders (its
  `data.classes`, or as many as its dataset has classes), train/ and test/ splits, and images enough
  for its largest clustering (PCL's 1,000 clusters);
- SCAN's and NNM's `method.pretrained` is the SimCLR run this script made (SimCLR configs run first).
Prints one line per config: OK with seconds and NMI / ACC / ARI (of one epoch: no quality figure), or
FAIL with the error's last line; exits 1 if any failed. `--out` keeps the runs and image folders.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.methods import demo_stage_epochs  # noqa: E402
from data.datasets import shared_data_dir  # noqa: E402

# Classes and native image side of each dataset a config's name starts with (Tiny-ImageNet's configs read
# an image folder whose classes decide K: 200).
CLASSES_OF = {"cifar20": 20, "stl10": 10, "tinyimagenet": 200, "imagenet10": 10, "imagenetdogs": 15}
NATIVE_SIZE = {"cifar20": 32, "stl10": 96, "tinyimagenet": 64}
BATCH = 8


def shipped_configs(only: list[str]) -> list[Path]:
    """config/*.yml (fragments under config/base are not runs), SimCLR first: SCAN and NNM start from it."""
    paths = sorted((REPO_ROOT / "config").glob("*.yml"), key=lambda p: ("simclr" not in p.name, p.name))
    return [p for p in paths if not only or any(word in p.name for word in only)]


def largest_clustering(cfg, num_classes: int) -> int:
    """The most clusters any k-means of the run asks for (PCL's levels, or cluster/eval.num_clusters)."""
    levels = list(getattr(cfg.method, "num_clusters_per_level", []) or [])
    return max([num_classes, cfg.cluster.num_clusters, cfg.eval.num_clusters, *levels])


def image_folder(root: Path, class_names: list[str], per_class: int, size: int, images) -> Path:
    """train/<class>/*.png (`per_class` each) and test/<class>/*.png (one each) of `images` (M, 32, 32, 3)
    upscaled to `size`; made once per (classes, count, size)."""
    from PIL import Image

    folder = root / f"{len(class_names)}x{per_class}_{size}px_{class_names[0]}"
    if (folder / "done").is_file():
        return folder
    index = 0
    for split, count in (("train", per_class), ("test", 1)):
        for name in class_names:
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            for j in range(count):
                image = Image.fromarray(images[index % len(images)])
                image.resize((size, size), Image.Resampling.BICUBIC).save(folder / split / name / f"{j}.png")
                index += 1
    (folder / "done").touch()
    return folder


def overrides_for(path: Path, cfg, *, device: str, data: Path, out: Path, cifar_images) -> list[str]:
    """The launcher overrides that run `path` small (see the module docstring)."""
    common = [f"run.device={device}", "data.num_workers=0", f"train.batch_size_per_rank={BATCH}", "train.epochs=1",
              "train.time_budget_minutes=0", "cluster.n_init=1", "eval.n_init=1", "eval.every_epochs=1",
              "logging.progress_bar=false", f"run.output_dir={out / 'runs'}", f"run.name={path.stem}"]
    common += [f"method.{key}=1" for key in demo_stage_epochs(cfg.method)]
    if getattr(cfg.method, "warmup_epochs", 0):
        common.append("method.warmup_epochs=0")
    pretrained = getattr(cfg.method, "pretrained", "")
    if pretrained.startswith("runs/"):   # an earlier shipped run: the one this script made
        common.append(f"method.pretrained={out / 'runs' / Path(pretrained).parent.name.removesuffix('_train')}/last.pt")
    name, dataset = cfg.data.name, path.stem.split("_")[0]
    classes = list(cfg.data.classes) or [f"class{i:03d}" for i in range(CLASSES_OF.get(dataset, 10))]
    need = largest_clustering(cfg, len(classes))
    limit = f"data.limit={max(300, math.ceil(need * 1.05))}"
    if name == "mnist_5k":
        return [*common, limit]
    if name == "mnist":
        return [*common, f"data.root={data / 'mnist.npz'}", limit]
    if name == "cifar10":
        return [*common, f"data.root={data / 'cifar10_test.npz'}", "data.split=test", "data.eval_split=", limit]
    size = cfg.data.image_size or NATIVE_SIZE.get(dataset, 96)
    per_class = max(3, math.ceil(need * 1.05 / len(classes)))
    folder = image_folder(out / "folders", classes, per_class, size, cifar_images)
    extra = [] if cfg.data.classes else ["data.classes=[]"]
    if cfg.data.stl10_unlabeled:
        extra.append("data.stl10_unlabeled=false")
    return [*common, "data.name=imagefolder", f"data.root={folder}", f"data.image_size={size}", *extra]


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    import main as launcher
    from utils.config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="run.device (cpu, cuda)")
    p.add_argument("--data", default=str(shared_data_dir()), help="folder holding mnist.npz and cifar10_test.npz")
    p.add_argument("--only", default="", help="comma-separated parts of config names (default: every config)")
    p.add_argument("--out", default="", help="keep the runs and image folders here (default: a temporary folder)")
    args = p.parse_args(argv)
    data = Path(args.data)
    missing = [name for name in ("mnist.npz", "cifar10_test.npz") if not (data / name).is_file()]
    if missing:
        raise SystemExit(f"error: --data {data}: no {' or '.join(missing)} there")
    paths = shipped_configs([word for word in args.only.split(",") if word])
    if not paths:
        raise SystemExit(f"error: --only {args.only}: no config/*.yml name holds any of these")
    cifar_images = np.load(data / "cifar10_test.npz")["x_test"]
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        for path in paths:
            start = time.perf_counter()
            try:
                cfg = load_config(path)
                metrics = launcher.main([str(path), *overrides_for(path, cfg, device=args.device, data=data, out=out,
                                                                    cifar_images=cifar_images)])
                print(f"OK   {path.name:34s} {time.perf_counter() - start:7.1f}s  NMI {metrics['nmi']:.4f}  "
                      f"ACC {metrics['acc']:.4f}  ARI {metrics['ari']:.4f}", flush=True)
            except (Exception, SystemExit) as exc:   # noqa: BLE001 - every config is reported, then the next runs
                failed.append(path.name)
                last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                where = traceback.extract_tb(exc.__traceback__)[-1]
                print(f"FAIL {path.name:34s} {time.perf_counter() - start:7.1f}s  {type(exc).__name__}: {last} "
                      f"({Path(where.filename).name}:{where.lineno})", flush=True)
    print(f"{len(paths) - len(failed)} of {len(paths)} configs ran"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
