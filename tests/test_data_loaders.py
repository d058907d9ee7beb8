"""Training loaders (sharding like DistributedSampler, reproducible views) and the contiguous
test-time shard pass, with ranks simulated in one process; one real two-process run under torchrun."""
import os
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from data.augment import normalize
from data.config import AugmentConfig, DataConfig
from data.datasets import ImageData, build_dataset
from data.loaders import (DeviceTensorLoader, TrainLoader, WorkersLoader, build_train_loader, iterate_shard,
                          shard_bounds)
from tests.torchrun_util import run_torchrun
from utils.stop import StopOnSignal

AUG = AugmentConfig(blur_p=[0.5, 0.0], solarize_p=[0.0, 0.3])


def _toy(n: int = 203, channels: int = 3, size: int = 12) -> ImageData:
    g = torch.Generator().manual_seed(n)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    return ImageData(name="toy", labels=torch.arange(n) % 5, num_classes=5, class_names=list("abcde"),
                     mean=(0.5,) * channels, std=(0.25,) * channels, channels=channels, image_size=size,
                     images=images)


def _loader(data, *, rank=0, world_size=2, seed=3, batch=16, views=2, mode="device", workers=0):
    return build_train_loader(data, AUG, batch_size_per_rank=batch, num_views=views, device=torch.device("cpu"),
                              rank=rank, world_size=world_size, seed=seed, mode=mode, num_workers=workers)


def _epoch_indices(loader, epoch):
    loader.set_epoch(epoch)
    return torch.cat([batch.indices for batch in loader])


