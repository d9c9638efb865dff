"""Token sampling over a batch of logits, each row with its own SamplingParams.

The pipeline for one decoding step is::

    logits = apply_penalties(logits, params, prompt_ids, output_ids)
    probs = processed_probs(logits, params)     # the distribution actually sampled
    tokens = sample(probs, generators)

:func:`processed_probs` is a pure function of the logits and the parameters, so
speculative decoding can compute the target and draft distributions with it and
run rejection sampling on exactly the distributions that plain sampling uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specdec.kernels import cpu_kernels
from specdec.sampling_params import SamplingParams

__all__ = ["apply_penalties", "make_generator", "processed_probs", "sample"]


def _check_batch(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if len(params) != logits.shape[0]:
        raise ValueError(f"got {len(params)} SamplingParams for a batch of {logits.shape[0]} rows")


def _ids_tensor(ids: Sequence[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(list(ids), dtype=torch.long, device=device)  # [n]
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}), got {ids!r}")
    return t


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Return a copy of ``logits`` [B, V] with each row's penalties applied.

    Order (as in vLLM): first the HF-style repetition penalty over every token in
    the row's prompt and output (positive logits divided by the penalty, negative
    ones multiplied), then the OpenAI-style penalties over output tokens only:
    ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``, then each
    ``logit_bias`` entry is added to its token's logit (OpenAI's order: the bias comes last).
    Rows without any are copied unchanged.
    """
    _check_batch(logits, params)
    if len(prompt_ids) != len(params) or len(output_ids) != len(params):
        raise ValueError(
            f"batch of {len(params)} rows got {len(prompt_ids)} prompt_ids and "
            f"{len(output_ids)} output_ids"
        )
    out = logits.clone()  # [B, V]
    vocab_size = logits.shape[1]
    for row, p in enumerate(params):
        if p.repetition_penalty != 1.0:
            seen = _ids_tensor([*prompt_ids[row], *output_ids[row]], vocab_size, out.device)
            if seen.numel():
                seen = torch.unique(seen)  # [n_unique]
                values = out[row, seen]  # [n_unique]
                values = torch.where(
                    values > 0, values / p.repetition_penalty, values * p.repetition_penalty
                )
                out[row, seen] = values
        if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            generated = _ids_tensor(output_ids[row], vocab_size, out.device)
            if generated.numel():
                counts = torch.bincount(generated, minlength=vocab_size).to(out.dtype)  # [V]
                out[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(
                    out.dtype
                )
        if p.logit_bias:
            biased = _ids_tensor([t for t, _ in p.logit_bias], vocab_size, out.device)  # [n]
            out[row, biased] += torch.tensor([b for _, b in p.logit_bias], dtype=out.dtype, device=out.device)
    return out


def processed_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The distribution each row is sampled from, as float32 probabilities [B, V].

    Non-greedy rows: logits are divided by the temperature, then truncated in this
    order (as in HF / vLLM), each step keeping the most likely token:

    * top-k keeps the ``top_k`` most likely tokens (``top_k`` <= 0 disables);
    * top-p keeps the smallest set of most likely tokens whose cumulative
      probability (renormalised after top-k) is >= ``top_p``;
    * min-p drops tokens whose probability is below ``min_p`` times the most
      likely token's probability;

    and the surviving probabilities are renormalised to sum to 1. Greedy rows
    (``params.is_greedy``) are one-hot at the argmax of the logits. The truncation does not sort
    the vocabulary (`cpu_kernels.truncated_probs`; its reference sorts each row).
    """
    _check_batch(logits, params)
    logits = logits.float()  # [B, V]
    vocab_size = logits.shape[1]
    device = logits.device
    first = params[0] if params else None
    if first is not None and not first.is_greedy and not _truncates(first, vocab_size) and all(
        p.temperature == first.temperature and not p.is_greedy and not _truncates(p, vocab_size) for p in params
    ):  # one temperature, no truncation (e.g. a verified tree): the same softmax, no gathers
        return torch.softmax(logits / torch.tensor(first.temperature, dtype=torch.float32), dim=-1)
    greedy = torch.tensor([p.is_greedy for p in params], dtype=torch.bool, device=device)  # [B]
    probs = torch.empty_like(logits)  # [B, V]

    plain_rows = [i for i, p in enumerate(params) if not p.is_greedy and not _truncates(p, vocab_size)]
    if plain_rows:  # temperature only: no sort needed
        rows = torch.tensor(plain_rows, dtype=torch.long, device=device)  # [P]
        temperature = torch.tensor(
            [params[i].temperature for i in plain_rows], dtype=torch.float32, device=device
        ).unsqueeze(1)  # [P, 1]
        probs[rows] = torch.softmax(logits[rows] / temperature, dim=-1)

    sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy and _truncates(p, vocab_size)]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, dtype=torch.long, device=device)  # [S]
        row_params = [params[i] for i in sampled_rows]
        temperature = torch.tensor(
            [p.temperature for p in row_params], dtype=torch.float32, device=device
        ).unsqueeze(1)  # [S, 1]
        # [S] each; top_k <= 0 or >= the vocabulary cuts nothing (the kernel's and reference's rule)
        top_k = torch.tensor([p.top_k for p in row_params], dtype=torch.long, device=device)
        top_p = torch.tensor([p.top_p for p in row_params], dtype=torch.float32, device=device)
        min_p = torch.tensor([p.min_p for p in row_params], dtype=torch.float32, device=device)
        scaled = logits[rows] / temperature  # [S, V]
        probs[rows] = cpu_kernels.truncated_probs(scaled, top_k, top_p, min_p)

    if bool(greedy.any()):
        greedy_rows = greedy.nonzero().squeeze(1)  # [G]
        argmax = logits[greedy_rows].argmax(dim=-1, keepdim=True)  # [G, 1]
        one_hot = torch.zeros(len(greedy_rows), vocab_size, device=device)  # [G, V]
        probs[greedy_rows] = one_hot.scatter_(-1, argmax, 1.0)
    return probs


def _truncates(p: SamplingParams, vocab_size: int) -> bool:
    """Whether top-k, top-p or min-p remove any token (otherwise no sort is needed)."""
    return 0 < p.top_k < vocab_size or p.top_p < 1.0 or p.min_p > 0.0


def sample(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Draw one token id per row of ``probs`` [B, V]; returns int64 [B].

    Each row is an exponential race (argmax of p / E with E ~ Exp(1), which picks token i with
    probability p_i, like ``torch.multinomial`` but without building a CDF), its E drawn from one
    64-bit seed that the row's generator gives (`cpu_kernels.race_rows`: a counter-based
    generator over the token ids, ~0.23 ms a 49152-wide row against ~1.5 ms for torch's
    ``exponential_``), so a seeded request reproduces its tokens regardless of what else is in
    the batch; rows whose generator is ``None`` take their seeds from the global torch RNG.
    Deterministic rows (one-hot, e.g. greedy) take the argmax and consume no randomness.

    The race is local: a token wins on its own p / E, so rounding differences between a row
    computed in a batch and alone (the module path is not bitwise batch-invariant) change the
    winner only where two keys tie to rounding. An inverse-CDF draw (one uniform against the
    running sum) was tried and is not: where u falls in the long tail of small probabilities the
    chosen index moves with the accumulated rounding of the sum, and a seeded request's n = 4
    siblings stopped reproducing its n = 1 answers (tests/test_server.py).
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be [batch, vocab], got shape {tuple(probs.shape)}")
    if len(generators) != probs.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {probs.shape[0]} rows")
    max_prob, tokens = probs.max(dim=-1)  # [B], [B]
    deterministic = (max_prob >= 1.0).tolist()
    rows = [r for r, d in enumerate(deterministic) if not d]
    if not rows:
        return tokens
    seeds = torch.empty(len(rows), dtype=torch.long)  # [R]
    unseeded = [j for j, r in enumerate(rows) if generators[r] is None]
    if unseeded:
        seeds[unseeded] = torch.randint(0, 2**62, (len(unseeded),))
    for j, r in enumerate(rows):
        gen = generators[r]
        if gen is not None:
            seeds[j] = int(torch.randint(0, 2**62, (), generator=gen, device=gen.device))
    if len(rows) == probs.shape[0]:
        return cpu_kernels.race_rows(probs, seeds)
    sel = torch.tensor(rows, dtype=torch.long, device=probs.device)  # [R]
    tokens[sel] = cpu_kernels.race_rows(probs[sel], seeds).to(tokens.device)
    return tokens


def sample_one(p: torch.Tensor, generator: torch.Generator | None) -> int:
    """One draw from the non-negative weights p [V] (need not sum to 1): an exponential race
    from one 64-bit seed of `generator` (`cpu_kernels.race_rows`), as `sample` draws. A
    zero-weight index is never chosen, and each token is judged by its own p / E, so a draw
    survives rounding differences in p (an inverse-CDF draw against the running sum did not)."""
    if not bool((p > 0).any()):
        raise ValueError("sample_one needs some positive weight")
    seed = torch.randint(0, 2**62, (1,), generator=generator)
    return int(cpu_kernels.race_rows(p.float().reshape(1, -1), seed)[0])


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A private RNG for one request.

    With a seed the request's samples are reproducible (any Python int is
    accepted; it is reduced modulo 2**64). Without one the generator is seeded
    from the global torch RNG, so unseeded requests differ from one another yet a
    whole run is reproducible under ``torch.manual_seed``.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2**64)
    return generator
