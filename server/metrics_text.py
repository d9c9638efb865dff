"""Prometheus text exposition of the engine metrics, under SGLang's metric names (the
`sglang:` prefix keeps existing dashboards working; see docs/SERVER.md)."""

from __future__ import annotations

from specdec.metrics import EngineMetrics

PREFIX = "sglang:"


def prometheus_text(m: EngineMetrics, gen_throughput: float) -> str:
    snap = m.snapshot()
    total = int(snap["kv_total_tokens"])  # type: ignore[call-overload]
    used = int(snap["kv_used_tokens"])  # type: ignore[call-overload]
    rows: list[tuple[str, str, str, float]] = [
        ("prompt_tokens_total", "counter", "Prompt tokens of finished requests", m.prompt_tokens),
        ("generation_tokens_total", "counter", "Generated tokens of finished requests", m.generation_tokens),
        ("num_requests_total", "counter", "Finished requests", m.requests_finished),
        ("num_aborted_requests_total", "counter", "Aborted requests", m.requests_aborted),
        ("num_retractions_total", "counter", "Requests preempted because the KV cache was full", m.preemptions),
        ("num_running_reqs", "gauge", "Requests in the running batch", m.num_running),
        ("num_queue_reqs", "gauge", "Requests waiting", m.num_waiting),
        ("token_usage", "gauge", "Fraction of KV-cache slots in use", used / total if total else 0.0),
        ("swa_token_usage", "gauge", "Hybrid KV: fraction of the chunked layers' window-pool slots in use",
         m.swa_used_tokens / m.swa_total_tokens if m.swa_total_tokens else 0.0),
        ("cache_hit_rate", "gauge", "Prompt tokens taken from the prefix cache / prompt tokens looked up",
         m.cache_hit_rate),
        ("gen_throughput", "gauge", "Generation throughput of the last step (tokens/s)", gen_throughput),
        ("spec_accept_length", "gauge", "Average tokens emitted per verify step", m.accept_length),
        ("spec_accept_rate", "gauge", "Accepted draft tokens / proposed draft depth", m.accept_rate),
        ("spec_verify_calls_total", "counter", "Verify steps (per request)", m.spec_verify_ct),
    ]
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}", f"{PREFIX}{name} {value}"]
    name = f"{PREFIX}spec_accepted_at_depth_total"
    lines += [f"# HELP {name} Verify steps whose accepted path reached this depth", f"# TYPE {name} counter"]
    for depth, count in enumerate(m.spec_accepted_at_depth, start=1):
        lines.append(f'{name}{{depth="{depth}"}} {count}')
    # specdec's own (no SGLang counterpart): the tree shapes adaptive speculation chose
    name = "specdec:spec_tree_shape_steps_total"
    lines += [f"# HELP {name} Decode steps of one request per tree shape (steps,topk,draft tokens; none = plain)",
              f"# TYPE {name} counter"]
    for label, count in sorted(snap["spec_tree_shapes"].items()):  # type: ignore[attr-defined]
        lines.append(f'{name}{{shape="{label}"}} {count}')
    return "\n".join(lines) + "\n"
