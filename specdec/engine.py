"""The offline engine, shaped like `sglang.Engine`.

    with specdec.Engine(model_path=None, dtype="float32") as engine:
        out = engine.generate(prompt="Hello", sampling_params={"temperature": 0})
        out["text"], out["output_ids"], out["meta_info"]["finish_reason"]

A list of prompts (or of input_ids lists) runs together in one engine loop and returns a
list of dicts in the same order.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from specdec.draft.eagle3 import Eagle3Draft
from specdec.draft.eagle3_proposer import Eagle3Proposer, eagle3_temp_slots
from specdec.draft.eagle3_tp import load_eagle3_for_rank
from specdec.draft.loader import load_eagle3
from specdec.draft.ngram import NgramProposer
from specdec.draft.proposer import Proposer
from specdec.kernels import AttentionBackend, cpu_kernels, get_attention_backend
from specdec.kernels.kv_pool import KVPool
from specdec.target.config import CheckpointLayout, ModelConfig
from specdec.target.embedded import default_cache_dir, resolve_model_path
from specdec.target.loader import load_model
from specdec.target.quant import quantize_model
from specdec.target.tp import plan_shard
from specdec.target.vision import VisionTower, load_vision_tower
from specdec.target.vision_config import VisionConfig

from .distributed import TPGroup, close_group, free_addr, init_group, spawn_workers
from .engine_config import EngineConfig
from .generation_config import load_generation_defaults
from .grammar import GrammarBackend, RequestGrammar, grammar_spec
from .kv_budget import KVLayout, KVPlan, plan_kv, static_kv_budget
from .kv_dtype import apply_kv_scales, kv_storage_dtype
from .media import MediaLimits
from .metrics import EngineMetrics
from .model_runner import ModelRunner
from .model_worker import ModelWorker
from .multimodal import (
    IMAGE_TOKEN_NAMES,
    MultimodalInputs,
    MultimodalProcessor,
    image_processor_config,
    image_tokens_from_tokenizer,
)
from .page_allocator import PageAllocator, PageTable, available_memory_bytes, total_memory_bytes
from .prefix_cache import PrefixCache
from .request import Req
from .sampler import make_generator
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerLimits
from .spec_worker import SpecWorker, extra_slots_for
from .swa_table import WindowPageTable, window_pages_needed
from .tp_worker import footprint

log = logging.getLogger("specdec")

Prompt = str | Sequence[str] | None
InputIds = Sequence[int] | Sequence[Sequence[int]] | None


def resolve_device(name: str) -> torch.device:
    """`--device`: auto -> cuda when a GPU is visible, else cpu; cuda without a GPU is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                         "use --device cpu")
    return device


