"""Tiny random checkpoints written with transformers' own `save_pretrained`, and the comparison
of our engine's greedy decoding against transformers' full forward.

Shared by the config, loader and model-vs-transformers tests. Every checkpoint is a few KB, so a
module builds its models once (module-scoped fixtures) and each test runs in well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    Llama4Config,
    Llama4ForCausalLM,
    Llama4ForConditionalGeneration,
    Llama4TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

import specdec

VOCAB = 128
NO_CHUNK = 1 << 30  # transformers cannot run attention_chunk_size=None; a huge chunk is the same

# A Llama 4 text model with every quirk switched off: dense, RoPE on every layer, no chunking, no
# QK norm, no temperature tuning. Cases switch features on one by one.
PLAIN_LLAMA4: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 16,
    "intermediate_size_mlp": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_local_experts": 4,
    "num_experts_per_tok": 1,
    "moe_layers": [],
    "no_rope_layers": [1, 1],
    "attention_chunk_size": None,
    "use_qk_norm": False,
    "attn_temperature_tuning": False,
    "max_position_embeddings": 512,
    # bigger than transformers' 0.02 so every sub-layer visibly moves the logits
    "initializer_range": 0.1,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "tie_word_embeddings": False,
}

# A vision tower that runs in transformers: 56 px tiles of 4x4 patches, pixel-shuffled to 4
# image tokens per tile (intermediate_size = hidden_size / 0.5^2, as the adapter needs).
TINY_VISION: dict[str, Any] = {
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vision_output_dim": 24,
    "image_size": 56,
    "patch_size": 14,
    "projector_input_dim": 24,
    "projector_output_dim": 24,
    "initializer_range": 0.1,
}

TINY_LLAMA: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 512,
    "initializer_range": 0.1,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "tie_word_embeddings": False,
}


def llama4_text_kwargs(**overrides: Any) -> dict[str, Any]:
    kw = dict(PLAIN_LLAMA4, **overrides)
    if "no_rope_layers" not in overrides and "num_hidden_layers" in overrides:
        kw["no_rope_layers"] = [1] * kw["num_hidden_layers"]
    return kw


@dataclass
class Checkpoint:
    path: Path
    hf: PreTrainedModel  # the transformers model the checkpoint was saved from (eval, fp32)

    def engine(self, **kw: Any) -> Any:
        kw = {"dtype": "float32", "page_size": 16, "max_total_tokens": 1024, "skip_tokenizer_init": True,
              "log_level": "warning", **kw}
        return specdec.Engine(model_path=str(self.path), **kw)


def perturb_init(model: PreTrainedModel, router_scale: float = 20.0) -> None:
    """Make transformers' init less symmetric so every weight matters to the comparison.

    * router weights are scaled up: otherwise router logits are nearly equal and routing is
      close to arbitrary;
    * norm weights (initialised to exactly 1) get noise, so swapping two norms is caught;
    * biases (initialised to exactly 0) get noise, so a mis-loaded bias is caught.
    """
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("feed_forward.router.weight"):
                p.mul_(router_scale)
            elif name.endswith("norm.weight"):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def build_model(kind: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """kind: llama4 (Llama4ForCausalLM), llama4_conditional, llama (LlamaForCausalLM)."""
    torch.manual_seed(seed)
    model: PreTrainedModel
    if kind == "llama4":
        model = Llama4ForCausalLM(Llama4TextConfig(**llama4_text_kwargs(**overrides)))
    elif kind == "llama4_conditional":
        tie = overrides.pop("tie_word_embeddings", False)
        cfg = Llama4Config(
            text_config=llama4_text_kwargs(tie_word_embeddings=tie, **overrides),
            vision_config=dict(TINY_VISION),
            tie_word_embeddings=tie,
        )
        model = Llama4ForConditionalGeneration(cfg)
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**dict(TINY_LLAMA, **overrides)))
    else:
        raise ValueError(kind)
    perturb_init(model)
    return model.eval()


def save_checkpoint(
    model: PreTrainedModel,
    path: Path,
    dtype: torch.dtype | None = None,
    **save_kw: Any,
) -> Checkpoint:
    """`save_pretrained` (optionally in another dtype); the returned HF model is fp32 and ready
    to serve as the reference (chunk None replaced by an equivalent huge chunk)."""
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(str(path), **save_kw)
    if dtype is not None:
        model.to(torch.float32)
    text_cfg = model.config.get_text_config()
    if getattr(text_cfg, "attention_chunk_size", 0) is None:
        text_cfg.attention_chunk_size = NO_CHUNK
    return Checkpoint(path, model)


def make_checkpoint(path: Path, kind: str, seed: int = 0, **overrides: Any) -> Checkpoint:
    return save_checkpoint(build_model(kind, seed, **overrides), path)


# ---- comparison with transformers -------------------------------------------------------------


def hf_logprobs(hf: PreTrainedModel, ids: Sequence[int]) -> torch.Tensor:
    """[len(ids), vocab] fp32 log-softmax of transformers' full forward (no cache)."""
    x = torch.tensor([list(ids)])
    with torch.no_grad():
        logits = hf(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
    return logits[0].float().log_softmax(-1)


def tiny_eagle3_draft(seed: int, quantization: str | None) -> Any:
    """A random EAGLE3 draft head (hidden 64, 4 heads, 2 KV heads, head dim 16, own embedding of
    300 tokens, draft vocabulary 100), norms near 1, quantised as `quantization` asks."""
    from specdec.draft.eagle3 import Eagle3Draft
    from specdec.draft.eagle3_config import Eagle3Config
    from specdec.target.config import RopeConfig
    from specdec.target.quant import quantize_model

    cfg = Eagle3Config(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96,
                       rms_norm_eps=1e-6, vocab_size=300, draft_vocab_size=100, target_hidden_size=64,
                       rope=RopeConfig(theta=10000.0), tie_word_embeddings=False, aux_layer_ids=(0, 1, 1))
    g = torch.Generator().manual_seed(seed)
    draft = Eagle3Draft(cfg, own_embedding=True)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name != "d2t":
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "norm" in name else 0.3) + ("norm" in name))
    quantize_model(draft, quantization)
    return draft