@pytest.mark.parametrize("n, world_size", [(203, 2), (10, 3), (2, 4), (0, 2), (64, 1)])
def test_shard_bounds_cover_every_row_once_in_order(n, world_size):
    bounds = [shard_bounds(n, r, world_size) for r in range(world_size)]
    assert [i for start, stop in bounds for i in range(start, stop)] == list(range(n))
    per_rank = -(-n // world_size)
    assert all(stop - start == per_rank for start, stop in bounds[:-1] if stop < n)


def test_device_loader_shards_like_distributed_sampler():
    data = _toy(203)
    per_rank = {}
    for rank in (0, 1):
        loader = _loader(data, rank=rank)
        assert isinstance(loader, DeviceTensorLoader) and isinstance(loader, TrainLoader)
        assert len(loader) == (203 // 2) // 16
        for epoch in (0, 1):
            indices = _epoch_indices(loader, epoch)
            sampler = DistributedSampler(range(203), num_replicas=2, rank=rank, shuffle=True, seed=3, drop_last=True)
            sampler.set_epoch(epoch)
            assert indices.tolist() == list(sampler)[:len(indices)]  # same order, last partial batch dropped
            assert len(set(indices.tolist())) == len(indices) == len(loader) * 16
            per_rank[rank, epoch] = set(indices.tolist())
    for epoch in (0, 1):
        assert not per_rank[0, epoch] & per_rank[1, epoch]  # ranks are disjoint
    assert per_rank[0, 0] != per_rank[0, 1]


def test_device_loader_batches_views_and_reproducibility():
    data = _toy(203)
    loader = _loader(data, views=3)
    loader.set_epoch(4)
    first = list(loader)
    batch = first[0]
    assert len(batch.views) == 3 and all(v.shape == (16, 3, 12, 12) and v.dtype == torch.float32 for v in batch.views)
    assert batch.indices.dtype == torch.int64
    assert not torch.equal(batch.views[0], batch.views[1])  # each view draws its own parameters
    again = _loader(data, views=3)  # a fresh loader, as after resuming at the start of epoch 4
    again.set_epoch(4)
    for a, b in zip(first, again):
        assert torch.equal(a.indices, b.indices) and all(torch.equal(x, y) for x, y in zip(a.views, b.views))
    same = ImageData(**{**vars(data), "images": data.images[:1].expand(203, -1, -1, -1)})  # one image, repeated
    ranks = [next(iter(_loader(same, rank=rank, views=1))).views[0] for rank in (0, 1)]
    assert not torch.equal(ranks[0], ranks[1])  # the ranks' generators differ, not just their images
    loader.set_epoch(5)
    assert not torch.equal(next(iter(loader)).indices, batch.indices)


@pytest.mark.parametrize("mode, workers", [("device", 0), ("workers", 0), ("workers", 2)])
def test_an_epoch_started_at_a_later_batch_yields_the_rest_of_the_full_epoch(mode, workers):
    # A run resumed mid-epoch (utils/stop.py) starts its epoch at the next batch: the oracle is the tail
    # of the same loader's uninterrupted epoch, batch for batch, indices and views.
    data = _toy(101, size=8)
    loader = _loader(data, batch=8, mode=mode, workers=workers)
    loader.set_epoch(2)
    full = list(loader)
    assert len(full) == len(loader) == 6
    for first in (0, 1, 4, 6):
        fresh = _loader(data, batch=8, mode=mode, workers=workers)  # a new process, as after resuming
        fresh.set_epoch(2, first_batch=first)
        tail = list(fresh)
        assert len(tail) == len(full) - first and len(fresh) == len(loader)
        for a, b in zip(full[first:], tail):
            assert torch.equal(a.indices, b.indices) and all(torch.equal(x, y) for x, y in zip(a.views, b.views))
    loader.set_epoch(3)  # and the next epoch starts at its beginning again
    assert len(list(loader)) == 6
    for bad in (-1, 7):
        with pytest.raises(ValueError, match=f"first_batch: expected 0..6 \\(batches per epoch\\), got {bad}"):
            loader.set_epoch(2, first_batch=bad)


def _child_pids() -> list[int]:
    return [int(pid) for task in Path(f"/proc/{os.getpid()}/task").iterdir()
            for pid in (task / "children").read_text().split()]


def test_dataloader_workers_survive_the_stop_signal():
    # SLURM may signal every process of a task, and torchrun's DataLoader workers share the group: a
    # worker killed by SIGUSR1 would end the run with "DataLoader worker ... killed by signal".
    # The workers start before the handler exists: forked ones do not inherit it, as with the spawn
    # and forkserver start methods.
    loader = _loader(_toy(64, size=8), batch=8, mode="workers", workers=2)
    loader.set_epoch(0)
    batches = iter(loader)
    done = [next(batches), next(batches)]  # one from each worker: both have started
    workers = _child_pids()
    assert len(workers) == 2
    with StopOnSignal():
        for pid in workers:
            os.kill(pid, signal.SIGUSR1)
        done += list(batches)
    assert len(done) == len(loader) and sorted(_child_pids()) == sorted(workers)


def test_loaders_leave_the_global_rng_alone():
    data = _toy(64)
    state = torch.get_rng_state()
    for mode in ("device", "workers"):
        for _ in _loader(data, mode=mode):
            pass
    assert torch.equal(torch.get_rng_state(), state)


def test_workers_loader_takes_the_device_loaders_indices():
    data = _toy(67, size=8)
    for rank in (0, 1):
        device, workers = _loader(data, rank=rank, batch=8), _loader(data, rank=rank, batch=8, mode="workers")
        assert isinstance(workers, WorkersLoader) and len(workers) == len(device)
        for epoch in (0, 3):
            assert torch.equal(_epoch_indices(workers, epoch), _epoch_indices(device, epoch))
    batch = next(iter(_loader(data, batch=8, mode="workers", views=3)))
    assert len(batch.views) == 3 and batch.views[2].shape == (8, 3, 8, 8)


def test_workers_views_do_not_depend_on_the_number_of_workers():
    data = _toy(64, channels=1)
    inline, pooled = _loader(data, mode="workers", workers=0), _loader(data, mode="workers", workers=2)
    view_of = {}
    for epoch in (0, 1):  # the second epoch runs in the same persistent worker processes
        inline.set_epoch(epoch)
        pooled.set_epoch(epoch)
        for a, b in zip(inline, pooled):
            assert torch.equal(a.indices, b.indices) and all(torch.equal(x, y) for x, y in zip(a.views, b.views))
            for i, view in zip(a.indices.tolist(), a.views[0]):
                view_of[epoch, i] = view
    common = [i for (epoch, i) in view_of if epoch == 0 and (1, i) in view_of]
    assert common and all(not torch.equal(view_of[0, i], view_of[1, i]) for i in common)  # new views each epoch


def test_auto_mode_and_too_small_datasets():
    data = _toy(40)
    assert isinstance(_loader(data, mode="auto"), DeviceTensorLoader)
    with pytest.raises(ValueError, match=r"do not fill one batch"):
        _loader(data, batch=21)
    with pytest.raises(ValueError, match=r"data.loader"):
        _loader(data, mode="gpu")


@pytest.mark.parametrize("n, batch", [(203, 16), (7, 3), (1, 4)])
def test_iterate_shard_covers_every_row_once_in_order(n, batch):
    data = _toy(n)
    indices, images = [], []
    for rank in (0, 1):
        for x, idx in iterate_shard(data, batch_size=batch, device=torch.device("cpu"), rank=rank, world_size=2):
            assert x.dtype == torch.float32 and len(x) == len(idx) <= batch
            indices.append(idx)
            images.append(x)
    assert torch.cat(indices).tolist() == list(range(n))
    expected = normalize(data.images.float() / 255, data.mean, data.std)
    torch.testing.assert_close(torch.cat(images), expected)


def _colour_tree(root: Path) -> dict[str, tuple[int, int, int]]:
    colours = {"blue": (0, 0, 250), "green": (0, 250, 0), "red": (250, 0, 0)}
    for cls, colour in colours.items():
        for i in range(5):
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20 + i, 16), colour).save(root / cls / f"{i}.png")
    return colours


