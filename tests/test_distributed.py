"""Real two-process runs (torchrun, gloo on the CPU) against one process."""
import os
import subprocess
import sys

import pytest
import torch

from tests.torchrun_util import REPO_ROOT, run_torchrun
from utils import distributed as du

SCRIPTS = REPO_ROOT / "tests" / "dist_scripts"


def run_one_process(script, *args):
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin",
                                                       "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_propos_step_gradients_equal_on_one_and_two_ranks(tmp_path):
    run_one_process(SCRIPTS / "propos_grad.py", tmp_path / "one.pt")
    run_torchrun(SCRIPTS / "propos_grad.py", tmp_path / "two.pt", nproc=2)
    one = torch.load(tmp_path / "one.pt")
    two = torch.load(tmp_path / "two.pt")
    assert one["psl"] == pytest.approx(two["psl"], rel=1e-5)
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 0
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_all_gather_rows_single_process_is_identity():
    x = torch.arange(10.0).view(5, 2)
    assert torch.equal(du.all_gather_rows(x, 5), x)
    with pytest.raises(RuntimeError, match="expected 6 rows"):
        du.all_gather_rows(x, 6)


def test_feature_extraction_two_ranks_equals_one_process(tmp_path):
    # N is not a multiple of 2 x batch: a padded DistributedSampler would duplicate rows; we must not.
    # N=3 on 2 ranks leaves rank 1 one row of a two-row shard. A shuffled pass (DCCM's) visits other
    # batches on each rank, but its rows come back in dataset order all the same. N=1 leaves rank 1 no row
    # at all: its empty block still has the features' width. The cases share a run.
    cases = [(301, 32, None), (3, 2, None), (301, 32, 7), (1, 2, None)]
    args = [":".join(str(v) for v in case if v is not None) for case in cases]
    run_one_process(SCRIPTS / "extract_features.py", tmp_path, "one", *args)
    run_torchrun(SCRIPTS / "extract_features.py", tmp_path, "two", *args, nproc=2)
    for n, batch, seed in cases:
        one, two = (torch.load(tmp_path / f"{prefix}_{n}_{batch}_{seed}.pt") for prefix in ("one", "two"))
        assert one.shape == two.shape == (n, 512)
        torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-5, msg=f"N={n}, batch {batch}, shuffle seed {seed}")


def test_a_shuffled_feature_pass_sees_mixed_near_equal_batches_and_returns_rows_in_dataset_order():
    from data.config import DataConfig
    from data.datasets import build_dataset
    from utils.features import extract_features

    data = build_dataset(DataConfig(name="mnist_5k"), split="train").subset(range(0, 5000, 5))   # sorted by class
    assert torch.equal(data.labels, data.labels.sort().values)
    batches = []

    def centred(images):   # batch-dependent, as batch norm without running statistics
        batches.append(images.shape[0])
        flat = images.flatten(1)[:, 300:303]
        return flat - flat.mean(dim=0)

    cpu = torch.device("cpu")
    shuffled = extract_features(centred, data, batch_size=400, device=cpu, shuffle_seed=3)
    assert batches == [334, 334, 332]
    pixels = extract_features(lambda x: x.flatten(1)[:, 300:303], data, batch_size=1000, device=cpu)
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(3))
    expected = torch.empty_like(pixels)
    for rows in order.split(334):
        expected[rows] = pixels[rows] - pixels[rows].mean(dim=0)
    torch.testing.assert_close(shuffled, expected)
    assert len(data.labels[order[:334]].unique()) == 10   # each batch mixes the classes
    batches.clear()
    extract_features(centred, data, batch_size=400, device=cpu)
    assert batches == [400, 400, 200]   # unshuffled: dataset order, plain batches