class Engine:
    """Loads the model once; `generate` runs requests through the continuous-batching loop."""

    def __init__(self, **kwargs: Any) -> None:
        self.config = EngineConfig.from_kwargs(**kwargs)
        logging.basicConfig(level=self.config.log_level.upper(), format="[specdec] %(message)s")
        if self.config.random_seed is not None:
            torch.manual_seed(self.config.random_seed)
        self.model_path = resolve_model_path(self.config.model_path)
        # the CPU kernel tier, decided (and its extension built) once per process; a forced
        # SPECDEC_CPU_ISA this CPU lacks fails here with IsaUnavailable (a ValueError)
        self.cpu_isa = cpu_kernels.active_isa()
        t0 = time.perf_counter()
        self.device = resolve_device(self.config.device)
        self.tp: TPGroup | None = None  # --tp N: this process is rank 0 (specdec/distributed.py)
        self._workers: list[Any] = []
        self.tp_footprints: list[dict[str, int]] = []  # per rank: weight and KV bytes
        if self.config.tp_size > 1:
            self._start_tp(kwargs)
        try:
            # the model's default sampling parameters (vLLM's --generation-config and
            # --override-generation-config; its attn_temperature_tuning goes to the model config)
            self.generation_defaults = load_generation_defaults(
                self.config.generation_config, self.config.override_generation_config, self.model_path)
            self.model, self.model_config = load_model(self.model_path, self.config.dtype,
                                                       self.generation_defaults.attn_temperature_tuning,
                                                       self.config.enable_multimodal, self.tp,
                                                       self.config.dist_config().ep_size)
            self.model.to(self.device)
            self.vision: VisionTower | None = None
            if self.config.enable_multimodal:
                if self.model_config.layout is not CheckpointLayout.LLAMA4_CONDITIONAL:
                    raise ValueError(f"--enable-multimodal needs a Llama4ForConditionalGeneration checkpoint; "
                                     f"{self.model_path} is {self.model_config.architecture} (text only)")
                if self.config.skip_tokenizer_init:
                    raise ValueError("--enable-multimodal needs the tokenizer (the image layout's tokens): "
                                     "drop --skip-tokenizer-init")
                self.vision = load_vision_tower(self.model_path, self.config.dtype, self.model_config)
                self.vision.to(self.device)
            log.info("loaded %s (%s) in %.1fs on %s", self.model_path, self.model_config.architecture,
                     time.perf_counter() - t0, self.device)
            log.info("default sampling parameters: %s", self.generation_defaults.describe())
            quantize_model(self.model, self.config.quantization)  # after placement: kernels per device
            if self.device.type == "cuda" and self.model.use_triton_moe():  # top-1 MoE, unquantised experts
                log.info("MoE experts run the Triton grouped top-1 kernel")
            self.tokenizer = None if self.config.skip_tokenizer_init else _load_tokenizer(
                Path(self.config.tokenizer_path or self.model_path)
            )
            self.eos_token_ids = _eos_ids(self.model_path, self.model_config, self.tokenizer)
            self.mm_processor = None if self.vision is None else self._mm_processor(self.vision.cfg)
            # what a chat template writes for an image part (None: this engine takes no images)
            self.image_placeholder: str | None = None if self.vision is None else IMAGE_TOKEN_NAMES["image"]
            limit = self.model_config.max_position_embeddings
            if self.config.context_length is not None and self.config.context_length > limit:
                raise ValueError(f"--context-length {self.config.context_length} exceeds the model's "
                                 f"max_position_embeddings ({limit})")
            self.context_length = self.config.context_length or limit
            dtype = next(self.model.parameters()).dtype
            self.kv_dtype = kv_storage_dtype(self.config.kv_cache_dtype, dtype)
            scales_from = apply_kv_scales(self.model, self.kv_dtype, self.config.quantization_param_path)
            self.spec_config = self.config.spec_config()
            self.draft_model = self._load_draft()
            page_size = self.config.page_size
            mc = self.model_config
            chunked = [mc.chunk_size(i) is not None for i in range(mc.num_layers)]
            # hybrid KV: the chunked layers get a window pool (on by default, as in SGLang)
            # (a model whose every layer is chunked keeps one pool: the full pool's page tables would
            # have no layer to hold)
            self.hybrid_kv = any(chunked) and not all(chunked) and not self.config.disable_hybrid_swa_memory
            self.kv_layout = self._kv_layout(dtype, sum(chunked) if self.hybrid_kv else 0)
            self.kv_plan = self._kv_plan()
            self.max_total_tokens = self.kv_plan.full_tokens
            self.allocator = PageAllocator(self.max_total_tokens // page_size, page_size)
            self.kv_pool = KVPool(mc.num_layers - sum(chunked) if self.hybrid_kv else mc.num_layers,
                                  self.max_total_tokens, self.model.kv_heads, mc.head_dim, self.kv_dtype, self.device)
            self.swa_allocator: PageAllocator | None = None
            swa_pool = None
            if self.hybrid_kv:
                swa_tokens = self.kv_plan.swa_tokens
                self.swa_allocator = PageAllocator(swa_tokens // page_size, page_size)
                swa_pool = KVPool(sum(chunked), swa_tokens, self.model.kv_heads, mc.head_dim, self.kv_dtype, self.device)
            if self.tp is not None:  # the workers build the same pools over their KV heads
                self.tp.broadcast((len(self.kv_pool.k), self.max_total_tokens,
                                   0 if swa_pool is None else len(swa_pool.k), 0 if swa_pool is None else swa_pool.num_slots))
            backend = get_attention_backend(self.config.attention_backend, self.device)
            self.runner = ModelRunner(self.model, self.kv_pool, backend, swa_pool, self.vision, self.tp)
            self.metrics = EngineMetrics()
            self.spec = self._make_spec_worker(backend, dtype)
            if self.tp is not None:  # what each rank holds, once the workers have built their pools
                proposer = None if self.spec is None else self.spec.proposer
                draft_pool = proposer.pool if isinstance(proposer, Eagle3Proposer) and proposer.tp else None
                gathered = self.tp.gather(footprint(self.model, [self.kv_pool, swa_pool],
                                                    self.draft_model if draft_pool is not None else None, draft_pool))
                self.tp_footprints = list(gathered or [])
                log.info("tensor parallel: %d ranks; weights per rank %s MiB", self.tp.world,
                         ", ".join(f"{f['weight_bytes'] / 2**20:.1f}" for f in self.tp_footprints))
            self.worker = ModelWorker(self.runner, self.spec)
            self.scheduler = Scheduler(
                self.worker,
                self.allocator,
                SchedulerLimits(
                    max_running_requests=self.config.max_running_requests,
                    max_prefill_tokens=self.config.max_prefill_tokens,
                    context_length=self.context_length,
                    chunked_prefill_size=self.config.chunked_prefill_size,
                ),
                self.eos_token_ids,
                None if self.tokenizer is None else self.detokenize,
                self.metrics,
                None if self.config.disable_radix_cache else PrefixCache(self.allocator),
                self.swa_allocator,
                None if self.config.disable_radix_cache or self.swa_allocator is None else PrefixCache(self.swa_allocator),
            )
            self._ids = itertools.count()
            self._grammar: GrammarBackend | None = None
            self._grammar_lock = threading.Lock()
            self._log_kv(scales_from)
            if self.spec is not None and self.spec.spec.adaptive:
                from .step_costs import load_or_measure
                from .tree_chooser import OnlineCosts

                env = self.spec.spec.envelope
                self.spec.costs = OnlineCosts(load_or_measure(self, env.num_draft_tokens, default_cache_dir()))
                log.info("adaptive speculation: %d tree shapes within (%s)", len(self.spec.shapes), env.label)
        except BaseException:  # a failed start must not leave the other ranks (or the group) behind
            self._abort_tp()
            raise

    # ---- set-up helpers -------------------------------------------------------------------------
    def _start_tp(self, kwargs: dict[str, Any]) -> None:
        """Rank 0 of --tp N: start this node's other ranks and meet every rank (one group per
        process: a second tensor-parallel engine needs the first one's `shutdown`)."""
        dc = self.config.dist_config()
        if dc.node_rank != 0:
            raise ValueError("the engine runs on node 0; start the other nodes with `specdec serve --node-rank K`")
        if self.config.enable_multimodal:
            raise ValueError("--enable-multimodal with --tp > 1 is not supported yet (the vision tower runs "
                             "unsharded on one rank)")
        # sizes that do not divide: refused here
        plan_shard(ModelConfig.from_path(self.model_path), 0, dc.tp_size, dc.ep_size)
        addr = dc.dist_init_addr or free_addr()
        self._workers = spawn_workers(range(1, dc.ranks_per_node), dc.tp_size, addr, dict(kwargs, dist_init_addr=addr))
        try:
            self.tp = init_group(0, dc.tp_size, addr, self.device, self._workers)
        except BaseException:
            self._abort_tp()
            raise

    def _abort_tp(self) -> None:
        for p in self._workers:
            p.terminate()
        close_group()
        self.tp = None

    def _stop_tp(self) -> None:
        if self.tp is None:
            return
        self.tp.broadcast(("stop",))
        for p in self._workers:
            p.join(timeout=30)
        close_group()
        self.tp = None
        self.runner.tp = None

    def _load_draft(self) -> Eagle3Draft | None:
        spec = self.spec_config
        if spec is None or spec.algorithm == "NGRAM":
            return None
        if spec.draft_model_path is None:
            raise ValueError(
                f"--speculative-algorithm {spec.algorithm} needs --speculative-draft-model-path "
                "(an EAGLE3 head in the SGLang/vLLM checkpoint format)"
            )
        t0 = time.perf_counter()
        if self.tp is None:
            draft = load_eagle3(spec.draft_model_path, self.model, self.config.dtype)
        else:  # --tp: split over the ranks as the target is, or whole on rank 0 (draft/eagle3_tp.py)
            draft, problem = load_eagle3_for_rank(spec.draft_model_path, self.model_path, self.model,
                                                  self.config.dtype, self.tp)
            log.info("EAGLE3 head: %s", f"{problem}; it runs whole on rank 0" if problem else
                     f"split over the {self.tp.world} ranks")
        draft.to(self.device)
        quantize_model(draft, self.config.quantization)
        log.info("loaded EAGLE3 draft %s in %.1fs (aux layers %s)", spec.draft_model_path,
                 time.perf_counter() - t0, draft.cfg.capture_layers(self.model_config.num_layers))
        return draft

    def _mm_processor(self, vcfg: VisionConfig) -> MultimodalProcessor:
        tokens = image_tokens_from_tokenizer(self.tokenizer, vcfg.image_token_id, vcfg.boi_token_id,
                                             vcfg.eoi_token_id)
        media = self.config.allowed_local_media_path
        limits = MediaLimits(allowed_local_media_path=None if media is None else Path(media))
        return MultimodalProcessor(tokens, vcfg.tokens_per_tile, image_processor_config(self.model_path, vcfg.image_size),
                                   limits, self.config.max_images_per_prompt())

    def prepare_images(self, ids: Sequence[int], images: Sequence[Any]) -> tuple[list[int], MultimodalInputs | None]:
        """The prompt with its image placeholders expanded to Llama 4's layout, and the images
        to embed (None without images). Raises ValueError (MediaError) naming the problem."""
        if not images:
            return list(ids), None
        if self.mm_processor is None:
            raise ValueError("this server does not take images: start it with --enable-multimodal "
                             "(a Llama 4 checkpoint with its vision tower)")
        return self.mm_processor.prepare(ids, images)

    def _make_spec_worker(self, backend: AttentionBackend, dtype: torch.dtype) -> SpecWorker | None:
        spec = self.spec_config
        if spec is None:
            return None
        proposer: Proposer
        if self.draft_model is None:
            proposer = NgramProposer(spec)
        else:
            d = self.draft_model
            pool = KVPool(1, self.max_total_tokens, d.num_kv_heads, d.cfg.head_dim, dtype, self.device)
            proposer = Eagle3Proposer(d, pool, backend, spec, self.model_config.num_layers,
                                      self.model_config.vocab_size, d.tp)
        return SpecWorker(spec, proposer, self.runner)

    def _extra_slots(self) -> int:
        """Slots beyond the committed prefix one speculative step needs (SpecWorker.extra_slots,
        known before the decoder is built: the pools are sized from it)."""
        spec = self.spec_config
        if spec is None:
            return 0
        return extra_slots_for(spec, 0 if self.draft_model is None else eagle3_temp_slots(spec))

    def _kv_layout(self, dtype: torch.dtype, swa_layers: int) -> KVLayout:
        """What one slot costs in each pool (the draft's K/V, a full layer, stays in the model dtype)."""
        mc = self.model_config
        full = KVPool.bytes_per_token(mc.num_layers - swa_layers, self.model.kv_heads, mc.head_dim, self.kv_dtype)
        if self.draft_model is not None:  # the draft's pool shares the full pool's slot space
            d = self.draft_model  # (--tp with a split head: this rank's KV heads)
            full += KVPool.bytes_per_token(1, d.num_kv_heads, d.cfg.head_dim, dtype)
        swa = KVPool.bytes_per_token(swa_layers, self.model.kv_heads, mc.head_dim, self.kv_dtype) if swa_layers else 0
        window = 0
        if swa_layers:
            chunk = mc.attention_chunk_size
            assert chunk is not None
            ctx, ps, extra = self.context_length, self.config.page_size, self._extra_slots()
            size = self.config.chunked_prefill_size
            feed = min(size if size > 0 else ctx, ctx)  # the most one forward feeds (prefill chunk)
            # one forward's window: its chunk so far plus what it feeds, and never more than a
            # whole request's positions
            window = min(window_pages_needed(chunk, ps, feed + extra), -(-(ctx + extra) // ps)) * ps
        return KVLayout(full, swa, self.config.page_size, window)

    def _kv_plan(self) -> KVPlan:
        cfg = self.config
        if cfg.max_total_tokens is not None:
            return plan_kv(self.kv_layout, cfg.swa_full_tokens_ratio, max_total_tokens=cfg.max_total_tokens)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
        else:
            free, total = available_memory_bytes(), total_memory_bytes()
        if cfg.mem_fraction_static is not None:
            budget = static_kv_budget(cfg.mem_fraction_static, total, free)
        else:
            budget = int(free * cfg.mem_fraction_kv)
        return plan_kv(self.kv_layout, cfg.swa_full_tokens_ratio, budget_bytes=budget)

    def _log_kv(self, scales_from: str) -> None:
        plan, layout = self.kv_plan, self.kv_layout
        full_b, swa_b = plan.bytes(layout)
        dtype = str(self.kv_dtype).removeprefix("torch.")
        scales = "" if scales_from == "none" else f", scales from {scales_from}"
        log.info("KV cache (%s%s): full pool %d tokens (%.1f MiB) in pages of %d", dtype, scales,
                 plan.full_tokens, full_b / 2**20, self.config.page_size)
        if plan.swa_tokens:
            log.info("hybrid KV: chunked layers' window pool %d tokens (%.1f MiB; ratio %.2f%s; one request's "
                     "window needs up to %d); context length %d, the full pool holds up to %d tokens of one "
                     "request", plan.swa_tokens, swa_b / 2**20, self.config.swa_full_tokens_ratio,
                     ", raised to one window" if plan.raised_swa else "", layout.window_tokens,
                     self.context_length, plan.full_tokens - self._extra_slots())
        else:
            log.info("context length %d; the KV cache holds up to %d tokens of one request",
                     self.context_length, plan.full_tokens - self._extra_slots())

    def kv_tables(self) -> tuple[PageTable, WindowPageTable | None]:
        """A new request's page tables: the full pool's and, with hybrid KV, its window table."""
        swa = None
        if self.swa_allocator is not None:
            chunk = self.model_config.attention_chunk_size
            assert chunk is not None
            swa = WindowPageTable(self.swa_allocator, chunk)
        return PageTable(self.allocator), swa

    def detokenize(self, ids: list[int], skip_special_tokens: bool) -> str:
        assert self.tokenizer is not None
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this engine was started with skip_tokenizer_init: pass input_ids")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # ---- requests -------------------------------------------------------------------------------
    def sampling_params(self, d: Mapping[str, Any] | None) -> SamplingParams:
        """A request's sampling dict -> SamplingParams; keys it leaves out (or null) take the
        generation-config defaults (specdec/generation_config.py), then SamplingParams' own."""
        return SamplingParams.from_dict(d, self.generation_defaults.sampling)

    def max_new_tokens_for(self, prompt_len: int) -> int:
        """The most tokens a request with this prompt can generate: what the context length and
        the KV cache can both hold (a request without max_tokens gets this, as in SGLang)."""
        extra = 0 if self.spec is None else self.spec.extra_slots
        return min(self.context_length - prompt_len, self.max_total_tokens - prompt_len - extra)

    def make_request(
        self,
        input_ids: Sequence[int],
        params: SamplingParams,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        rid: str | None = None,
        mm: MultimodalInputs | None = None,
    ) -> Req:
        """Validate one request against the model and the KV cache; raises ValueError. `mm`:
        the prompt's images (`prepare_images`, which gave `input_ids`)."""
        ids = [int(t) for t in input_ids]
        if not ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"input_ids contain ids outside [0, {vocab}): {bad[:5]}")
        if len(ids) + params.max_new_tokens > self.context_length:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                f"the context length ({self.context_length})"
            )
        extra = 0 if self.spec is None else self.spec.extra_slots
        if len(ids) + params.max_new_tokens + extra > self.max_total_tokens:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                f"the KV cache ({self.max_total_tokens} tokens); raise --max-total-tokens"
            )
        bad = [t for t, _ in params.logit_bias if t >= vocab]
        if bad:
            raise ValueError(f"logit_bias names token ids outside [0, {vocab}): {bad[:5]}")
        if not isinstance(top_logprobs_num, int) or not 0 <= top_logprobs_num <= vocab:
            raise ValueError(f"top_logprobs_num must be an integer in [0, {vocab}] (the vocabulary); "
                             f"got {top_logprobs_num!r}")
        if (self.swa_allocator is not None and return_logprob and logprob_start_len >= 0
                and len(ids) + extra > self.kv_plan.swa_tokens):
            raise ValueError(
                f"prompt logprobs need the whole prompt ({len(ids)} tokens) in one forward, more than the "
                f"chunked layers' KV pool holds ({self.kv_plan.swa_tokens}); raise --swa-full-tokens-ratio"
            )
        grammar = self._request_grammar(params)
        table, swa_table = self.kv_tables()
        return Req(
            rid=rid or uuid.uuid4().hex,
            prompt_ids=ids,
            params=params,
            page_table=table,
            swa_table=swa_table,
            generator=make_generator(params.seed) if not params.is_greedy else None,
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num,
            grammar=grammar,
            mm=mm,
        )

    def grammar_backend(self) -> GrammarBackend:
        """The structured-output backend, built on first use (it reads the whole vocabulary)."""
        with self._grammar_lock:
            if self._grammar is None:
                if self.tokenizer is None:
                    raise ValueError("json_schema / regex / ebnf need the tokenizer: this engine was "
                                     "started with skip_tokenizer_init")
                self._grammar = GrammarBackend(self.tokenizer, self.model_config.vocab_size,
                                               list(self.eos_token_ids))
            return self._grammar

    def _request_grammar(self, params: SamplingParams) -> RequestGrammar | None:
        spec = grammar_spec(params)
        return None if spec is None else self.grammar_backend().matcher(spec)

    def _normalise(
        self, prompt: Prompt, input_ids: InputIds, sampling_params: Any
    ) -> tuple[list[list[int]], list[SamplingParams], bool]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompt and input_ids")
        if prompt is not None:
            single = isinstance(prompt, str)
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("prompt must be a string or a list of strings")
            ids = [self.encode(t) for t in texts]
        else:
            assert input_ids is not None
            seq: list[Any] = list(input_ids)
            single = not seq or not isinstance(seq[0], (list, tuple))
            ids = [[int(t) for t in seq]] if single else [[int(t) for t in x] for x in seq]
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(ids):
                raise ValueError(f"{len(sampling_params)} sampling_params for {len(ids)} prompts")
            params = [self.sampling_params(p) for p in sampling_params]
        else:
            params = [self.sampling_params(sampling_params)] * len(ids)
        return ids, params, single

    def generate(
        self,
        prompt: Prompt = None,
        sampling_params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        input_ids: InputIds = None,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        stream: bool = False,
        image_data: Any = None,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """Generate for one prompt (returns a dict) or a batch (returns a list of dicts).

        With `stream=True` (single prompt) returns an iterator of dicts whose `text` holds the
        new text since the previous chunk, as `sglang.Engine.generate(stream=True)` does.
        `image_data` (--enable-multimodal), as in SGLang: an image (URL, data: URL, path under
        --allowed-local-media-path) or a list of them per prompt, one `<|image|>` each in order.
        """
        ids, params, single = self._normalise(prompt, input_ids, sampling_params)
        images = per_prompt_images(image_data, len(ids), single)
        prepared = [self.prepare_images(i, imgs) for i, imgs in zip(ids, images, strict=True)]
        reqs = [
            self.make_request(i, p, return_logprob, logprob_start_len, top_logprobs_num, mm=mm)
            for (i, mm), p in zip(prepared, params, strict=True)
        ]
        if stream:
            if not single:
                raise ValueError("stream=True takes a single prompt")
            return self._stream(reqs[0])
        for r in reqs:
            self.scheduler.add(r)
        while any(not r.finished for r in reqs):
            self.scheduler.step()
        outs = [self.result(r) for r in reqs]
        return outs[0] if single else outs

    def _stream(self, req: Req) -> Iterator[dict[str, Any]]:
        self.scheduler.add(req)
        sent_text = ""
        sent_ids = 0
        try:
            while not req.finished:
                self.scheduler.step()
                if req.output_len > sent_ids or req.finished:
                    out = self.result(req)
                    text = out["text"]
                    out["text"] = text[len(sent_text):]
                    out["output_ids"] = out["output_ids"][sent_ids:]
                    sent_text, sent_ids = text, req.output_len
                    yield out
        finally:
            if not req.finished:
                self.scheduler.abort(req.rid)

    def result(self, req: Req) -> dict[str, Any]:
        """SGLang's response dict for a request (finished or in flight)."""
        text = ""
        if self.tokenizer is not None:
            text = req.detok.final_text() if req.detok is not None else ""
            reason = req.finish_reason or {}
            if isinstance(reason.get("matched"), str):
                text = text[: text.find(reason["matched"])]
        end = req.finished_at or time.perf_counter()
        meta: dict[str, Any] = {
            "id": req.rid,
            "prompt_tokens": req.prompt_len,
            "completion_tokens": req.output_len,
            "cached_tokens": req.cached_tokens,
            "finish_reason": req.finish_reason,
            "e2e_latency": end - req.created_at,
        }
        if self.spec is not None:
            meta.update(req.spec_meta())
        if req.return_logprob:
            meta["input_token_logprobs"] = list(req.input_token_logprobs)
            meta["output_token_logprobs"] = list(req.output_token_logprobs)
            if req.top_logprobs_num:
                meta["input_top_logprobs"] = list(req.input_top_logprobs)
                meta["output_top_logprobs"] = list(req.output_top_logprobs)
        return {"text": text, "output_ids": list(req.output_ids), "meta_info": meta}

    # ---- lifecycle ------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Abort everything in flight and free the KV cache; with --tp, stop the other ranks."""
        for r in list(self.scheduler.waiting) + list(self.scheduler.running):
            self.scheduler.abort(r.rid, "engine shut down")
        self._stop_tp()

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()


def per_prompt_images(image_data: Any, n: int, single: bool) -> list[list[Any]]:
    """SGLang's image_data shapes -> a list of images per prompt: None; one image; a list
    (the images of a single prompt, or one entry per prompt of a batch, each an image, a list
    or None)."""
    if image_data is None:
        return [[] for _ in range(n)]
    if not isinstance(image_data, (list, tuple)):
        image_data = [image_data]
    if single:
        return [list(image_data)]
    if len(image_data) != n:
        raise ValueError(f"image_data has {len(image_data)} entries for {n} prompts")
    return [[] if x is None else list(x) if isinstance(x, (list, tuple)) else [x] for x in image_data]


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot load a tokenizer from {path} ({e}); pass --tokenizer-path or "
            "--skip-tokenizer-init"
        ) from e


def _eos_ids(model_path: Path, cfg: ModelConfig, tokenizer: Any) -> list[int]:
    """EOS ids from config.json, generation_config.json and the tokenizer, merged."""
    ids = set(cfg.eos_token_ids)
    gen = model_path / "generation_config.json"
    if gen.exists():
        value = json.loads(gen.read_text()).get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)
