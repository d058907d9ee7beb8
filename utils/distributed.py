"""Everything that touches torch.distributed lives here.

Every function works in a one-process run (no process group) as the identity, so the same code path
serves `python main.py` on a laptop, `torchrun` on a node, and `srun` under SLURM.
"""
from __future__ import annotations

import logging
import math
import os
import re
import socket
import sys
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Whether this process has started a process group (it may since have destroyed it): `exit_process`.
_process_group_started = False


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    """First set variable among `names` as an int; SLURM writes counts like '4(x2)': take the leading number."""
    for name in names:
        value = os.environ.get(name, "")
        match = re.match(r"\d+", value)
        if match:
            return int(match.group())
    return default


def _slurm_master_addr() -> str:
    """First host of SLURM_JOB_NODELIST (e.g. 'gpu[012-015]' -> 'gpu012'), without calling scontrol."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST", os.environ.get("SLURM_NODELIST", "127.0.0.1"))
    first = nodelist.split(",")[0]
    if "[" in first:
        prefix, rest = first.split("[", 1)
        first = prefix + rest.rstrip("]").split(",")[0].split("-")[0]
    return first


def read_launch_env() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun's or SLURM's variables.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; `srun python main.py` without torchrun sets only the
    SLURM_* variables, which we translate (and point MASTER_ADDR at the job's first node).
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank = _env_int("RANK", default=0)
        world = _env_int("WORLD_SIZE", default=1)
        local_rank = _env_int("LOCAL_RANK", default=0)
        local_world = _env_int("LOCAL_WORLD_SIZE", default=1)
        return rank, world, local_rank, local_world
    if "SLURM_PROCID" in os.environ and _env_int("SLURM_NTASKS", default=1) > 1:
        rank = _env_int("SLURM_PROCID", default=0)
        world = _env_int("SLURM_NTASKS", default=1)
        local_rank = _env_int("SLURM_LOCALID", default=0)
        local_world = _env_int("SLURM_NTASKS_PER_NODE", default=max(1, world // _env_int("SLURM_NNODES", default=1)))
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
        os.environ.setdefault("MASTER_PORT", str(29500 + _env_int("SLURM_JOB_ID", default=0) % 1000))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
        return rank, world, local_rank, local_world
    return 0, 1, 0, 1


def available_cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


class DeviceUnavailableError(RuntimeError):
    """A device was asked for that this machine's torch cannot use; the message is one line for the user."""


