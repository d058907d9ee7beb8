"""utils.checkpoint: the atomic writers (a write that fails part-way leaves the previous file as it was
and no temporary file in the run directory), the RNG states a resume restores, and what a checkpoint
may hold."""
import random

import numpy as np
import pytest
import torch

from data.datasets import ImageData
from utils.assignments import write_features
from utils.checkpoint import (CHECKPOINT_KEYS, gather_rng_states, load_checkpoint, restore_rng_state, save_checkpoint,
                              write_text_atomic)


def test_a_failed_text_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "config.yml"
    write_text_atomic(path, "old: 1\n")
    assert path.read_text() == "old: 1\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.yml"]
    # fails once the temporary file is open: a lone surrogate outside the U+DC80-U+DCFF that the writer's
    # surrogateescape turns back into a file name's bytes
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, "new: 2\n" * 100 + "\ud800")
    assert path.read_text() == "old: 1\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.yml"]


def test_a_failed_features_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    data = ImageData(name="toy", labels=torch.tensor([0, 1, -1]), num_classes=2, class_names=["a", "b"], mean=(0.5,),
                     std=(0.2,), channels=1, image_size=2, images=torch.zeros(3, 1, 2, 2, dtype=torch.uint8))
    path = tmp_path / "last.features.npz"
    write_features(path, torch.ones(3, 4), data, "backbone")

    def half_then_full_disk(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_features(path, torch.zeros(3, 4), data, "backbone")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.features.npz"]
    with np.load(path) as saved:
        assert saved["features"].tolist() == [[1.0] * 4] * 3 and saved["labels"].tolist() == [0, 1, -1]


def test_a_failed_checkpoint_save_leaves_the_old_checkpoint_and_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    state = {key: torch.tensor([1.0]) for key in CHECKPOINT_KEYS}
    save_checkpoint(state, path)
    with pytest.raises(Exception):  # torch.save cannot pickle a lambda: it fails after opening the file
        save_checkpoint({**state, "model": {"w": torch.ones(3), "f": lambda: 0}}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert torch.equal(load_checkpoint(path)["model"], torch.tensor([1.0]))


def draws() -> list:
    """A few numbers from each generator a run uses; numpy's first normal is the one it cached."""
    return [torch.rand(3).tolist(), torch.randint(0, 1000, (2,)).tolist(), np.random.normal(),
            np.random.rand(2).tolist(), np.random.normal(), random.random(), random.randint(0, 10**9)]


def test_rng_states_restore_every_generator_through_a_saved_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draws()
    np.random.normal()  # numpy's legacy Box-Muller makes two normals and caches the second
    assert np.random.get_state()[3] == 1
    states = gather_rng_states()  # one process: its own state alone
    assert len(states) == 1
    expected = draws()
    path = tmp_path / "new" / "run" / "last.pt"  # folders that do not exist yet
    save_checkpoint({**{key: 0 for key in CHECKPOINT_KEYS}, "rng": states}, path)
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    assert draws() != expected
    restore_rng_state(load_checkpoint(path)["rng"][0])
    assert draws() == expected


class Payload:
    """An arbitrary object: unpickling it could run any code, so a checkpoint may not hold one."""


def test_a_checkpoint_holding_an_arbitrary_object_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({**{key: 0 for key in CHECKPOINT_KEYS}, "model": Payload()}, path)
    with pytest.raises(ValueError, match=rf"^{tmp_path}/last.pt: not a readable checkpoint \(UnpicklingError: "):
        load_checkpoint(path)
    torch.save({key: 0 for key in CHECKPOINT_KEYS if key != "rng"}, path)
    with pytest.raises(ValueError, match=r"last.pt: not a checkpoint of this framework \(missing keys \['rng'\]\)$"):
        load_checkpoint(path)
