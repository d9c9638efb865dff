"""The benchmark tools end to end with small counts: bench_serving and few_shot_gsm8k against
one live server (embedded model, NGRAM speculation), accept_analysis on the offline engine."""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from specdec.bench import accept_analysis, bench_serving, few_shot_gsm8k

from .live_server import live_server

pytestmark = pytest.mark.slow

LINE = re.compile(r"^(?P<label>[A-Za-z][^:]*):\s+(?P<value>\S(?:.*\S)?)\s*$")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    args = ["--speculative-algorithm", "NGRAM", "--dtype", "float32", "--max-total-tokens", "4096",
            "--log-level", "warning"]
    with live_server(args, tmp_path_factory.mktemp("server") / "server.log") as base:
        yield base


def _parse_block(text: str) -> dict[str, str]:
    """'Label: value' lines of the Serving Benchmark Result block."""
    start = text.index("Serving Benchmark Result")
    out = {}
    for line in text[start:].splitlines()[1:]:
        m = LINE.match(line)
        if m:
            out[m["label"]] = m["value"]
    return out


def _last_record(path: Path) -> dict[str, Any]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines[-1]


# ---- bench_serving --------------------------------------------------------------------------------
def test_bench_serving_module_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "specdec.bench_serving", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--backend", "--dataset-name", "--request-rate", "--max-concurrency", "--output-file",
                 "--random-range-ratio", "--apply-chat-template", "--disable-stream", "--tokenizer"):
        assert flag in out.stdout