def test_file_datasets_decode_in_both_loaders_and_the_shard_pass(tmp_path):
    colours = _colour_tree(tmp_path)
    data = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8), split="train")
    workers = _loader(data, batch=4, mode="auto")
    assert isinstance(workers, WorkersLoader)
    batch = next(iter(workers))
    assert batch.views[0].shape == (4, 3, 8, 8)
    device = _loader(data, batch=4, mode="device")  # decodes the files into memory first
    assert isinstance(device, DeviceTensorLoader) and torch.equal(_epoch_indices(device, 0), _epoch_indices(workers, 0))
    rows = []
    rng_before = torch.get_rng_state()
    for rank in (0, 1):
        for x, idx in iterate_shard(data, batch_size=4, device="cpu", rank=rank, world_size=2, normalize=False):
            assert x.shape[1:] == (3, 8, 8)
            rows += list(zip(idx.tolist(), x))
    assert [i for i, _ in rows] == list(range(len(data)))
    # the pass draws nothing from the global RNG: a cached pass and a fresh one leave a run's draws alike
    assert torch.equal(torch.get_rng_state(), rng_before)
    for i, image in rows:  # solid colours survive the resize and centre crop
        expected = torch.tensor(colours[data.class_names[int(data.labels[i])]], dtype=torch.float32) / 255
        torch.testing.assert_close(image.mean(dim=(1, 2)), expected, atol=1 / 255, rtol=0)


def test_two_real_ranks_gather_shards_into_the_dataset(tmp_path):
    script = Path(__file__).parent / "dist_scripts" / "data_shards.py"
    run_torchrun(script, str(tmp_path / "out.pt"), "203", nproc=2, timeout=300)
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    data = build_dataset(DataConfig(name="mnist_5k", limit=203), split="train")
    expected = normalize(data.images.float() / 255, data.mean, data.std)
    torch.testing.assert_close(result["images"], expected)
    first, second = (set(t.tolist()) for t in result["train_indices"])
    assert not first & second and len(first) == len(second) > 0


FIXED = AugmentConfig(random_views=False)


def _partner_epochs(data, table, *, mode, workers, first_batch=0, aug=FIXED, epoch=2):
    loader = build_train_loader(data, aug, batch_size_per_rank=8, num_views=2, device=torch.device("cpu"),
                                rank=1, world_size=2, seed=5, mode=mode, num_workers=workers)
    loader.set_partners(table)
    loader.set_epoch(epoch, first_batch=first_batch)
    return list(loader)


def _eval_views(data):
    from data.augment import EvalTransform

    transform = EvalTransform(image_size=data.image_size, mean=data.mean, std=data.std)
    return lambda rows: transform(data.images[rows])


@pytest.mark.parametrize("mode, workers", [("device", 0), ("workers", 0), ("workers", 2)])
def test_partner_views_show_a_row_of_the_table(mode, workers):
    data = _toy(60)
    g = torch.Generator().manual_seed(1)
    table = torch.randint(0, 60, (60, 4), generator=g)
    plain = _eval_views(data)
    batches = _partner_epochs(data, table, mode=mode, workers=workers)
    seen_columns = set()
    for batch in batches:
        assert batch.partners is not None and batch.partners.shape == batch.indices.shape
        for i, partner in zip(batch.indices.tolist(), batch.partners.tolist()):
            assert partner in table[i].tolist()
            seen_columns.add(table[i].tolist().index(partner))
        # view 0 shows the images, view 1 their partners (the fixed views: the evaluation transform)
        assert torch.allclose(batch.views[0], plain(batch.indices), atol=1e-5)
        assert torch.allclose(batch.views[1], plain(batch.partners), atol=1e-5)
    assert len(seen_columns) > 1  # drawn among the candidates, not always the same column
    # without a table every view shows the image again
    for batch in _partner_epochs(data, None, mode=mode, workers=workers):
        assert batch.partners is None and torch.allclose(batch.views[1], plain(batch.indices), atol=1e-5)


