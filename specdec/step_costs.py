"""Measure what speculative steps cost on this machine, for this model, once; cache the table.

The adaptive tree chooser (specdec/tree_chooser.py) predicts a step's time from:

* the target's forward + logits for b requests of n tokens each (n = 1 is plain decoding, n > 1
  a tree verification), measured through `ModelRunner.verify_trees` on chain trees over a
  cached prefix of `CONTEXT` tokens;
* one draft forward + draft logits for b requests of r rows each (the draft's extend and its
  frontier steps), through the head itself over its KV pool;
* the host work per speculating request: one drafting step of the tree builder (top-k of a
  draft distribution, candidate bookkeeping) and one greedy verification.

Measured at engine start-up on idle KV pages (a few seconds) and cached in
`<cache>/step_costs/<fingerprint>.json`; the fingerprint covers everything the times depend
on (model and head files, dtype, quantisation, CPU kernel tier and its sources, the attention
backend's routing (kernels/torch_backend.py), CPU model, threads, grid, versions), so another machine or model never reads a table it did not measure.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import platform
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .request import Req
from .sampling_params import SamplingParams
from .tree import DraftTree
from .tree_chooser import StepCosts
from .verify import verify_greedy

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("specdec")

CONTEXT = 128  # cached prefix of the measured requests
REPEATS = 5  # median of
VERSION = 3  # bump when what is measured changes (2: interleaved rounds, monotone; 3: batches in one packed call)


def grid(max_batch: int, max_tokens: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Batch sizes, tokens per request and draft rows per request measured (larger batches
    are extrapolated linearly from the last two)."""
    batch = tuple(b for b in (1, 2, 4, 8, 16) if b <= max_batch) or (1,)
    tokens = tuple(n for n in (1, 2, 3, 4, 6, 8, 12, 16) if n <= max_tokens)
    return batch, tokens, (1, 2, 4)


def fingerprint(engine: Engine, batch: tuple[int, ...], tokens: tuple[int, ...]) -> str:
    import specdec
    from specdec.kernels import cpu_isa, cpu_kernels, torch_backend

    def files(path: Path | None) -> list[tuple[str, int, int]]:
        if path is None or not path.exists():
            return []
        return sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in path.iterdir() if p.is_file())

    spec = engine.spec_config
    draft = Path(spec.draft_model_path) if spec is not None and spec.draft_model_path else None
    cpu_model = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines()
                      if line.startswith("model name")), platform.processor())
    key = {
        "version": VERSION, "specdec": specdec.__version__, "torch": torch.__version__,
        "model": files(engine.model_path), "draft": files(draft), "dtype": str(next(engine.model.parameters()).dtype),
        "quantization": engine.config.quantization, "device": str(engine.device), "isa": engine.cpu_isa,
        "kernels": cpu_kernels.sources_hash(engine.cpu_isa),
        # which kernel each batch shape reaches is decided there (a routing change re-measures)
        "attention": hashlib.sha1(Path(torch_backend.__file__).read_bytes()).hexdigest(),
        "flags": sorted(cpu_isa.cpu_flags()), "cpu": cpu_model, "threads": torch.get_num_threads(),
        "batch": batch, "tokens": tokens, "page_size": engine.config.page_size,
        "tp": engine.config.tp_size,  # (a step's cost under --tp includes the ranks' collectives)
        "ep": engine.config.dist_config().ep_size,
    }
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _median_ms(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def _fake_requests(engine: Engine, b: int, length: int) -> list[Req]:
    reqs: list[Req] = []
    g = torch.Generator().manual_seed(b)
    vocab = engine.model_config.vocab_size
    for _ in range(b):
        ids = torch.randint(0, vocab, (CONTEXT,), generator=g).tolist()
        table, swa_table = engine.kv_tables()
        req = Req(rid=uuid.uuid4().hex, prompt_ids=ids, params=SamplingParams(), page_table=table,
                  generator=None, swa_table=swa_table)
        if not req.reserve_kv(length):
            req.release_kv()
            for r in reqs:
                r.release_kv()
            raise MemoryError("not enough free KV pages to measure step costs")
        reqs.append(req)
    return reqs


@torch.inference_mode()
def measure(engine: Engine, max_tokens: int, max_rows_draft: int = 4) -> StepCosts:
    """Time the grid on this engine (idle: its KV pages are borrowed and returned).

    The cells are timed in interleaved rounds (every cell once per round, the median of
    `REPEATS` rounds each) over request sets of every batch size held at once, so that a
    machine whose speed drifts over seconds (a shared VM: +-15 %) moves every cell alike
    instead of making one batch size's column cheap and the next dear; the table is then made
    monotone (`monotone`)."""
    assert engine.spec is not None
    batch, tokens, rows = grid(engine.config.max_running_requests, max_tokens)
    length = CONTEXT + max(max(tokens), max(rows))
    page = engine.allocator.page_size
    fits = engine.allocator.num_free_pages * page // (length + page)
    batch = tuple(b for b in batch if b <= fits) or (1,)
    runner = engine.runner
    proposer: Any = engine.spec.proposer
    capture = engine.spec.capture_layers
    target: dict[tuple[int, int], float] = {}
    draft: dict[tuple[int, int], float] = {}
    queue = _groups(batch, fits)  # batch sizes whose requests fit in the pool together
    while queue:
        group = queue.pop(0)
        sets: dict[int, list[Req]] = {}
        try:
            try:
                for b in group:
                    sets[b] = _fake_requests(engine, b, length)
            except MemoryError:  # (another pool, the window's, has fewer pages)
                if len(group) == 1:
                    raise
                queue[:0] = [(b,) for b in group]  # one batch size at a time
                continue
            for reqs in sets.values():
                runner.extend(reqs, [r.prompt_ids for r in reqs], capture)  # the cached prefix
                for r in reqs:
                    r.num_cached = CONTEXT
            cells: dict[tuple[str, int, int], Callable[[], None]] = {}
            for b, reqs in sets.items():
                for n in tokens:
                    trees = [DraftTree.chain(r.prompt_ids[:n]) for r in reqs]
                    cells["target", b, n] = functools.partial(_target_step, runner, reqs, trees, capture)
                for nr in rows:
                    cells["draft", b, nr] = functools.partial(_draft_forward, proposer, reqs, nr)
            for key, ms in _interleaved_ms(cells).items():
                (target if key[0] == "target" else draft)[key[1], key[2]] = ms
        finally:
            for reqs in sets.values():
                for r in reqs:
                    r.release_kv()
    target_ms = monotone(tuple(tuple(target[b, n] for n in tokens) for b in batch))
    draft_ms = monotone(tuple(tuple(draft[b, r] for r in rows) for b in batch))
    step_overhead, verify_overhead = _host_overheads(proposer)
    return StepCosts(batch, tokens, target_ms, rows, draft_ms, step_overhead, verify_overhead)


def _groups(batch: tuple[int, ...], fits: int) -> list[tuple[int, ...]]:
    """Consecutive batch sizes whose requests fit in `fits` requests' pages at once."""
    out: list[tuple[int, ...]] = []
    for b in batch:
        if out and sum(out[-1]) + b <= fits:
            out[-1] = (*out[-1], b)
        else:
            out.append((b,))
    return out


def _interleaved_ms(cells: dict[Any, Callable[[], None]], repeats: int = REPEATS) -> dict[Any, float]:
    """Median ms of each cell over `repeats` rounds that time every cell once (after a warm-up)."""
    for fn in cells.values():
        fn()
    times: dict[Any, list[float]] = {k: [] for k in cells}
    for _ in range(repeats):
        for k, fn in cells.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1000.0 * statistics.median(v) for k, v in times.items()}


