"""Tensor-parallel ranks over torch.distributed (`--tp N`): gloo on the CPU, NCCL on GPUs.

Rank 0 holds the scheduler, the KV allocator, sampling and the draft trees; every rank holds
one shard of the target (target/tp.py), of the EAGLE3 head when it divides (draft/eagle3_tp.py)
and its own K/V pools (its KV heads, the same slots).
Each step rank 0 broadcasts what its model runner is about to do (a forward with its attention
metadata, a logits call, a K/V copy: `Command`) and runs it on its own shard; the workers
(`serve_worker`) run the same on theirs, meeting at the shards' all-reduces and the logits'
all-gather. `--nnodes` / `--node-rank` / `--dist-init-addr` spread the ranks over machines as
SGLang names them: node 0 runs ranks 0..N/nnodes - 1 (rank 0 serves), node k the next ones.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)

# start-up (meeting, loading) and the collectives of a step must finish within this
_STEP_TIMEOUT = datetime.timedelta(minutes=10)
# idle workers wait in a broadcast for the next step: no timeout short of a server's lifetime (a
# dead rank 0 closes the connections, which ends the wait at once); commands go over a group of
# their own (gloo, also beside NCCL) with this timeout
_IDLE_TIMEOUT = datetime.timedelta(days=365)


class TPGroup:
    """This process's rank in the tensor-parallel group and its collectives."""

    def __init__(self, rank: int, world: int, commands: Any = None) -> None:
        self.rank = rank
        self.world = world
        self.commands = commands  # the process group `broadcast` uses (None: the default group)

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum over ranks (the row-parallel linears' partial outputs), in place."""
        if self.world > 1:
            x = x.contiguous()
            dist.all_reduce(x)
        return x

    def all_gather(self, x: Tensor) -> Tensor:
        """Concatenate the ranks' [..., n] along the last dim (vocabulary-parallel logits)."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (pickled: callers send host tensors, e.g. metadata before `.to`)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.commands)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (None elsewhere)."""
        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out


def init_group(rank: int, world: int, addr: str, device: torch.device,
               watch: list[mp.process.BaseProcess] | None = None) -> TPGroup:
    """Meet the other ranks at `addr` (rank 0 listens there). Rank 0 passes its local worker
    processes as `watch`: one that exits before the meeting is an error at once, not a wait."""
    backend = "nccl" if device.type == "cuda" else "gloo"

    def meet() -> None:
        dist.init_process_group(backend, init_method=f"tcp://{addr}", rank=rank, world_size=world,
                                timeout=_STEP_TIMEOUT)

    if not watch:
        meet()
    else:
        failure: list[BaseException] = []
        t = threading.Thread(target=lambda: _capture(meet, failure), daemon=True, name="specdec-tp-meet")
        t.start()
        while t.is_alive():
            t.join(0.2)
            dead = [p for p in watch if p.exitcode is not None]
            if dead and t.is_alive():
                raise RuntimeError(f"tensor-parallel worker {dead[0].name} exited (code {dead[0].exitcode}) "
                                   "before the ranks met; its log says why")
        if failure:
            raise failure[0]
    commands = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
    return TPGroup(rank, world, commands)


def _capture(fn: Any, failure: list[BaseException]) -> None:
    try:
        fn()
    except BaseException as e:  # re-raised by the caller's thread
        failure.append(e)


def close_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def free_addr() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def spawn_workers(ranks: range, world: int, addr: str, engine_kwargs: dict[str, Any]) -> list[mp.process.BaseProcess]:
    """Start one worker process per rank in `ranks` (spawned: a fresh interpreter each), each
    with this process's torch threads split over the node's ranks."""
    ctx = mp.get_context("spawn")
    threads = max(1, torch.get_num_threads() // max(1, len(ranks) + 1))
    procs: list[mp.process.BaseProcess] = []
    for rank in ranks:
        p = ctx.Process(target=serve_worker, args=(rank, world, addr, engine_kwargs, threads), daemon=True,
                        name=f"specdec-tp{rank}")
        p.start()
        procs.append(p)
    return procs


def serve_worker(rank: int, world: int, addr: str, engine_kwargs: dict[str, Any], threads: int | None = None,
                 spawned: bool = True) -> None:
    """A worker rank: build this rank's shard and pools, then run rank 0's commands until it
    says stop (or goes away)."""
    from .tp_worker import TPWorker

    logging.basicConfig(level=str(engine_kwargs.get("log_level", "info")).upper(),
                        format=f"[specdec tp{rank}] %(message)s")
    if threads is not None:
        torch.set_num_threads(threads)
    if spawned:  # rank 0 decides when this rank stops (a terminal's Ctrl-C reaches the whole group)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = TPWorker(rank, world, addr, engine_kwargs)
    try:
        worker.run()
    except RuntimeError as e:  # rank 0 went away without saying stop (killed, or crashed)
        if "Connection closed" not in str(e) and "Connection reset" not in str(e):
            raise
        log.warning("rank %d: rank 0 went away; stopping", rank)
    finally:
        close_group()


def serve_node(engine_kwargs: dict[str, Any]) -> int:
    """`specdec serve --node-rank K` (K > 0): run this machine's ranks until rank 0 stops."""
    from .engine_config import EngineConfig

    dc = EngineConfig.from_kwargs(**engine_kwargs).dist_config()
    assert dc.dist_init_addr is not None  # (DistConfig requires it with --nnodes > 1)
    first, *rest = dc.local_ranks()
    procs = spawn_workers(range(rest[0], rest[-1] + 1) if rest else range(0), dc.tp_size, dc.dist_init_addr,
                          engine_kwargs)
    log.info("node %d: ranks %d..%d of %d, meeting rank 0 at %s", dc.node_rank, first, first + len(rest),
             dc.tp_size, dc.dist_init_addr)
    serve_worker(first, dc.tp_size, dc.dist_init_addr, engine_kwargs, spawned=False)
    for p in procs:
        p.join()
    return 0
