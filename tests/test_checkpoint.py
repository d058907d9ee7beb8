"""utils.checkpoint's atomic writers: a write that fails part-way leaves the previous file as it was
and no temporary file in the run directory."""
import numpy as np
import pytest
import torch

from data.datasets import ImageData
from utils.assignments import write_features
from utils.checkpoint import CHECKPOINT_KEYS, load_checkpoint, save_checkpoint, write_text_atomic


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