def test_partners_are_the_same_in_both_loaders_any_workers_and_a_resumed_epoch():
    data = _toy(90)
    table = torch.stack([torch.arange(90), (torch.arange(90) + 1) % 90, (torch.arange(90) + 7) % 90], dim=1)
    runs = {(mode, workers): _partner_epochs(data, table, mode=mode, workers=workers, aug=AUG)
            for mode, workers in [("device", 0), ("workers", 0), ("workers", 2)]}
    partners = {key: torch.cat([b.partners for b in batches]).tolist() for key, batches in runs.items()}
    assert len({tuple(p) for p in partners.values()}) == 1
    for mode, workers in runs:
        resumed = _partner_epochs(data, table, mode=mode, workers=workers, aug=AUG, first_batch=2)
        full = runs[(mode, workers)][2:]
        assert [b.partners.tolist() for b in resumed] == [b.partners.tolist() for b in full]
        for a, b in zip(resumed, full):  # the augmented partner views too
            assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))
    # another epoch draws other partners
    other = torch.cat([b.partners for b in _partner_epochs(data, table, mode="device", workers=0, epoch=3)])
    assert other.tolist() != partners[("device", 0)]


@pytest.mark.parametrize("table, message", [
    (torch.zeros(59, 3, dtype=torch.long), r"expected \(60, M >= 1\) rows, got shape \(59, 3\)"),
    (torch.full((60, 2), 60), r"expected rows in \[0, 60\), got values in \[60, 60\]"),
    (torch.full((60, 2), -1), r"expected rows in \[0, 60\), got values in \[-1, -1\]"),
])
@pytest.mark.parametrize("mode", ["device", "workers"])
def test_a_bad_partner_table_is_refused(table, message, mode):
    loader = _loader(_toy(60), mode=mode)
    with pytest.raises(ValueError, match=message):
        loader.set_partners(table)


@pytest.mark.parametrize("mode, workers", [("device", 0), ("workers", 0), ("workers", 2)])
def test_clean_views_are_the_evaluation_transform_and_resume_alike(mode, workers):
    data = _toy(60)
    plain = _eval_views(data)

    def epoch(first_batch=0, clean=(0,)):
        loader = _loader(data, mode=mode, workers=workers, batch=8)
        loader.set_clean_views(clean)
        loader.set_epoch(4, first_batch=first_batch)
        return list(loader)

    batches = epoch()
    for batch in batches:
        assert torch.allclose(batch.views[0], plain(batch.indices), atol=1e-5)       # clean
        assert not torch.allclose(batch.views[1], plain(batch.indices), atol=1e-2)   # still augmented
    resumed = epoch(first_batch=2)
    assert all(torch.equal(x, y) for a, b in zip(resumed, batches[2:]) for x, y in zip(a.views, b.views))
    for batch in epoch(clean=()):   # () = every view augmented again
        assert not torch.allclose(batch.views[0], plain(batch.indices), atol=1e-2)
    with pytest.raises(ValueError, match=r"clean views: expected view numbers in \[0, 2\), got \[2\]"):
        _loader(data, mode=mode).set_clean_views([2])


@pytest.mark.parametrize("mode, workers", [("device", 0), ("workers", 0), ("workers", 2)])
def test_a_view_count_makes_only_the_first_views_and_resumes_alike(mode, workers):
    data = _toy(60)

    def epoch(count=None, first_batch=0, views=3):
        loader = _loader(data, mode=mode, workers=workers, batch=8, views=views)
        if count is not None:
            loader.set_views(count)
        loader.set_epoch(4, first_batch=first_batch)
        return list(loader)

    three, two = epoch(), epoch(count=2)
    assert {len(b.views) for b in three} == {3} and {len(b.views) for b in two} == {2}
    assert [b.indices.tolist() for b in two] == [b.indices.tolist() for b in three]
    resumed = epoch(count=2, first_batch=2)   # the skipped batches draw for two views, as the full epoch did
    assert all(torch.equal(x, y) for a, b in zip(resumed, two[2:]) for x, y in zip(a.views, b.views))
    if mode == "workers":   # per-sample seeds: the first views do not depend on how many follow
        assert all(torch.equal(x, y) for a, b in zip(two, three) for x, y in zip(a.views, b.views[:2]))
    else:                   # one generator per epoch: from the second batch on, the draws differ
        assert not torch.equal(two[1].views[0], three[1].views[0])
    assert {len(b.views) for b in epoch(count=3)} == {3}