def test_a_feature_pass_runs_in_float32_unless_given_an_amp_dtype():
    """Against the layer on the images by hand (pixels in [0, 1]): exact in float32; under bfloat16
    autocast, the layer computes in bfloat16 and the rows come back float32, close but not equal."""
    from data.config import DataConfig
    from data.datasets import build_dataset
    from utils.features import extract_features

    data = build_dataset(DataConfig(name="mnist_5k", limit=50), split="train")
    torch.manual_seed(0)
    layer = torch.nn.Linear(784, 16)
    dtypes = []

    def project(images):
        out = layer(images.flatten(1))
        dtypes.append(out.dtype)
        return out

    with torch.no_grad():
        by_hand = layer(data.images.float().div(255).flatten(1))
    cpu = torch.device("cpu")
    plain = extract_features(project, data, batch_size=20, device=cpu, normalize=False)
    assert dtypes == [torch.float32] * 3 and plain.dtype == torch.float32
    torch.testing.assert_close(plain, by_hand, rtol=1e-5, atol=1e-6)
    dtypes.clear()
    amp = extract_features(project, data, batch_size=20, device=cpu, normalize=False, amp_dtype=torch.bfloat16)
    assert dtypes == [torch.bfloat16] * 3 and amp.dtype == torch.float32
    torch.testing.assert_close(amp, by_hand, rtol=0.05, atol=0.05)
    assert not torch.allclose(amp, by_hand, rtol=1e-5, atol=1e-6)


def test_a_process_that_started_a_group_exits_with_its_status_and_its_output_flushed(tmp_path):
    """By os._exit, after the group is destroyed: each rank's exit status is its own, and what it printed
    (to a block-buffered stdout) and logged is all there, whether its group was destroyed before or not."""
    proc = run_torchrun(SCRIPTS / "exit_process.py", tmp_path, nproc=2, check=False)
    assert proc.returncode != 0 and "exitcode  : 3" in proc.stderr and "rank      : 1" in proc.stderr, proc.stderr
    assert "rank 0 ends" in proc.stdout and "rank 1 ends" in proc.stdout, proc.stdout
    for r in range(2):
        assert (tmp_path / f"rank{r}.log").read_text() == f"rank {r} gathered [0, 1]\n"
    with pytest.raises(SystemExit) as ended:  # one process that never started a group: sys.exit
        du.exit_process(5)
    assert ended.value.code == 5


@pytest.mark.parametrize("raised", ["SystemExit('error: data: no such file')", "SystemExit(75)", "SystemExit(None)",
                                    "SystemExit(0)", "ValueError('bad value')", "KeyboardInterrupt()"])
def test_the_command_line_status_and_output_are_pythons_own(monkeypatch, capsys, raised):
    """main.command_line_status prints and returns what Python itself does for an exception left uncaught
    at the top of a script (a real interpreter is the oracle); 130 for an interrupt (128 + SIGINT)."""
    import main as launcher

    def failing_main(argv=None):
        raise eval(raised)

    monkeypatch.setattr(launcher, "main", failing_main)
    status = launcher.command_line_status([])
    stderr = capsys.readouterr().err
    python = subprocess.run([sys.executable, "-c", f"raise {raised}"], capture_output=True, text=True)
    expected = 130 if raised.startswith("KeyboardInterrupt") else python.returncode
    assert status == expected
    last_line = (stderr.strip().splitlines() or [""])[-1]
    assert last_line == (python.stderr.strip().splitlines() or [""])[-1]
    assert ("Traceback (most recent call last)" in stderr) == ("Traceback" in python.stderr)


def test_the_command_line_status_of_a_finished_main(monkeypatch):
    import main as launcher

    for returned, status in (({"nmi": 1.0}, 0), ({}, 0), (None, 1)):
        monkeypatch.setattr(launcher, "main", lambda argv=None: returned)
        assert launcher.command_line_status([]) == status


def test_launch_env_from_slurm_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        # setenv first so that monkeypatch records the original state and removes what
        # read_launch_env writes into os.environ (else later in-process runs see WORLD_SIZE=8)
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[012-015],cpu001")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert du.read_launch_env() == (5, 8, 1, 4)
    import os
    assert os.environ["MASTER_ADDR"] == "gpu012" and os.environ["RANK"] == "5" and os.environ["LOCAL_RANK"] == "1"


def test_launch_env_prefers_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert du.read_launch_env() == (1, 2, 1, 2)


@pytest.mark.parametrize("name, expected", [("cpu", torch.device("cpu")), ("cuda", torch.device("cuda")),
                                            ("cuda:0", torch.device("cuda", 0))])
