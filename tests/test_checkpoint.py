"""utils.checkpoint's atomic writers: a write that fails part-way leaves the previous file as it was
and no temporary file in the run directory."""
import pytest
import torch

from utils.checkpoint import CHECKPOINT_KEYS, load_checkpoint, save_checkpoint, write_text_atomic


def test_a_failed_text_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "config.yml"
    write_text_atomic(path, "old: 1\n")
    assert path.read_text() == "old: 1\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.yml"]

    def half_then_full_disk(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(path), "write_text", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(path, "new: 2\n" * 100)
    monkeypatch.undo()
    assert path.read_text() == "old: 1\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.yml"]


def test_a_failed_checkpoint_save_leaves_the_old_checkpoint_and_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    state = {key: torch.tensor([1.0]) for key in CHECKPOINT_KEYS}
    save_checkpoint(state, path)
    with pytest.raises(Exception):  # torch.save cannot pickle a lambda: it fails after opening the file
        save_checkpoint({**state, "model": {"w": torch.ones(3), "f": lambda: 0}}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert torch.equal(load_checkpoint(path)["model"], torch.tensor([1.0]))