@pytest.mark.parametrize("count", [0, 4, 2.0, True])
@pytest.mark.parametrize("mode", ["device", "workers"])
def test_a_bad_view_count_is_refused(count, mode):
    loader = _loader(_toy(60), mode=mode, views=3)
    with pytest.raises(ValueError, match=rf"view count: expected an int in \[1, 3\], got {count!r}"):
        loader.set_views(count)


def _phased(data, phases, **kwargs):
    kwargs.setdefault("rank", 0)
    return build_train_loader(data, AUG, batch_size_per_rank=kwargs.pop("batch", 8), num_views=2,
                              device=torch.device("cpu"), seed=3, phases=phases, **kwargs)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_phases_visit_their_rows_in_turn_in_whole_global_batches(world_size):
    # 109 rows: [70, 109) first (39 rows), then [0, 70). The oracle is the definition: every global batch
    # (batch b of every rank) lies in one phase, the first phase's batches come first, each phase
    # gives floor(size / (W x 8)) global batches of distinct rows, and the epochs reshuffle.
    data = _toy(109, size=8)
    phases = [(70, 109), (0, 70)]
    loaders = [_phased(data, phases, rank=r, world_size=world_size) for r in range(world_size)]
    expected = [39 // (world_size * 8), 70 // (world_size * 8)]
    for epoch in (0, 1):
        batches = []
        for loader in loaders:
            loader.set_epoch(epoch)
            batches.append([b.indices for b in loader])
        assert all(len(rank_batches) == len(loaders[0]) == sum(expected) for rank_batches in batches)
        kinds = []
        for b in range(sum(expected)):
            rows = torch.cat([rank_batches[b] for rank_batches in batches])
            assert bool((rows >= 70).all()) or bool((rows < 70).all())
            kinds.append(int(rows[0] >= 70))
        assert kinds == [1] * expected[0] + [0] * expected[1]
        seen = torch.cat([i for rank_batches in batches for i in rank_batches]).tolist()
        assert len(set(seen)) == len(seen)
    one = _phased(data, phases, world_size=1)
    assert not torch.equal(_epoch_indices(one, 0), _epoch_indices(one, 1))


@pytest.mark.parametrize("mode, workers", [("device", 0), ("workers", 2)])
def test_phased_epochs_agree_in_both_loaders_and_resume_mid_epoch(mode, workers):
    data = _toy(90, size=8)
    phases = [(60, 90), (0, 60)]
    device = _phased(data, phases, world_size=2)
    loader = _phased(data, phases, world_size=2, mode=mode, num_workers=workers)
    assert len(loader) == len(device) == 1 + 3
    assert torch.equal(_epoch_indices(loader, 2), _epoch_indices(device, 2))
    loader.set_epoch(2)
    full = list(loader)
    for first in (1, 3):
        fresh = _phased(data, phases, world_size=2, mode=mode, num_workers=workers)
        fresh.set_epoch(2, first_batch=first)
        for a, b in zip(full[first:], list(fresh), strict=True):
            assert torch.equal(a.indices, b.indices) and all(torch.equal(x, y) for x, y in zip(a.views, b.views))


@pytest.mark.parametrize("phases, message", [
    ([(0, 50), (60, 90)], r"phases: expected \(start, stop\) row ranges that tile \[0, 90\), got"),
    ([(0, 60), (50, 90)], r"tile \[0, 90\)"),
    ([(0, 90), (90, 90)], r"tile \[0, 90\)"),
    ([(80, 90), (0, 80)], r"phases: rows \[80, 90\) do not fill one batch of 8 on each of 2 rank\(s\); lower the"),
])
def test_bad_phases_are_refused(phases, message):
    with pytest.raises(ValueError, match=message):
        _phased(_toy(90, size=8), phases, world_size=2)