def test_bench_serving_native(server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "serving.jsonl"
    rc = bench_serving.main(["--backend", "specdec", "--base-url", server, "--dataset-name", "random",
                             "--num-prompts", "4", "--random-input-len", "24", "--random-output-len", "10",
                             "--random-range-ratio", "0.5", "--output-file", str(out_file), "--seed", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    block = _parse_block(printed)
    rec = _last_record(out_file)

    assert block["Backend"] == "specdec"
    assert block["Traffic request rate"] == "inf"
    assert block["Max request concurrency"] == "not set"
    assert int(block["Successful requests"]) == 4 == rec["completed"]
    assert int(block["Failed requests"]) == 0 == rec["failed"]
    assert int(block["Total generated tokens"]) == rec["total_output_tokens"] == sum(rec["output_lens"])
    assert int(block["Total input tokens"]) == rec["total_input_tokens"] == sum(rec["input_lens"])
    # ignore_eos: every request produced its requested length, drawn from [5, 10]
    assert all(5 <= n <= 10 for n in rec["output_lens"])
    dur = rec["duration"]
    assert math.isclose(rec["output_throughput"], rec["total_output_tokens"] / dur)
    assert math.isclose(rec["input_throughput"], rec["total_input_tokens"] / dur)
    assert math.isclose(rec["request_throughput"], 4 / dur)
    assert math.isclose(rec["total_throughput"], (rec["total_input_tokens"] + rec["total_output_tokens"]) / dur)
    assert rec["peak_output_throughput"] >= 1
    # the printed block is the record rounded to 2 decimals
    for label, key in (("Benchmark duration (s)", "duration"),
                       ("Output token throughput (tok/s)", "output_throughput"),
                       ("Request throughput (req/s)", "request_throughput"),
                       ("Total token throughput (tok/s)", "total_throughput"),
                       ("Concurrency", "concurrency")):
        assert float(block[label]) == pytest.approx(rec[key], abs=0.006)
    # printed arithmetic: output throughput == generated tokens / duration within rounding
    shown_dur = float(block["Benchmark duration (s)"])
    tol = int(block["Total generated tokens"]) * 0.005 / shown_dur ** 2 + 0.006
    assert float(block["Output token throughput (tok/s)"]) == pytest.approx(
        int(block["Total generated tokens"]) / shown_dur, abs=tol)
    # percentiles are ordered, means are positive
    for name, key in (("E2E Latency", "e2e_latency"), ("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl")):
        p50, p95, p99 = (float(block[f"{q} {name} (ms)"]) for q in ("Median", "P95", "P99"))
        assert 0 <= p50 <= p95 <= p99
        assert rec[f"median_{key}_ms"] <= rec[f"p95_{key}_ms"] <= rec[f"p99_{key}_ms"]
        assert float(block[f"Mean {name} (ms)"]) > 0
    assert float(block["Max ITL (ms)"]) >= float(block["P99 ITL (ms)"])
    assert all(e >= t > 0 for e, t in zip(rec["e2e_latencies"], rec["ttfts"]))
    # an NGRAM server reports its accept length (per-request metadata)
    assert float(block["Accept length"]) >= 1.0
    assert rec["accept_length"] >= 1.0 and rec["accept_length_source"] == "requests"


def test_bench_serving_openai_chat_rate_and_concurrency(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "serving.jsonl"
    rc = bench_serving.main(["--backend", "openai-chat", "--base-url", server, "--dataset-name", "gsm8k",
                             "--num-prompts", "3", "--sharegpt-output-len", "6", "--max-concurrency", "2",
                             "--request-rate", "20", "--warmup-requests", "0", "--disable-tqdm",
                             "--output-file", str(out_file)])
    assert rc == 0
    block = _parse_block(capsys.readouterr().out)
    rec = _last_record(out_file)
    assert block["Backend"] == "openai-chat"
    assert float(block["Traffic request rate"]) == 20.0
    assert int(block["Max request concurrency"]) == 2
    assert rec["completed"] == 3 and rec["output_lens"] == [6, 6, 6]
    # usage.prompt_tokens of the chat-templated prompts, as the server counted them
    assert rec["total_input_tokens"] == sum(rec["input_lens"]) > 0


def test_bench_serving_counts_failures(server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "serving.jsonl"
    # prompts longer than the server's 4096-token KV cache get a 400
    rc = bench_serving.main(["--backend", "openai", "--base-url", server, "--num-prompts", "2",
                             "--random-input-len", "5000", "--random-range-ratio", "1", "--random-output-len", "4",
                             "--warmup-requests", "0", "--disable-tqdm", "--output-file", str(out_file)])
    assert rc == 1  # nothing succeeded, but the run finished and reported
    block = _parse_block(capsys.readouterr().out)
    assert int(block["Successful requests"]) == 0
    assert int(block["Failed requests"]) == 2
    rec = _last_record(out_file)
    assert all("400" in e for e in rec["errors"])


# ---- few_shot_gsm8k -----------------------------------------------------------------------------
def test_few_shot_gsm8k(server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "gsm8k.jsonl"
    rc = few_shot_gsm8k.main(["--base-url", server, "--num-questions", "4", "--num-shots", "1",
                              "--parallel", "4", "--max-new-tokens", "32", "--disable-tqdm",
                              "--output-file", str(out_file)])
    assert rc == 0
    printed = capsys.readouterr().out
    values = {m["label"]: m["value"] for m in map(LINE.match, printed.splitlines()) if m}
    assert 0.0 <= float(values["Accuracy"]) <= 1.0
    assert 0.0 <= float(values["Invalid"]) <= 1.0
    assert values["Latency"].endswith(" s") and float(values["Latency"][:-2]) > 0
    assert values["Output throughput"].endswith(" token/s")
    assert float(values["Output throughput"].split()[0]) > 0
    rec = _last_record(out_file)
    assert rec["num_questions"] == 4 and rec["num_shots"] == 1 and rec["failed"] == 0
    assert 0 < rec["output_tokens"] <= 4 * 32


def test_gsm8k_answer_extraction() -> None:
    assert few_shot_gsm8k.last_number("so 3 + 4 = 7.\nThe answer is 1,234") == 1234.0
    assert few_shot_gsm8k.last_number("she owes -5.50 dollars") == -5.5
    assert few_shot_gsm8k.last_number("no digits here") is None
    assert few_shot_gsm8k.label_of("16 - 3 = <<16-3=13>>13\n#### 18") == 18.0
    prompt = few_shot_gsm8k.few_shot_prefix([{"question": "Q1?", "answer": "A1\n#### 1"}])
    assert prompt == "Question: Q1?\nAnswer: A1\n#### 1\n\n"


# ---- accept_analysis ----------------------------------------------------------------------------
def test_accept_analysis_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "accept"
    rc = accept_analysis.main(["--speculative-algorithm", "NGRAM", "--dataset", "gsm8k", "--num-prompts", "2",
                               "--max-new-tokens", "16", "--configs", "5,4,8", "3,1,4", "--dtype", "float32",
                               "--max-total-tokens", "4096", "--position-bucket", "8",
                               "--output-dir", str(out_dir)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| 5,4,8 |" in printed and "| 3,1,4 |" in printed
    for name in ("accept_analysis.json", "accept_analysis.md", "accept_length_hist.png", "accept_by_depth.png",
                 "tokens_per_s_vs_accept_length.png", "accept_by_position.png"):
        path = out_dir / name
        assert path.exists() and path.stat().st_size > 0, name
    assert (out_dir / "accept_length_hist.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out_dir / "accept_analysis.json").read_text())
    assert report["baseline"]["tokens_per_s"] > 0
    assert [c["label"] for c in report["configs"]] == ["5,4,8", "3,1,4"]
    for c in report["configs"]:
        assert c["accept_length"] >= 1.0
        assert c["verify_steps"] >= 1
        assert sum(c["tokens_per_step_hist"].values()) == c["verify_steps"]
        assert all(int(k) >= 1 for k in c["tokens_per_step_hist"])
        assert all(x >= 1.0 for x in c["per_request_accept_length"])
        assert c["tokens_per_s"] > 0 and c["speedup"] > 0
        rates = [d["rate"] for d in c["acceptance_by_depth"]]
        assert all(0.0 <= b <= a <= 1.0 for a, b in itertools.pairwise(rates))
        assert sum(b["steps"] for b in c["accept_length_by_position"]) == c["verify_steps"]
    assert max(len(c["acceptance_by_depth"]) for c in report["configs"]) <= 5
    assert report["best"]["label"] in ("5,4,8", "3,1,4")
    assert "Best tokens/s" in (out_dir / "accept_analysis.md").read_text()


def test_sweep_validates_like_sglang() -> None:
    configs, skipped = accept_analysis.sweep_configs("NGRAM", [1, 3], [1, 4], [4, 8, 64])
    labels = [c.label for c in configs]
    # topk 1 is a chain: draft tokens = steps + 1, once per steps value
    assert labels == ["1,1,2", "1,4,4", "3,1,4", "3,4,4", "3,4,8"]
    assert {d["config"] for d in skipped} == {"1,4,8", "1,4,64", "3,4,64"}
    assert accept_analysis.validate_config("EAGLE3", accept_analysis.parse_config("3,1,5")) is not None
    with pytest.raises(Exception, match="steps,topk,draft_tokens"):
        accept_analysis.parse_config("5,4")


# ---- the data a user's command reads by default ships in the package -----------------------------
def test_default_data_ships_in_the_package() -> None:
    from specdec.draft.data_split import is_heldout

    package = Path(bench_serving.__file__).resolve().parent
    defaults = [*bench_serving.DEFAULT_DATA.values(),
                Path(few_shot_gsm8k.parse_args([]).data_path), Path(few_shot_gsm8k.parse_args([]).train_path)]
    for path in defaults:
        assert path.is_relative_to(package / "data") and path.exists(), path
        assert "shared" not in path.parts, path
    assert accept_analysis.parse_args([]).dataset == "chat"
    rows = [json.loads(line) for line in bench_serving.DEFAULT_DATA["chat"].read_text().splitlines()]
    assert len({r["category"] for r in rows[:9]}) == 9  # the first prompts cover every category
    assert all(is_heldout(r["prompt"]) for r in rows)  # never training data
    assert len(bench_serving.load_chat_samples(bench_serving.DEFAULT_DATA["chat"])) == len(rows)


# ---- head_to_head's contestants, each in its own process -----------------------------------------
_ECHO = ("from specdec.bench.contestants import serve_answers; import sys; "
         "sys.exit(serve_answers(lambda: (lambda ids: (ids[:2], 1.5))))")
_CRASH_ON_SECOND = ("from specdec.bench.contestants import serve_answers; import os, signal, sys\n"
                    "calls = []\n"
                    "def answer(ids):\n"
                    "    calls.append(1)\n"
                    "    if len(calls) == 2: os.kill(os.getpid(), signal.SIGSEGV)\n"
                    "    return ids[:1], 1.0\n"
                    "sys.exit(serve_answers(lambda: answer))")
_FAIL_TO_LOAD = ("from specdec.bench.contestants import serve_answers; import sys\n"
                 "def make(): raise OSError('no such model')\n"
                 "sys.exit(serve_answers(make))")


def test_a_crashing_contestant_is_reported_and_the_others_finish() -> None:
    from specdec.bench.contestants import Contestant, ContestantFailed
    from specdec.bench.head_to_head import run

    contestants = {"echo": Contestant("echo", [sys.executable, "-c", _ECHO]),
                   "crash": Contestant("crash", [sys.executable, "-c", _CRASH_ON_SECOND])}
    try:
        results = run(contestants, [[1, 2, 3], [4, 5, 6]], repeats=2)
    finally:
        for c in contestants.values():
            c.close()
    assert results["echo"].failure is None and results["echo"].tokens == [4, 4]
    assert results["echo"].outputs == [[1, 2], [4, 5]] and results["echo"].accept == [1.5] * 4  # the warm-up is not recorded
    assert results["crash"].failure is not None and results["crash"].failure.startswith("killed by SIGSEGV")
    assert math.isnan(results["crash"].tok_s)
    with pytest.raises(ContestantFailed, match="OSError: no such model"):
        Contestant("broken", [sys.executable, "-c", _FAIL_TO_LOAD])


def test_serve_modes_flags() -> None:
    from specdec.bench.serve_modes import mode_flags

    assert mode_flags("plain", "w8a16", "/h") == ["--quantization", "w8a16", "--speculative-algorithm", "NONE"]
    assert mode_flags("adaptive", None) == []
    assert mode_flags("adaptive+copy", None, "/h") == [
        "--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", "/h", "--speculative-ngram-merge"]
    assert mode_flags("tree:2,1,3+copy", None)[-1] == "--speculative-ngram-merge"
    assert mode_flags("adaptive+nocopy", None) == ["--no-speculative-ngram-merge"]
    with pytest.raises(ValueError, match="unknown mode"):
        mode_flags("plain+copy", None)
