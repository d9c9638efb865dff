"""Runtime knobs of the engine: one frozen dataclass whose field names are the CLI flags
(SGLang's names) with underscores. Model facts live in `specdec.target.config.ModelConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .dist_config import DistConfig
from .generation_config import GENERATION_CONFIG_MODES, parse_override
from .media import parse_limit_mm_per_prompt
from .spec_config import SpecConfig

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flashinfer")
QUANTIZATION_CHOICES = ("w8a16", "w8a8_int8", "w4a16")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")  # fp8 = fp8_e4m3, as vLLM spells it
DEFAULT_MAX_IMAGES = 10


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model_path: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    tokenizer_path: str | None = None
    dtype: str = "auto"
    quantization: str | None = None  # w8a16 | w8a8_int8 | w4a16 (see specdec.target.quant)
    device: str = "auto"  # auto: cuda when a GPU is visible, else cpu
    context_length: int | None = None  # None: the model's max_position_embeddings
    max_total_tokens: int | None = None  # KV slots; None: sized from free memory
    page_size: int = 16
    max_running_requests: int = 64
    max_prefill_tokens: int = 4096
    disable_radix_cache: bool = False  # SGLang's flag: no prefix cache (specdec/prefix_cache.py)
    chunked_prefill_size: int = 4096  # tokens of one prompt fed per forward (SGLang's flag); -1: all at once
    mem_fraction_kv: float = 0.2  # share of available memory the KV cache may use by default
    mem_fraction_static: float | None = None  # SGLang's: weights + KV may take this share of memory
    kv_cache_dtype: str = "auto"  # auto: the model dtype; fp8 storage with per-tensor scales
    quantization_param_path: str | None = None  # JSON of KV scales (SGLang / vLLM's legacy format)
    # hybrid KV for models with chunked-attention layers (SGLang's flags): their pool holds
    # swa_full_tokens_ratio x the full pool's slots, each request only its current window
    swa_full_tokens_ratio: float = 0.8
    disable_hybrid_swa_memory: bool = False
    # images (SGLang's --enable-multimodal; vLLM's --limit-mm-per-prompt and
    # --allowed-local-media-path): Llama 4's vision tower, image_url chat parts, image_data
    enable_multimodal: bool = False
    limit_mm_per_prompt: str | Mapping[str, int] | None = None  # image=N or {"image": N}; default 10
    allowed_local_media_path: str | None = None  # local image files may be read only under this folder
    # tensor parallelism (SGLang's --tp-size / --nnodes / --node-rank / --dist-init-addr)
    tp_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    ep_size: int = 1  # SGLang's --ep-size: MoE experts placed over groups of ranks
    chat_template: str | None = None
    served_model_name: str | None = None
    trust_remote_code: bool = False  # accepted for compatibility; no downloaded code ever runs
    attention_backend: str = "auto"
    random_seed: int | None = None
    log_level: str = "info"
    skip_tokenizer_init: bool = False
    # vLLM's: the model's default sampling parameters (specdec/generation_config.py). auto: the
    # model folder's generation_config.json; vllm: none; else a folder holding one
    generation_config: str = "auto"
    override_generation_config: str | Mapping[str, Any] | None = None  # JSON object merged over it
    # speculative decoding (SGLang's --speculative-* flags)
    speculative_algorithm: str | None = None  # EAGLE3, EAGLE, NGRAM
    speculative_draft_model_path: str | None = None
    speculative_num_steps: int | None = None
    speculative_eagle_topk: int | None = None
    speculative_num_draft_tokens: int | None = None
    speculative_accept_threshold_single: float = 1.0
    speculative_accept_threshold_acc: float = 1.0
    speculative_token_map: str | None = None
    speculative_adaptive: str = "auto"  # auto | on | off (see specdec.spec_config)
    speculative_ngram_merge: bool = False  # copies from the request's own text in EAGLE3's tree

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}; got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)} (or unset); "
                f"got {self.quantization!r}"
            )
        if self.device not in DEVICE_CHOICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)} or cuda:N; got {self.device!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; "
                f"got {self.attention_backend!r}"
            )
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}; got {self.log_level!r}")
        for name in ("page_size", "max_running_requests", "max_prefill_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not isinstance(self.chunked_prefill_size, int) or not (
                self.chunked_prefill_size == -1 or self.chunked_prefill_size >= 1):
            raise ValueError(f"chunked_prefill_size must be a positive integer or -1; got {self.chunked_prefill_size!r}")
        for name in ("context_length", "max_total_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not 0 < self.mem_fraction_kv < 1:
            raise ValueError(f"mem_fraction_kv must be in (0, 1); got {self.mem_fraction_kv}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1); got {self.mem_fraction_static}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")
        if self.quantization_param_path is not None and not self.kv_cache_dtype.startswith("fp8"):
            raise ValueError("quantization_param_path holds fp8 KV scales: it needs --kv-cache-dtype fp8*")
        if not isinstance(self.swa_full_tokens_ratio, (int, float)) or not 0 < self.swa_full_tokens_ratio <= 1:
            raise ValueError(f"swa_full_tokens_ratio must be in (0, 1]; got {self.swa_full_tokens_ratio!r}")
        if not isinstance(self.generation_config, str) or not self.generation_config:
            raise ValueError(f"generation_config must be auto, vllm or a folder; got {self.generation_config!r}")
        if self.generation_config not in GENERATION_CONFIG_MODES and not Path(self.generation_config).is_dir():
            raise ValueError(f"generation_config must be auto, vllm or a folder holding generation_config.json; "
                             f"{self.generation_config!r} is not a folder")
        parse_override(self.override_generation_config)  # ValueError naming the bad key
        self.max_images_per_prompt()  # validates limit_mm_per_prompt
        self.dist_config()  # validates the tensor-parallel layout
        if self.allowed_local_media_path is not None and not Path(self.allowed_local_media_path).is_dir():
            raise ValueError(f"allowed_local_media_path must be a folder; {self.allowed_local_media_path!r} is not")
        self.spec_config()  # validates the speculative settings

    def max_images_per_prompt(self) -> int:
        """--limit-mm-per-prompt's image count (default 10: Llama 4 is good up to 8-10 images)."""
        spec = self.limit_mm_per_prompt
        if spec is None:
            return DEFAULT_MAX_IMAGES
        return parse_limit_mm_per_prompt(spec).get("image", DEFAULT_MAX_IMAGES)

    def dist_config(self) -> DistConfig:
        ep = self.tp_size if self.ep_size == -1 else self.ep_size  # (-1: --enable-expert-parallel)
        return DistConfig(self.tp_size, self.nnodes, self.node_rank, self.dist_init_addr, ep)

    def spec_config(self) -> SpecConfig | None:
        """The validated speculative settings, or None when speculation is off."""
        return SpecConfig.from_options(
            self.speculative_algorithm,
            self.speculative_draft_model_path,
            self.speculative_num_steps,
            self.speculative_eagle_topk,
            self.speculative_num_draft_tokens,
            self.speculative_accept_threshold_single,
            self.speculative_accept_threshold_acc,
            self.speculative_token_map,
            self.speculative_adaptive,
            self.speculative_ngram_merge,
        )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**kwargs)
