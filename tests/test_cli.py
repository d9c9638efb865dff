"""The command line: bad flags and combinations exit non-zero with a one-line reason."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "specdec.launch_server", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--speculative-algorithm", "EAGLE3", "--speculative-eagle-topk", "1",
          "--speculative-num-steps", "3", "--speculative-num-draft-tokens", "9"), "num_steps + 1 = 4"),
        (("--speculative-num-steps", "3", "--speculative-algorithm", "NONE"), "without --speculative-algorithm"),
        (("--model-path", "/nonexistent/model"), "does not exist"),
        (("--port", "70000"), "--port"),
        (("--page-size", "0"), "page_size"),
        (("--quantization", "fp3"), "--quantization"),
        (("--device", "tpu"), "device must be one of"),
        (("--tp", "2", "--ep-size", "3"), "--ep-size 3 must divide --tp 2"),
    ],
)
def test_bad_flags_exit_nonzero_with_one_line(args: tuple[str, ...], message: str) -> None:
    proc = _run(*args)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr


def test_help_documents_every_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "specdec.launch_server", "--help"],
                         capture_output=True, text=True, timeout=60).stdout
    for flag in ("--model-path", "--tokenizer-path", "--host", "--port", "--dtype", "--context-length",
                 "--max-total-tokens", "--page-size", "--max-running-requests", "--chat-template",
                 "--served-model-name", "--trust-remote-code", "--attention-backend", "--random-seed",
                 "--log-level", "--api-key", "--speculative-algorithm", "--speculative-draft-model-path",
                 "--speculative-num-steps", "--speculative-eagle-topk", "--speculative-num-draft-tokens",
                 "--speculative-accept-threshold-single", "--speculative-accept-threshold-acc",
                 "--speculative-token-map", "--mem-fraction-static", "--kv-cache-dtype",
                 "--quantization-param-path", "--swa-full-tokens-ratio", "--disable-hybrid-swa-memory",
                 "--chunked-prefill-size", "--disable-radix-cache", "--tp-size", "--ep-size",
                 "--enable-expert-parallel", "--nnodes", "--node-rank", "--dist-init-addr"):
        assert flag in out, flag


def test_embedded_model_defaults_to_the_shipped_head_and_adaptive_trees() -> None:
    from specdec.cli_args import resolve_speculative_defaults
    from specdec.draft.heads import EMBEDDED_TREE, shipped_head_for_embedded
    from specdec.engine_config import EngineConfig

    head = shipped_head_for_embedded()
    assert head is not None
    tree = ("speculative_num_steps", "speculative_eagle_topk", "speculative_num_draft_tokens")
    unset = {"model_path": None, "speculative_algorithm": None, "speculative_adaptive": "auto",
             **dict.fromkeys(tree)}
    kw = resolve_speculative_defaults(unset)
    assert kw["speculative_algorithm"] == "EAGLE3" and kw["speculative_draft_model_path"] == str(head)
    spec = EngineConfig(**kw).spec_config()
    assert spec is not None and spec.adaptive  # no tree flag: adaptive trees (make run)
    assert spec.ngram_merge  # and copies merged into the tree
    kw = resolve_speculative_defaults({**unset, "speculative_ngram_merge": False})
    assert kw["speculative_ngram_merge"] is False  # --no-speculative-ngram-merge
    assert resolve_speculative_defaults({"speculative_algorithm": "NONE", "speculative_ngram_merge": None})[
        "speculative_ngram_merge"] is False
    # adaptive off: the fixed tree measured fastest for the embedded model
    kw = resolve_speculative_defaults({**unset, "speculative_adaptive": "off"})
    assert tuple(kw[k] for k in tree) == EMBEDDED_TREE
    # explicit tree flags win; NONE turns speculation off; other models get nothing implicit
    kw = resolve_speculative_defaults({"model_path": None, "speculative_algorithm": None, "speculative_num_steps": 5,
                                       "speculative_eagle_topk": None, "speculative_num_draft_tokens": None})
    assert kw["speculative_num_steps"] == 5 and kw["speculative_eagle_topk"] is None
    assert resolve_speculative_defaults({"speculative_algorithm": "NONE"})["speculative_algorithm"] is None
    assert resolve_speculative_defaults({"model_path": "/m", "speculative_algorithm": None})["speculative_algorithm"] is None


def test_generate_takes_the_generation_config_defaults_for_unset_flags() -> None:
    import json

    def run(*extra: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "specdec.cli", "generate", "--prompt", "Say hi", "--json",
                               "--speculative-algorithm", "NONE", "--log-level", "warning", *extra],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    override = ("--override-generation-config", '{"max_new_tokens": 5}')
    assert run(*override)["meta_info"]["completion_tokens"] == 5  # the model's default
    assert run(*override, "--max-new-tokens", "3")["meta_info"]["completion_tokens"] == 3  # the flag wins
