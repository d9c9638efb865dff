"""The tensor-parallel layout flags (`--tp`, `--nnodes`, `--node-rank`, `--dist-init-addr`),
checked; torch-free (specdec/distributed.py runs them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DistConfig:
    tp_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # host:port of rank 0; default 127.0.0.1 and a free port
    ep_size: int = 1  # expert-parallel groups of the MoE experts (target/tp.py)

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--tp {self.tp_size} --nnodes {self.nnodes} --node-rank {self.node_rank}: "
                             "need tp >= 1, nnodes >= 1, 0 <= node-rank < nnodes")
        if self.tp_size % self.nnodes:
            raise ValueError(f"--tp {self.tp_size} does not divide by --nnodes {self.nnodes}")
        if self.ep_size < 1 or self.tp_size % self.ep_size:
            raise ValueError(f"--ep-size {self.ep_size} must divide --tp {self.tp_size}")
        if self.nnodes > 1 and self.dist_init_addr is None:
            raise ValueError("--nnodes > 1 needs --dist-init-addr host:port (rank 0's address)")

    @property
    def ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    def local_ranks(self) -> range:
        per = self.ranks_per_node
        return range(self.node_rank * per, (self.node_rank + 1) * per)