def check_device(name: str, label: str) -> torch.device:
    """`name` ("cpu", "cuda" or "cuda:N") as a torch.device that exists here.

    `label` names the flag or config key the user set ("--device", "run.device"). Raises
    ValueError for anything else (a typo, "mps"), DeviceUnavailableError when this torch sees no
    usable CUDA device (none present, or a driver older than the CUDA torch was built for), or
    too few of them for the index.
    """
    try:
        # torch's own parser, so that the accepted spellings ("cuda:01") stay torch's.
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"{label}: expected cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"{label}={name}: torch {torch.__version__} sees no usable CUDA device "
                                     "(torch.cuda.is_available() is False)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"{label}={name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def init_distributed(device: str = "auto", threads_per_rank: int = 0) -> DistInfo:
    """Initialise the process group when launched with several processes; pick this rank's device.

    NCCL when the device is CUDA, gloo otherwise. One GPU per rank from LOCAL_RANK. On a CPU the
    thread count is set from the cores available (torchrun leaves each worker a single thread).
    """
    rank, world, local_rank, local_world = read_launch_env()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda":
        check_device(device, "run.device")  # DeviceUnavailableError: the launcher prints it as one line
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
        threads = threads_per_rank or max(1, available_cpu_cores() // max(1, local_world))
        torch.set_num_threads(threads)
    if world > 1 and not dist.is_initialized():
        global _process_group_started
        _process_group_started = True
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world, device=dev)


def cleanup_distributed(*, synchronize: bool = True) -> None:
    """Destroy the process group, if there is one. `synchronize`: after a barrier, so that the ranks tear
    it down together; a rank that destroyed its gloo group (or exited) while another was still busy
    aborted at times ("terminate called without an active exception", SIGABRT). False where the other
    ranks may never reach this point (an error's exit)."""
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def exit_process(status: int) -> NoReturn:
    """End this process with exit status `status`, its process group (if any) destroyed without a barrier.

    A process that has started a process group (through `setup_distributed`, or one of its own that is still
    initialized when this is called, as a stand-alone script's) ends by os._exit, once stdout, stderr and the
    log handlers are flushed, not through the interpreter's finalization: a gloo worker thread frees a finished
    collective's tensors some time after the collective returns, and doing so needs the GIL, which a finalizing
    interpreter no longer hands out; the thread then ends mid-destructor and the process aborts (SIGABRT,
    "terminate called without an active exception", in about 1 error exit in 20 of two ranks on a loaded 2-core
    machine). Nothing that only finalization would run is left: the run's files are written and closed by then.
    Other processes exit as usual (sys.exit)."""
    group_started = _process_group_started or (dist.is_available() and dist.is_initialized())
    cleanup_distributed(synchronize=False)
    if not group_started:
        sys.exit(status)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy); identity in one process."""
    if not is_dist():
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Flag by flag, True on every rank where it is true on at least one (one MAX all-reduce of
    len(flags) numbers on `device`, the process group's device); the flags themselves in one
    process. Collective."""
    if not is_dist():
        return [bool(f) for f in flags]
    t = torch.tensor([int(bool(f)) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def broadcast_object(obj, src: int = 0):
    if not is_dist():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_dist():
        dist.broadcast(t, src=src)
    return t


def all_gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from all ranks along dim 0 (rank order); no gradient."""
    if not is_dist():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for each slice.

    Each rank computes the same loss of the gathered tensor; the gradient of that loss w.r.t. this
    rank's rows is the sum of what every rank's copy of the loss sends back. Together with DDP's
    mean over ranks, W ranks with B rows each give exactly the gradient of one process with W*B rows.
    (The ProPos reference keeps only the local slice, which scales this gradient by 1/W.)
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        ctx.rows = t.shape[0]
        return all_gather_no_grad(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank = dist.get_rank()
        return grad[rank * ctx.rows:(rank + 1) * ctx.rows]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) per rank -> (W*B, ...) in rank order, differentiable (see _GatherWithGrad)."""
    if not is_dist():
        return t
    return _GatherWithGrad.apply(t)


def _rows_per_shard(n: int, world: int) -> int:
    """Rows of every rank's contiguous shard of n rows but the last: ceil(n / W), at least 1 (gloo has
    crashed on zero-element tensors, so no gathered block is ever empty)."""
    return max(1, -(-n // world))


def all_gather_rows(local: torch.Tensor, total_rows: int) -> torch.Tensor:
    """Gather per-rank contiguous shards of a dataset-ordered tensor into exactly `total_rows` rows.

    Rank r holds rows [r*ceil(N/W), min(N, (r+1)*ceil(N/W))) (possibly none); the result is every row
    once, in dataset order (`all_gather_shards_into` through `local`'s device).
    """
    world = get_world_size()
    if world == 1:
        if local.shape[0] != total_rows:
            raise RuntimeError(f"expected {total_rows} rows in a one-process gather, got {local.shape[0]}")
        return local
    per_rank = _rows_per_shard(total_rows, world)
    start = min(total_rows, get_rank() * per_rank)
    out = local.new_empty((total_rows, *local.shape[1:]))
    out[start:start + local.shape[0]] = local.detach()
    return all_gather_shards_into(out, local.device)


def all_gather_object(obj) -> list:
    """Every rank's picklable `obj`, in rank order ([obj] in one process). Collective."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_shards_into(out: torch.Tensor, device: torch.device, *, block_bytes: int = 64 << 20,
                           present: Collection[int] = ()) -> torch.Tensor:
    """Complete `out` (N, ...) on every rank, each rank having filled its own contiguous shard of it (the
    rows of `all_gather_rows`: [r * ceil(N/W), min(N, (r + 1) * ceil(N/W)))). The shards travel through
    `device`, the process group's (NCCL gathers CUDA tensors), in blocks of at most `block_bytes` per
    rank, so `out` (a decoded image set, say) never sits on the device whole. The shards of the ranks in
    `present` are already in `out` (memory shared with them) and are not copied; every rank still takes
    part. Collective; returns `out`."""
    world = get_world_size()
    if world == 1:
        return out
    n, rank = out.shape[0], get_rank()
    per_rank = _rows_per_shard(n, world)
    row_bytes = max(1, out[0].numel() * out.element_size()) if n else 1
    block = max(1, min(per_rank, block_bytes // row_bytes))
    send = torch.zeros((block, *out.shape[1:]), dtype=out.dtype, device=device)
    parts = [torch.empty_like(send) for _ in range(world)]

    def block_rows(r: int, offset: int) -> tuple[int, int]:
        """Global rows [start, stop) of rank r's shard in the block at `offset` (none past its end or N)."""
        return min(n, r * per_rank + offset), min(n, r * per_rank + min(per_rank, offset + block))

    for offset in range(0, per_rank, block):
        start, stop = block_rows(rank, offset)
        send[: stop - start].copy_(out[start:stop])
        dist.all_gather(parts, send)
        for r, part in enumerate(parts):
            start, stop = block_rows(r, offset)
            if r != rank and r not in present and stop > start:
                out[start:stop].copy_(part[: stop - start])
    return out


# tmpfs: files there are memory, and a mapping of one is memory that processes share.
SHARED_MEMORY_DIR = "/dev/shm"


def node_name() -> str:
    """The name of this rank's machine: ranks with the same one can share memory."""
    return socket.gethostname()


def shared_memory_free_bytes() -> int:
    """Free bytes in SHARED_MEMORY_DIR (0 where there is none): the most `node_shared_empty` can share."""
    try:
        stats = os.statvfs(SHARED_MEMORY_DIR)
    except OSError:
        return 0
    return stats.f_bavail * stats.f_frsize


def _create_shared_file(nbytes: int) -> tuple[str, bytes] | None:
    """(the path of a new file of `nbytes` reserved bytes in SHARED_MEMORY_DIR, the random bytes written
    at its start), or None (logged) where it cannot be made. The bytes are allocated now: a mapping past
    what tmpfs can give would be SIGBUS later."""
    if shared_memory_free_bytes() < nbytes:
        log.warning("%s has %.3g GB free, less than the %.3g GB to share: every rank of this node keeps "
                    "its own copy", SHARED_MEMORY_DIR, shared_memory_free_bytes() / 1e9, nbytes / 1e9)
        return None
    path = os.path.join(SHARED_MEMORY_DIR, f"clustering-{os.getpid()}-{uuid.uuid4().hex}")
    token = os.urandom(min(16, nbytes))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
            os.pwrite(fd, token, 0)
        except OSError:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("cannot share memory through %s (%s): every rank of this node keeps its own copy", path, exc)
        return None
    return path, token


def _map_shared_file(path: str, token: bytes, numel: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The file its node's first rank created, mapped, if this rank sees that file (its random start):
    a rank with a /dev/shm of its own would otherwise map a new, empty file of the same name."""
    try:
        with open(path, "rb") as file:  # never created here, as torch.from_file would
            if file.read(len(token)) != token:
                raise OSError("another file than the one made for this node")
        return torch.from_file(path, shared=True, size=numel, dtype=dtype)
    except (OSError, RuntimeError) as exc:
        log.warning("rank %d cannot map its node's shared memory %s (%s): it keeps its own copy",
                    get_rank(), path, exc)
        return None


def node_shared_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8, *,
                      nodes: list[str] | None = None) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(an uninitialised CPU tensor of `shape`, the ranks that share its memory: this one and those of
    its node that mapped the same file, in increasing order). Collective. `nodes`: every rank's
    `node_name()`, where the caller has gathered them already (else they are gathered here).

    The lowest rank of each node (`node_name`) creates a file of the tensor's size in SHARED_MEMORY_DIR,
    every rank of the node maps it (`torch.from_file`, shared: DataLoader workers forked later share it
    too), and the file is unlinked as soon as all have mapped it: the memory goes with the last mapping,
    and a run killed after that leaves nothing in the directory. A rank alone on its node, or whose
    node lacks the room, or which cannot see the file (a /dev/shm of its own), gets a private tensor."""
    rank = get_rank()
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if not is_dist():
        return torch.empty(shape, dtype=dtype), (rank,)
    nodes = nodes if nodes is not None else all_gather_object(node_name())
    on_node = [r for r, node in enumerate(nodes) if node == nodes[rank]]
    created = _create_shared_file(nbytes) if rank == on_node[0] and len(on_node) > 1 and nbytes else None
    try:
        made = all_gather_object(created)[on_node[0]]
        tensor = _map_shared_file(*made, numel, dtype) if made is not None else None
        mapped = made[0] if tensor is not None else None
        mapped_by = all_gather_object(mapped)
    finally:
        if created is not None:
            os.unlink(created[0])
    if tensor is None:
        return torch.empty(shape, dtype=dtype), (rank,)
    return tensor.view(shape), tuple(r for r, path in enumerate(mapped_by) if path == mapped)


def shuffle_across_ranks(x: torch.Tensor, generator: torch.Generator | None = None):
    """Shuffling BN, step 1: gather (B, ...) from every rank, permute the global batch, keep a slice.

    Returns (this rank's B rows of the shuffled global batch, `unshuffle`), where `unshuffle(y)`
    takes this rank's outputs (B, ...) for those rows and returns the outputs of its ORIGINAL rows.
    Every rank must pass the same B. The permutation is drawn on rank 0 and broadcast.
    """
    if not is_dist():
        return x, (lambda y: y)
    rank, rows = dist.get_rank(), x.shape[0]
    gathered = all_gather_no_grad(x)
    perm = torch.randperm(gathered.shape[0], device=x.device, generator=generator) if rank == 0 \
        else torch.empty(gathered.shape[0], dtype=torch.long, device=x.device)
    dist.broadcast(perm, src=0)
    inverse = torch.argsort(perm)

    def unshuffle(y: torch.Tensor) -> torch.Tensor:
        return all_gather_no_grad(y)[inverse][rank * rows:(rank + 1) * rows]

    return gathered[perm][rank * rows:(rank + 1) * rows], unshuffle


def run_on_shuffled_batch(fn, x: torch.Tensor, *, shuffle: bool = True) -> torch.Tensor:
    """Shuffling BN: `fn(x)` (B, ...) -> (B, ...) computed on a batch shuffled across ranks, returned
    in this rank's original row order; plain `fn(x)` on one rank or when `shuffle` is False."""
    if not (shuffle and is_dist()):
        return fn(x)
    shuffled, unshuffle = shuffle_across_ranks(x)
    return unshuffle(fn(shuffled))


@torch.no_grad()
def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BN running statistics) over ranks, so that evaluation and
    feature extraction use identical networks on every rank."""
    if not is_dist():
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(dist.get_world_size())