def monotone(table: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
    """table[i][j] made non-decreasing along j (more tokens or rows a request) and along i
    (more requests): a step that does more work never costs less, and a cell that timing noise
    made cheaper than its neighbours would otherwise draw the chooser to it."""
    out = [list(row) for row in table]
    for i, row in enumerate(out):
        for j in range(len(row)):
            if j:
                row[j] = max(row[j], row[j - 1])
            if i:
                row[j] = max(row[j], out[i - 1][j])
    return tuple(tuple(row) for row in out)


def _target_step(runner: Any, reqs: list[Req], trees: list[DraftTree], capture: tuple[int, ...]) -> None:
    """The target's forward + logits over each request's tree."""
    out = runner.verify_trees(reqs, trees, capture)
    runner.logits(out.hidden)


def _draft_forward(proposer: Any, reqs: list[Req], r: int) -> None:
    """One draft forward of r rows per request over its committed prefix (all visible)."""
    from specdec.kernels.backend import SeqAttnMeta

    seqs, out_slots = [], []
    for i, req in enumerate(reqs):
        c = req.num_cached
        slots = req.kv_slots(c + r)
        q_pos = torch.arange(c, c + r)
        seqs.append(SeqAttnMeta(i * r, r, slots, q_pos, torch.arange(c + r), torch.ones(r, c + r, dtype=torch.bool)))
        out_slots.append(slots[c:])
    n = len(reqs) * r
    h = proposer.draft.cfg.hidden_size
    out = proposer.forward(torch.zeros(n, dtype=torch.long), torch.randn(n, h),
                           torch.cat([s.q_positions for s in seqs]), seqs, out_slots)
    proposer.logits(out.logits_hidden)


def _host_overheads(proposer: Any) -> tuple[float, float]:
    """ms per request of one drafting step of the tree builder (topk 4) and one greedy verify."""
    from specdec.draft.tree_builders import GreedyTreeBuilder, top_children

    vd = proposer.draft.cfg.draft_vocab_size
    logits = torch.randn(5, vd)

    def drafting_step() -> None:
        b = GreedyTreeBuilder(1, 4, 15)
        vals, toks = top_children(logits[:1], 4, proposer.hot_ids)
        new = b.add_children(-1, vals[0], toks[0])
        vals, toks = top_children(logits[1:], 4, proposer.hot_ids)
        for node, v, t in zip(b.best(new), vals, toks, strict=True):
            b.add_children(node, v, t)

    steps_ms = _median_ms(drafting_step, 20) / 2  # two steps above
    chain = DraftTree.chain(list(range(8)))
    verify_ms = _median_ms(lambda: verify_greedy(chain, list(range(1, 9))), 20)
    return steps_ms, verify_ms


def load_or_measure(engine: Engine, max_tokens: int, cache_dir: Path) -> StepCosts:
    batch, tokens, _ = grid(engine.config.max_running_requests, max_tokens)
    path = cache_dir / "step_costs" / f"{fingerprint(engine, batch, tokens)}.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
            return StepCosts(**{k: _tuples(v) for k, v in data.items()})
        except (ValueError, TypeError) as e:
            log.warning("ignoring the unreadable step-cost table %s (%s)", path, e)
    t0 = time.perf_counter()
    costs = measure(engine, max_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(asdict(costs), indent=1) + "\n")
    tmp.replace(path)
    log.info("measured speculative step costs in %.1fs (cached in %s)", time.perf_counter() - t0, path)
    return costs


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v