def random_prompts(lengths: Sequence[int], seed: int = 1, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@dataclass
class Comparison:
    max_output_diff: float
    max_input_diff: float
    outputs: list[list[int]]


def compare_with_hf(
    engine: Any,
    hf: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    tol: float,
) -> Comparison:
    """Greedy-decode `prompts` in one batch with our engine, then check against one full
    transformers forward over prompt + generated tokens per prompt:

    * every generated token is transformers' argmax at that position (a different token is only
      accepted when transformers scores it within `tol` of its best: a genuine tie);
    * output and input logprobs agree within `tol`.
    """
    outs = engine.generate(
        input_ids=prompts,
        sampling_params={"temperature": 0, "max_new_tokens": max_new_tokens},
        return_logprob=True,
        logprob_start_len=0,
    )
    assert len(outs) == len(prompts)
    max_out = max_in = 0.0
    for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        gen = out["output_ids"]
        assert len(gen) == max_new_tokens, (i, out["meta_info"]["finish_reason"])
        meta = out["meta_info"]
        lp = hf_logprobs(hf, prompt + gen)
        n = len(prompt)

        # greedy tokens
        ref_rows = lp[n - 1 : n - 1 + len(gen)]
        best = ref_rows.max(-1).values
        chosen = ref_rows.gather(1, torch.tensor(gen)[:, None])[:, 0]
        for t, (tok, ref_tok) in enumerate(zip(gen, ref_rows.argmax(-1).tolist(), strict=True)):
            assert tok == ref_tok or float(best[t] - chosen[t]) < tol, (
                f"prompt {i}, new token {t}: ours {tok}, transformers {ref_tok} "
                f"(margin {float(best[t] - chosen[t]):.3g})"
            )

        # output logprobs
        out_lp = meta["output_token_logprobs"]
        assert [e[1] for e in out_lp] == gen
        ours = torch.tensor([e[0] for e in out_lp], dtype=torch.float32)
        diff = float((ours - chosen).abs().max())
        assert diff < tol, f"prompt {i}: output logprob diff {diff:.3g}"
        max_out = max(max_out, diff)

        # input logprobs (first entry has no logprob)
        in_lp = meta["input_token_logprobs"]
        assert [e[1] for e in in_lp] == prompt
        assert in_lp[0][0] is None
        if n > 1:
            ours_in = torch.tensor([e[0] for e in in_lp[1:]], dtype=torch.float32)
            ref_in = lp[: n - 1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
            diff = float((ours_in - ref_in).abs().max())
            assert diff < tol, f"prompt {i}: input logprob diff {diff:.3g}"
            max_in = max(max_in, diff)
    return Comparison(max_out, max_in, [o["output_ids"] for o in outs])


# ---- a tiny multimodal Llama 4 with a tokenizer -------------------------------------------------

# A character-level tokenizer: these specials first (ids 1..), then printable ASCII; the image
# ids match the checkpoint's boi / eoi / image_token_index.
MM_SPECIALS = ("<|begin_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|image_start|>",
               "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>")
MM_IDS = {t: i + 1 for i, t in enumerate(MM_SPECIALS)}


def save_char_tokenizer(path: Path) -> None:
    """A tokenizer of <unk>, MM_SPECIALS and one token per printable ASCII character."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **MM_IDS}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(MM_SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|begin_of_text|>",
                                   eos_token="<|eot|>")
    fast.save_pretrained(str(path))


def make_multimodal_checkpoint(path: Path, seed: int = 0, **overrides: Any) -> Checkpoint:
    """Llama4ForConditionalGeneration with TINY_VISION (56 px tiles, 4 image tokens each), the
    character tokenizer and its image token ids."""
    torch.manual_seed(seed)
    cfg = Llama4Config(
        text_config=llama4_text_kwargs(**overrides),
        vision_config=dict(TINY_VISION),
        boi_token_index=MM_IDS["<|image_start|>"],
        eoi_token_index=MM_IDS["<|image_end|>"],
        image_token_index=MM_IDS["<|patch|>"],
    )
    model = Llama4ForConditionalGeneration(cfg)
    perturb_init(model)
    ckpt = save_checkpoint(model.eval(), path)
    save_char_tokenizer(path)
    return ckpt