def test_check_device_accepts_what_exists(name, expected, monkeypatch):
    # One visible GPU, faked, so that the CUDA spellings are checked on a CPU-only machine too.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert du.check_device(name, "--device") == expected


@pytest.mark.parametrize("name, gpus, error, message", [
    ("cuad", 1, ValueError, r"^--device: expected cpu, cuda or cuda:N, got 'cuad'$"),
    ("mps", 1, ValueError, r"^--device: expected cpu, cuda or cuda:N, got 'mps'$"),
    ("", 1, ValueError, r"^--device: expected cpu, cuda or cuda:N, got ''$"),
    ("cuda", 0, du.DeviceUnavailableError, r"^--device=cuda: torch \S+ sees no usable CUDA device "
                                           r"\(torch.cuda.is_available\(\) is False\)$"),
    ("cuda:1", 1, du.DeviceUnavailableError, r"^--device=cuda:1: only 1 CUDA device\(s\) are visible$"),
])
def test_check_device_refuses_in_one_line(name, gpus, error, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(error, match=message):
        du.check_device(name, "--device")


def test_init_distributed_refuses_cuda_without_a_usable_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(du.DeviceUnavailableError, match=r"^run.device=cuda: torch \S+ sees no usable CUDA device"):
        du.init_distributed("cuda")


@pytest.fixture()
def digit_folder(tmp_path):
    """(a folder of 23 real digits as PNG files, their copy decoded by one process)."""
    import numpy as np
    from PIL import Image

    from data.config import DataConfig
    from data.datasets import build_dataset, decode_files, shared_data_dir

    digits = np.load(shared_data_dir() / "mnist.npz")["x_train"][:23]
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, image in enumerate(digits):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    return folder, decode_files(build_dataset(DataConfig(name="imagefolder", root=str(folder)), split="train"))


def shared_memory_files() -> set[str]:
    return {name for name in os.listdir(du.SHARED_MEMORY_DIR) if name.startswith("clustering-")}


def decoded_once_each(ranks: list[dict], folder) -> bool:
    from collections import Counter

    decoded = Counter(name for rank in ranks for name in rank["decoded"])
    return sorted(decoded) == sorted(p.name for p in folder.iterdir()) and set(decoded.values()) == {1}


def test_decode_once_on_two_ranks_decodes_each_file_once_and_gives_both_the_one_process_copy(tmp_path, digit_folder):
    """23 real digits (a 12-row and an 11-row shard), exchanged in blocks of 2 rows: the two ranks decode
    each file once between them, into one copy in memory that both map (each sees the other's writes),
    equal to the copy one process decodes alone; nothing is left in /dev/shm. A file that cannot be
    decoded, in rank 1's shard, stops both ranks with the same line naming it."""
    folder, oracle = digit_folder
    block_bytes = 2 * oracle.images[0].numel()
    before = shared_memory_files()
    run_torchrun(SCRIPTS / "decode_shards.py", folder, tmp_path, block_bytes, nproc=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert decoded_once_each(ranks, folder) and len(ranks[0]["decoded"]) == 12
    for rank in ranks:
        assert torch.equal(rank["images"], oracle.images)
        assert rank["sees"] == [0, 1]
    assert shared_memory_files() == before

    (folder / "zz_bad.png").write_bytes(b"not a png")
    run_torchrun(SCRIPTS / "decode_shards.py", folder, tmp_path, block_bytes, nproc=2)
    errors = [torch.load(tmp_path / f"rank{r}.pt")["error"] for r in range(2)]
    assert errors[0] == errors[1] and errors[0].startswith(f"{folder / 'zz_bad.png'}: not a readable image")
    assert shared_memory_files() == before


def test_a_rank_that_does_not_see_its_nodes_shared_file_keeps_its_own_copy(tmp_path):
    """A rank with a /dev/shm of its own finds no file at the path its node's first rank made, or
    another file: it maps neither (torch.from_file would create the missing one, empty)."""
    token = b"0123456789abcdef"
    missing, other = tmp_path / "missing", tmp_path / "other"
    other.write_bytes(b"x" * 64)
    assert du._map_shared_file(str(missing), token, 64, torch.uint8) is None and not missing.exists()
    assert du._map_shared_file(str(other), token, 64, torch.uint8) is None
    other.write_bytes(token + b"x" * 48)
    mapped = du._map_shared_file(str(other), token, 64, torch.uint8)
    mapped[-1] = ord("y")
    assert other.read_bytes() == token + b"x" * 47 + b"y"  # the same memory as the file's


@pytest.mark.parametrize("env, sharing, loads, read_into", [
    ({}, [[0, 1], [0, 1]], [2, 0], [True, False]),
    ({"SHARED_MEMORY_DIR": "missing"}, [[0], [1]], [2, 2], [True, True]),
    ({"NODES": "a,a,b"}, [[0, 1], [0, 1], [2]], [2, 0, 2], [True, False, True]),
    ({"NODES": "a,b,b", "PRIVATE_ALLOCATION": "1"}, [[0], [1, 2], [1, 2]], [2, 2, 0], [True, False, False])],
    ids=["shared", "no-shared-memory", "two-nodes", "a-node-copies"])
def test_in_memory_images_are_loaded_once_per_node_and_equal_one_processs(tmp_path, env, sharing, loads, read_into):
    """Two ranks need 64 training and 64 test digits (two sets): rank 0 reads them straight into one copy
    per set that both map (each sees the other's writes), equal to what one process loads; nothing is
    left in /dev/shm. Without shared memory rank 1 loads its own; with three ranks acting nodes of two
    and one, the third loads for its node. A node whose build reads into memory of its own (not the
    tensor it is given) has its images copied into a shared one, while the other node's build reads
    straight into its own copy."""
    import main as launcher
    from data.datasets import shared_data_dir
    from utils.config import load_config

    overrides = ["data.name=mnist", f"data.root={shared_data_dir() / 'mnist.npz'}", "data.limit=64",
                 "data.split=train", "data.eval_split=test"]
    config = REPO_ROOT / "config" / "mnist_cnn_propos.yml"
    oracle = launcher.build_datasets(load_config(config, overrides))
    before = shared_memory_files()
    env = {key: str(tmp_path / value) if key == "SHARED_MEMORY_DIR" else value for key, value in env.items()}
    run_torchrun(SCRIPTS / "share_images.py", config, tmp_path, *overrides, nproc=len(sharing), env=env)
    for r in range(len(sharing)):
        rank = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.equal(rank["train"], oracle.train.images) and torch.equal(rank["eval"], oracle.eval.images)
        assert rank["sees"] == {"train": sharing[r], "eval": sharing[r]}
        assert len(rank["loads"]) == loads[r]
        assert rank["read_into"] == {"train": read_into[r], "eval": read_into[r]}
    assert not torch.equal(oracle.train.images, oracle.eval.images)
    assert shared_memory_files() == before


def test_data_the_loading_rank_cannot_read_stops_every_rank_with_its_line(tmp_path):
    """Only rank 0 reads the file; rank 1 learns of the failure from it rather than waiting for images."""
    missing = tmp_path / "no_such.npz"
    run_torchrun(SCRIPTS / "share_images.py", REPO_ROOT / "config" / "mnist_cnn_propos.yml", tmp_path,
                 "data.name=npz", f"data.root={missing}", nproc=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["error"] == ranks[1]["error"] and ranks[0]["error"].startswith(f"error: data: no_such: {missing} "
                                                                                   "not found; set data.root")
    assert [len(rank["loads"]) for rank in ranks] == [1, 0]
    # a file the loading rank may not read: an OSError other than FileNotFoundError, the same one line everywhere
    from data.datasets import shared_data_dir

    digits = shared_data_dir() / "mnist.npz"
    run_torchrun(SCRIPTS / "share_images.py", REPO_ROOT / "config" / "mnist_cnn_propos.yml", tmp_path,
                 "data.name=npz", f"data.root={digits}", nproc=2, env={"UNREADABLE": "1"})
    assert [torch.load(tmp_path / f"rank{r}.pt")["error"] for r in range(2)] == [
        f"error: data: [Errno 13] Permission denied: '{digits}'"] * 2
    # the launcher: the ranks print the line and exit with status 1 (torchrun may stop the second once the
    # first has), their process group torn down after a barrier: a rank leaving while the other was still
    # in the gather aborted ("terminate called without an active exception") in about half the runs
    proc = run_torchrun(REPO_ROOT / "main.py", REPO_ROOT / "config" / "mnist_cnn_propos.yml", "data.name=npz",
                        f"data.root={missing}", f"run.output_dir={tmp_path / 'runs'}", nproc=2, check=False)
    assert proc.returncode == 1 and f"error: data: no_such: {missing} not found" in proc.stderr, proc.stderr
    assert "terminate called" not in proc.stderr and "(SIGABRT)" not in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("env, copies", [({"AVAILABLE_MEMORY": "60000"}, "one copy on this node"),
                                         ({"AVAILABLE_MEMORY": "100000", "SHARED_MEMORY_DIR": "missing"},
                                          "0.0001 GB for the 2 ranks on this node, a copy each: {dir} has too little "
                                          "room to share one")], ids=["shared", "a-copy-per-rank"])
def test_a_set_beyond_the_memory_available_stops_every_rank_before_any_image_is_read(tmp_path, env, copies):
    """64 digits take 50,176 bytes: more than 80% of 60,000 bytes; shared, they fit in 80% of 100,000, but
    not a copy for each of the two ranks. Both ranks stop with the loading rank's line, and only it built."""
    from data.datasets import shared_data_dir

    env = {key: str(tmp_path / value) if key == "SHARED_MEMORY_DIR" else value for key, value in env.items()}
    run_torchrun(SCRIPTS / "share_images.py", REPO_ROOT / "config" / "mnist_cnn_propos.yml", tmp_path,
                 "data.name=mnist", f"data.root={shared_data_dir() / 'mnist.npz'}", "data.limit=64", nproc=2, env=env)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    available = int(env["AVAILABLE_MEMORY"]) / 1e9
    line = (f"error: data: loading 64 images of 1x28x28 takes 5.02e-05 GB "
            f"({copies.format(dir=tmp_path / 'missing')}), more than 80% of the {available:.3g} GB of memory "
            "available; set data.limit to hold fewer images")
    assert [rank["error"] for rank in ranks] == [line] * 2
    assert [len(rank["loads"]) for rank in ranks] == [1, 0]


def test_a_file_that_fails_once_read_into_the_shared_copy_stops_every_rank_with_its_line(tmp_path):
    """The loading rank has asked for the node's shared copy (both ranks mapped it) when it finds the file cut
    short: both ranks stop with its line, and /dev/shm is left as it was."""
    import io
    import zipfile

    import numpy as np

    path = tmp_path / "cut.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key, array in (("x_train", np.zeros((6, 8, 8, 3), np.uint8)), ("y_train", np.zeros(6, np.uint8))):
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(f"{key}.npy", buffer.getvalue()[:-100] if key == "x_train" else buffer.getvalue())
    before = shared_memory_files()
    run_torchrun(SCRIPTS / "share_images.py", REPO_ROOT / "config" / "mnist_cnn_propos.yml", tmp_path,
                 "data.name=npz", f"data.root={path}", "data.split=train", "data.eval_split=train", nproc=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [rank["error"] for rank in ranks] == [f"error: data: {path}: x_train ended after 5 of its 6 images; "
                                                 "the file is truncated"] * 2
    assert [len(rank["loads"]) for rank in ranks] == [1, 0]
    assert shared_memory_files() == before


def test_decode_once_shares_a_copy_per_node_and_exchanges_the_shards_between_copies(tmp_path, digit_folder):
    """Three ranks acting a node of two and a node of one: the two share a copy (each sees the other's
    writes, not the third's), and one of them writes the third rank's rows into it, as the third writes
    theirs into its own. Each file is decoded once, and every copy equals one process's."""
    folder, oracle = digit_folder
    sharing = [[0, 1], [0, 1], [2]]
    before = shared_memory_files()
    run_torchrun(SCRIPTS / "decode_shards.py", folder, tmp_path, 2 * oracle.images[0].numel(), nproc=len(sharing),
                 env={"NODES": "a,a,b"}, timeout=180)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(sharing))]
    assert decoded_once_each(ranks, folder)
    for rank in ranks:
        assert torch.equal(rank["images"], oracle.images)
    assert [rank["sees"] for rank in ranks] == sharing
    assert shared_memory_files() == before


