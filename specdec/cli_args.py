"""Engine flags with SGLang's names, shared by every subcommand that starts an engine."""

from __future__ import annotations

import argparse
from typing import Any

from .engine_config import (
    ATTENTION_BACKENDS,
    DEFAULT_MAX_IMAGES,
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    KV_CACHE_DTYPES,
    LOG_LEVELS,
    QUANTIZATION_CHOICES,
    EngineConfig,
)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    g = parser.add_argument_group("model and engine")
    g.add_argument("--model-path", default=None,
                   help="HF-style checkpoint folder (config.json + safetensors). "
                   "Default: the embedded SmolLM2-135M-Instruct, converted once into the cache.")
    g.add_argument("--tokenizer-path", default=None, help="Tokenizer folder (default: the model's).")
    g.add_argument("--dtype", default=d.dtype, choices=DTYPE_CHOICES,
                   help="Weight and activation dtype; auto takes the checkpoint's.")
    g.add_argument("--quantization", default=None, choices=QUANTIZATION_CHOICES,
                   help="Quantisation applied at load time: w8a16 (int8 weights per channel), "
                   "w8a8_int8 (the same weights, activations int8 per block of 64 k: ~1.6x faster "
                   "multi-row products on AVX-512 VNNI, a little less accurate) or w4a16 (int4, "
                   "groups of 32 with scale and minimum, like llama.cpp's Q4_1); our kernels on "
                   "x86 CPUs (AVX2, AVX-512, AMX). Default: none.")
    g.add_argument("--device", default=d.device,
                   help=f"{' | '.join(DEVICE_CHOICES)} | cuda:N; auto picks cuda when a GPU is visible.")
    g.add_argument("--context-length", type=int, default=None,
                   help="Max prompt + output tokens (default: the model's max_position_embeddings).")
    g.add_argument("--max-total-tokens", type=int, default=None,
                   help="KV-cache capacity in tokens (default: sized from free memory).")
    g.add_argument("--mem-fraction-static", type=float, default=None,
                   help="Fraction of the device's memory (RAM on the CPU) the weights plus the KV cache may "
                        "take, as in SGLang; the KV gets what is free beyond the rest. Default: the KV takes "
                        f"{round(d.mem_fraction_kv * 100)}%% of the memory free after loading.")
    g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=KV_CACHE_DTYPES,
                   help="KV-cache storage: auto (the model dtype) or fp8 (= fp8_e4m3) / fp8_e5m2 with "
                        "per-layer scales (the checkpoint's k_scale / v_scale, else "
                        "--quantization-param-path, else 1.0), upcast in attention: half the bytes of "
                        "bf16, a quarter of float32.")
    g.add_argument("--quantization-param-path", default=None,
                   help="JSON of fp8 KV scales per layer ({\"kv_cache\": {\"scaling_factor\": "
                        "{\"0\": {\"<layer>\": scale}}}}, as SGLang and vLLM read it).")
    g.add_argument("--swa-full-tokens-ratio", type=float, default=d.swa_full_tokens_ratio,
                   help="Hybrid KV (models with chunked-attention layers, e.g. Llama 4): the chunked "
                        "layers' pool holds this fraction of the full pool's tokens and each request keeps "
                        "only its current chunk window there, so the full layers decide the context length.")
    g.add_argument("--disable-hybrid-swa-memory", action="store_true",
                   help="One KV pool for every layer (chunked layers keep every position too).")
    g.add_argument("--page-size", type=int, default=d.page_size, help="Tokens per KV page.")
    g.add_argument("--max-running-requests", type=int, default=d.max_running_requests,
                   help="Max requests decoded together.")
    g.add_argument("--max-prefill-tokens", type=int, default=d.max_prefill_tokens,
                   help="Token budget of one prefill batch.")
    g.add_argument("--disable-radix-cache", action="store_true",
                   help="Turn the prefix cache off (requests sharing a prefix reuse its KV pages).")
    g.add_argument("--chunked-prefill-size", type=int, default=d.chunked_prefill_size,
                   help="Tokens of one prompt fed per forward; longer prompts are prefilled in chunks "
                        "between other requests' decode steps (-1: the whole prompt at once).")
    t = parser.add_argument_group("tensor parallelism")
    t.add_argument("--tp-size", "--tp", "--tensor-parallel-size", dest="tp_size", type=int, default=d.tp_size,
                   help="Ranks the target is sharded over (SGLang's --tp-size; vLLM's --tensor-parallel-size): "
                   "attention heads, KV heads, MLP and expert widths and the vocabulary split N ways, one process "
                   "per rank over torch.distributed (gloo on the CPU, NCCL on GPUs); rank 0 schedules, samples "
                   "and runs the EAGLE3 draft.")
    t.add_argument("--ep-size", "--ep", "--expert-parallel-size", dest="ep_size", type=int, default=d.ep_size,
                   help="Expert parallelism (SGLang's --ep-size): the --tp ranks form this many groups, each "
                   "holding 1/ep of the MoE experts (split within the group by tp/ep); --ep-size = --tp places "
                   "whole experts. Must divide --tp; 1: every expert split over all ranks.")
    t.add_argument("--enable-expert-parallel", action="store_const", const=-1, dest="ep_size",
                   help="vLLM's flag: --ep-size = --tp.")
    t.add_argument("--nnodes", type=int, default=d.nnodes, help="Machines the ranks are spread over.")
    t.add_argument("--node-rank", type=int, default=d.node_rank,
                   help="This machine's index; node 0 serves, the others run their ranks and wait.")
    t.add_argument("--dist-init-addr", default=None,
                   help="host:port where rank 0 meets the others (needed with --nnodes > 1; default: a free "
                   "local port).")
    m = parser.add_argument_group("images")
    m.add_argument("--enable-multimodal", action="store_true",
                   help="Load Llama 4's vision tower and projector (vision_model.*, multi_modal_projector.*) and "
                   "accept images: image_url chat content parts and /generate's image_data (data: URLs, http(s) "
                   "URLs, local files under --allowed-local-media-path). Off: text only, the vision tensors "
                   "are skipped.")
    m.add_argument("--limit-mm-per-prompt", default=None,
                   help=f"vLLM's: the most images one prompt may carry, image=N or '{{\"image\": N}}' "
                   f"(default {DEFAULT_MAX_IMAGES}).")
    m.add_argument("--allowed-local-media-path", default=None,
                   help="vLLM's: a folder whose image files requests may name (file:// URLs or absolute paths); "
                   "default: no local files.")
    g.add_argument("--chat-template", default=None,
                   help="Built-in name (chatml, llama-4, smollm2) or a jinja file; default: the "
                        "checkpoint's (the embedded SmolLM2's becomes smollm2, which adds tools).")
    g.add_argument("--tool-call-parser", default=None,
                   choices=("pythonic", "llama4", "llama4_pythonic", "hermes", "smollm2", "none"),
                   help="How answers carry tool calls (pythonic: Llama 4's [f(a=1)]; hermes: JSON in "
                        "<tool_call> tags); default: the chat template's own (llama-4: pythonic, "
                        "smollm2: hermes); none: refuse tools.")
    g.add_argument("--attention-backend", default=d.attention_backend, choices=ATTENTION_BACKENDS,
                   help="auto: torch on the CPU.")
    g.add_argument("--random-seed", type=int, default=None, help="Seed of the global RNG.")
    g.add_argument("--log-level", default=d.log_level, choices=LOG_LEVELS)
    g.add_argument("--trust-remote-code", action="store_true",
                   help="Accepted for SGLang compatibility; downloaded code is never executed.")
    g.add_argument("--skip-tokenizer-init", action="store_true",
                   help="Do not load a tokenizer (requests must pass input_ids).")
    g.add_argument("--generation-config", default=d.generation_config,
                   help="vLLM's: where the default sampling parameters come from. auto: the model "
                   "folder's generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty, "
                   "max_new_tokens as the default max_tokens); vllm: none (neutral defaults); or a folder "
                   "holding a generation_config.json. A request's own values always win.")
    g.add_argument("--override-generation-config", default=None,
                   help="vLLM's: a JSON object merged over the generation config, e.g. "
                   "'{\"temperature\": 0.6, \"top_p\": 0.9}' (null drops a key); also "
                   "'{\"attn_temperature_tuning\": true}', which turns on Llama 4's query scaling on its "
                   "NoPE layers (vLLM's Llama 4 guide, for long contexts).")
    s = parser.add_argument_group("speculative decoding")
    s.add_argument("--speculative-algorithm", default=None, type=str.upper,
                   choices=["EAGLE3", "EAGLE", "NGRAM", "NONE"],
                   help="EAGLE3 (an EAGLE3 draft head), EAGLE (same head format), NGRAM (prompt "
                   "lookup, no draft model), NONE (off). Default: EAGLE3 with the shipped head when "
                   "serving the embedded model (tree 2,1,3 unless the three tree flags are given: the "
                   "fastest measured on a 2-core CPU), otherwise off.")
    s.add_argument("--speculative-draft-model-path", default=None,
                   help="EAGLE3 head folder (SGLang/vLLM format: config.json + safetensors).")
    s.add_argument("--speculative-num-steps", type=int, default=None,
                   help="Drafting rounds = max tree depth (default 5).")
    s.add_argument("--speculative-eagle-topk", type=int, default=None,
                   help="Nodes expanded per round and children per node (default 4; 1 = chain).")
    s.add_argument("--speculative-num-draft-tokens", type=int, default=None,
                   help="Tree size verified per step, root included (default 8; chain: steps + 1).")
    s.add_argument("--speculative-accept-threshold-single", type=float, default=1.0,
                   help="Lossy: accept a draft token whose target probability reaches this (1 = off).")
    s.add_argument("--speculative-accept-threshold-acc", type=float, default=1.0,
                   help="Lossy: divide the acceptance ratio's threshold by this (1 = lossless).")
    s.add_argument("--speculative-adaptive", default="auto", choices=["auto", "on", "off"],
                   help="Adaptive trees (EAGLE3/EAGLE): each step picks per request the tree shape, no "
                   "speculation included, that maximises expected tokens/s from this machine's measured "
                   "step costs and the request's acceptance so far. auto: on unless a tree flag is given "
                   "(then the tree is fixed); with on, the tree flags bound the shapes (default envelope "
                   "6,4,16); off: always the configured tree.")
    s.add_argument("--speculative-ngram-merge", action=argparse.BooleanOptionalAction, default=None,
                   help="EAGLE3/EAGLE: also draft by copying: the continuation of the last n-gram found "
                   "earlier in the request's own prompt and output joins the head's candidates in one tree "
                   "(same --speculative-num-draft-tokens budget, nodes kept by estimated acceptance); "
                   "adaptive trees may also verify the copied text alone, without a draft forward. "
                   "Default: on for the embedded model with its shipped head, off otherwise.")
    s.add_argument("--speculative-token-map", default=None,
                   help="Accepted for SGLang compatibility; EAGLE3 heads carry their own d2t map.")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig fields present in parsed args."""
    fields = set(EngineConfig.__dataclass_fields__)
    return {k: v for k, v in vars(args).items() if k in fields}


def resolve_speculative_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """NONE turns speculation off; the embedded model gets EAGLE3 with its shipped head."""
    kwargs = dict(kwargs)
    algo = kwargs.get("speculative_algorithm")
    merge = kwargs.get("speculative_ngram_merge")
    kwargs["speculative_ngram_merge"] = bool(merge)
    if algo == "NONE":
        kwargs["speculative_algorithm"] = None
        kwargs["speculative_ngram_merge"] = False
        return kwargs
    if algo is None and kwargs.get("model_path") is None and kwargs.get("speculative_draft_model_path") is None:
        from specdec.draft.heads import (
            EMBEDDED_NGRAM_MERGE,
            EMBEDDED_TREE,
            shipped_head_for_embedded,
        )

        head = shipped_head_for_embedded()
        if head is not None:
            kwargs["speculative_algorithm"] = "EAGLE3"
            kwargs["speculative_draft_model_path"] = str(head)
            kwargs["speculative_ngram_merge"] = EMBEDDED_NGRAM_MERGE if merge is None else merge
            tree = ("speculative_num_steps", "speculative_eagle_topk", "speculative_num_draft_tokens")
            # no tree flags: adaptive trees, or, with adaptive off, the fixed tree measured
            # fastest (like SGLang's per-model auto choice)
            if all(kwargs.get(k) is None for k in tree) and kwargs.get("speculative_adaptive") == "off":
                kwargs.update(zip(tree, EMBEDDED_TREE, strict=True))
    elif algo in ("EAGLE3", "EAGLE") and kwargs.get("speculative_draft_model_path") is None \
            and kwargs.get("model_path") is None:
        from specdec.draft.heads import EMBEDDED_NGRAM_MERGE, shipped_head_for_embedded

        head = shipped_head_for_embedded()
        if head is not None:
            kwargs["speculative_draft_model_path"] = str(head)
            kwargs["speculative_ngram_merge"] = EMBEDDED_NGRAM_MERGE if merge is None else merge
    return kwargs
