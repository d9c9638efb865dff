"""Engine-wide counters, collected in one place (served at /metrics and /get_server_info).

Speculative figures follow SGLang: accept length = tokens emitted by verify steps / verify
steps (each step emits its accepted drafts plus one token); accept rate = accepted draft
tokens / proposed draft depth (the tree's depth, summed over verify steps).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class EngineMetrics:
    started_at: float = field(default_factory=time.time)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    preemptions: int = 0
    spec_verify_ct: int = 0
    spec_emitted_tokens: int = 0
    spec_correct_drafts: int = 0
    spec_proposed_drafts: int = 0
    # accepted_at_depth[d] = verify steps whose accepted path reached depth d + 1
    spec_accepted_at_depth: list[int] = field(default_factory=list)
    # decode steps per tree shape label ("5,4,8", ..., "none" = plain) a request took
    spec_tree_shapes: dict[str, int] = field(default_factory=dict)
    num_running: int = 0
    num_waiting: int = 0
    kv_used_tokens: int = 0
    kv_total_tokens: int = 0
    kv_cached_free_tokens: int = 0  # free slots whose pages the prefix cache still keeps
    swa_used_tokens: int = 0  # hybrid KV: slots of the chunked layers' window pool in use
    swa_total_tokens: int = 0  # (0: one pool)
    cache_query_tokens: int = 0  # prompt tokens of admitted requests that looked in the prefix cache
    cache_hit_tokens: int = 0  # of those, taken from it
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_verify(self, accepted: int, emitted: int, depth: int) -> None:
        with self._lock:
            self.spec_verify_ct += 1
            self.spec_emitted_tokens += emitted
            self.spec_correct_drafts += accepted
            self.spec_proposed_drafts += depth
            while len(self.spec_accepted_at_depth) < depth:
                self.spec_accepted_at_depth.append(0)
            for d in range(accepted):
                self.spec_accepted_at_depth[d] += 1

    def record_shape(self, label: str) -> None:
        with self._lock:
            self.spec_tree_shapes[label] = self.spec_tree_shapes.get(label, 0) + 1

    @property
    def accept_length(self) -> float:
        return self.spec_emitted_tokens / self.spec_verify_ct if self.spec_verify_ct else 0.0

    @property
    def cache_hit_rate(self) -> float:
        return self.cache_hit_tokens / self.cache_query_tokens if self.cache_query_tokens else 0.0

    @property
    def accept_rate(self) -> float:
        return self.spec_correct_drafts / self.spec_proposed_drafts if self.spec_proposed_drafts else 0.0

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {
                "prompt_tokens": self.prompt_tokens,
                "generation_tokens": self.generation_tokens,
                "requests_finished": self.requests_finished,
                "requests_aborted": self.requests_aborted,
                "preemptions": self.preemptions,
                "spec_verify_ct": self.spec_verify_ct,
                "avg_spec_accept_length": self.accept_length,
                "spec_accept_rate": self.accept_rate,
                "spec_accepted_at_depth": list(self.spec_accepted_at_depth),
                "spec_tree_shapes": dict(self.spec_tree_shapes),
                "num_running_reqs": self.num_running,
                "num_queue_reqs": self.num_waiting,
                "kv_used_tokens": self.kv_used_tokens,
                "kv_total_tokens": self.kv_total_tokens,
                "kv_cached_free_tokens": self.kv_cached_free_tokens,
                "swa_used_tokens": self.swa_used_tokens,
                "swa_total_tokens": self.swa_total_tokens,
                "cache_hit_rate": self.cache_hit_rate,
                "uptime_s": time.time() - self.started_at,
            }
