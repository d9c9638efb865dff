"""Memory flags at start-up: `--mem-fraction-static` (SGLang's rule), the flags of SGLang's and
vLLM's Llama 4 guides parse and take effect, and a bad value is one clear error line."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from specdec import engine as engine_mod

from .test_hybrid_kv import HYBRID
from .tiny_models import Checkpoint, make_checkpoint

MIB = 1 << 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return make_checkpoint(tmp_path_factory.mktemp("mem") / "m", "llama4", seed=3, **HYBRID)


def _engine(ckpt: Checkpoint, monkeypatch: pytest.MonkeyPatch, total: int, free: int, **kw: Any) -> Any:
    monkeypatch.setattr(engine_mod, "total_memory_bytes", lambda: total)
    monkeypatch.setattr(engine_mod, "available_memory_bytes", lambda: free)
    return ckpt.engine(max_total_tokens=None, page_size=4, **kw)


def test_mem_fraction_static_sizes_the_kv_from_what_it_leaves(ckpt: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    # 100 MiB device, 60 free after the weights, 0.5: 50 MiB kept back -> 10 MiB of KV
    e = _engine(ckpt, monkeypatch, 100 * MIB, 60 * MIB, mem_fraction_static=0.5, disable_hybrid_swa_memory=True)
    per_token = e.kv_layout.full_layer_bytes
    assert e.kv_plan.full_tokens == 10 * MIB // per_token // 4 * 4
    hybrid = _engine(ckpt, monkeypatch, 100 * MIB, 60 * MIB, mem_fraction_static=0.5)
    full_b, swa_b = hybrid.kv_plan.bytes(hybrid.kv_layout)
    assert full_b + swa_b <= 10 * MIB < full_b + swa_b + 8 * (hybrid.kv_layout.full_layer_bytes
                                                              + hybrid.kv_layout.swa_layer_bytes)
    # the default without the flag: 20 % of the free memory
    default = _engine(ckpt, monkeypatch, 100 * MIB, 60 * MIB, disable_hybrid_swa_memory=True)
    assert default.kv_plan.full_tokens == int(60 * MIB * 0.2) // per_token // 4 * 4
    with pytest.raises(ValueError, match="leaves no memory for the KV cache"):
        _engine(ckpt, monkeypatch, 100 * MIB, 60 * MIB, mem_fraction_static=0.3)


def _serve_error(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "specdec.launch_server", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_the_guides_flags_parse_and_bad_values_are_one_line() -> None:
    from specdec.cli import build_parser

    args = build_parser().parse_args(["serve", "--swa-full-tokens-ratio", "0.8", "--kv-cache-dtype", "fp8_e4m3",
                                      "--mem-fraction-static", "0.8", "--disable-hybrid-swa-memory",
                                      "--quantization-param-path", "/x.json"])
    assert (args.swa_full_tokens_ratio, args.kv_cache_dtype, args.mem_fraction_static) == (0.8, "fp8_e4m3", 0.8)
    assert args.disable_hybrid_swa_memory and args.quantization_param_path == "/x.json"
    assert "swa_full_tokens_ratio" in _serve_error("--swa-full-tokens-ratio", "0")
    assert "mem_fraction_static" in _serve_error("--mem-fraction-static", "1.5")
    assert "--kv-cache-dtype" in _serve_error("--kv-cache-dtype", "fp4")
    assert "needs --kv-cache-dtype fp8" in _serve_error("--quantization-param-path", "/x.json")
