from __future__ import annotations

import math
from dataclasses import FrozenInstanceError

import pytest
import torch

from specdec.sampler import apply_penalties, make_generator, processed_probs, sample
from specdec.sampling_params import SamplingParams

# A 4-token distribution whose logits are log-probabilities.
BASE = [0.1, 0.4, 0.2, 0.3]


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]], dtype=torch.float32)  # [1, V]


def _probs(params: SamplingParams, probs: list[float] = BASE) -> list[float]:
    return processed_probs(_logits(probs), [params])[0].tolist()


# --------------------------------------------------------------------------- params


def test_defaults_match_sglang() -> None:
    p = SamplingParams()
    assert p.max_new_tokens == 128
    assert p.temperature == 1.0 and p.top_p == 1.0 and p.top_k == -1 and p.min_p == 0.0
    assert p.frequency_penalty == 0.0 and p.presence_penalty == 0.0
    assert p.repetition_penalty == 1.0
    assert p.stop == () and p.stop_token_ids == ()
    assert p.ignore_eos is False and p.seed is None and p.skip_special_tokens is True
    assert not p.is_greedy
    with pytest.raises(FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -2.1}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": ("",)}, "stop"),
        ({"stop": (3,)}, "stop"),
        ({"stop": "abc"}, "stop"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"seed": 1.5}, "seed"),
        ({"logit_bias": ((3, 101.0),)}, "logit_bias"),
        ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
        ({"logit_bias": ((1, float("nan")),)}, "logit_bias"),
        ({"logit_bias": ((1,),)}, "logit_bias"),
    ],
)
def test_validation_errors_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_is_greedy() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(top_k=1).is_greedy
    assert not SamplingParams(temperature=0.5, top_k=2).is_greedy


def test_from_dict() -> None:
    assert SamplingParams.from_dict(None) == SamplingParams()
    p = SamplingParams.from_dict(
        {
            "max_new_tokens": 16,
            "temperature": 0,
            "top_k": 20,
            "stop": "\n\n",
            "stop_token_ids": [2, 7],
            "seed": 3,
            "top_p": None,
        }
    )
    assert p.max_new_tokens == 16
    assert p.temperature == 0.0 and isinstance(p.temperature, float)
    assert p.top_k == 20 and p.top_p == 1.0
    assert p.stop == ("\n\n",) and p.stop_token_ids == (2, 7) and p.seed == 3
    assert SamplingParams.from_dict({"stop": ["a", "b"]}).stop == ("a", "b")
    assert hash(p) == hash(
        SamplingParams.from_dict(
            {
                "max_new_tokens": 16,
                "temperature": 0.0,
                "top_k": 20,
                "stop": ["\n\n"],
                "stop_token_ids": [2, 7],
                "seed": 3,
            }
        )
    )
    with pytest.raises(ValueError, match="bogus"):
        SamplingParams.from_dict({"temperature": 0.5, "bogus": 1})
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_dict({"top_p": 2})


# --------------------------------------------------------------------------- penalties


def test_frequency_and_presence_penalties() -> None:
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0]])  # [1, 4]
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)]
    out = apply_penalties(logits, params, prompt_ids=[[1, 2]], output_ids=[[0, 0, 3]])
    # token 0: 1 - 0.5*2 - 0.25 = -0.25; token 3: 3 - 0.5*1 - 0.25 = 2.25;
    # prompt tokens 1 and 2 are untouched by OpenAI-style penalties.
    assert out.tolist() == [[-0.25, -2.0, 0.5, 2.25]]
    assert logits.tolist() == [[1.0, -2.0, 0.5, 3.0]], "input must not be modified"


def test_repetition_penalty() -> None:
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0]])  # [1, 4]
    params = [SamplingParams(repetition_penalty=2.0)]
    out = apply_penalties(logits, params, prompt_ids=[[1, 1]], output_ids=[[3]])
    # seen tokens 1 (negative: -2 * 2) and 3 (positive: 3 / 2), counted once each.
    assert out.tolist() == [[1.0, -4.0, 0.5, 1.5]]


def test_penalties_combined_and_per_row() -> None:
    logits = torch.tensor([[2.0, 1.0, -1.0], [2.0, 1.0, -1.0]])  # [2, 3]
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5),
        SamplingParams(),
    ]
    out = apply_penalties(logits, params, prompt_ids=[[2], [2]], output_ids=[[0, 0], [0, 0]])
    # row 0: token 0: 2/2 - 1*2 - 0.5 = -1.5; token 2 (prompt only): -1*2 = -2.
    assert out.tolist() == [[-1.5, 1.0, -2.0], [2.0, 1.0, -1.0]]


def test_logit_bias_is_added_last_and_parsed_from_openais_mapping() -> None:
    p = SamplingParams.from_dict({"logit_bias": {"2": -100, "0": 5.5}, "presence_penalty": 1.0})
    assert p.logit_bias == ((0, 5.5), (2, -100.0)) and p.adjusts_logits
    assert not SamplingParams().adjusts_logits and SamplingParams(logit_bias=((1, 0.5),)).adjusts_logits
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0]])  # [1, 4]
    out = apply_penalties(logits, [p], prompt_ids=[[]], output_ids=[[0]])
    # token 0: 1 - 1 (presence) + 5.5; token 2: 0.5 - 100
    assert out.tolist() == [[5.5, -2.0, -99.5, 3.0]]
    with pytest.raises(ValueError, match="logit_bias keys"):
        SamplingParams.from_dict({"logit_bias": {"x": 1}})
    with pytest.raises(ValueError, match="token ids"):
        apply_penalties(logits, [SamplingParams(logit_bias=((4, 1.0),))], [[]], [[]])


def test_penalties_reject_out_of_vocab_ids() -> None:
    with pytest.raises(ValueError, match="token ids"):
        apply_penalties(torch.zeros(1, 3), [SamplingParams(presence_penalty=1.0)], [[]], [[3]])


# --------------------------------------------------------------------------- processed_probs


def test_temperature_only() -> None:
    # logits 0, ln2, ln4 at temperature 0.5 -> proportional to 1, 4, 16.
    got = _probs(SamplingParams(temperature=0.5), [1 / 7, 2 / 7, 4 / 7])
    assert got == pytest.approx([1 / 21, 4 / 21, 16 / 21], abs=1e-6)
    assert _probs(SamplingParams()) == pytest.approx(BASE, abs=1e-6)


def test_top_k() -> None:
    assert _probs(SamplingParams(top_k=2)) == pytest.approx([0, 4 / 7, 0, 3 / 7], abs=1e-6)
    assert _probs(SamplingParams(top_k=0)) == pytest.approx(BASE, abs=1e-6)
    assert _probs(SamplingParams(top_k=10)) == pytest.approx(BASE, abs=1e-6)


def test_top_p() -> None:
    # sorted: 0.4, 0.3, 0.2, 0.1; keep the smallest prefix with mass >= top_p.
    assert _probs(SamplingParams(top_p=0.6)) == pytest.approx([0, 4 / 7, 0, 3 / 7], abs=1e-6)
    assert _probs(SamplingParams(top_p=0.75)) == pytest.approx([0, 4 / 9, 2 / 9, 3 / 9], abs=1e-6)
    # the top token is always kept
    assert _probs(SamplingParams(top_p=0.1)) == pytest.approx([0, 1, 0, 0], abs=1e-6)


def test_top_p_applies_to_top_k_renormalised_probs() -> None:
    # top_k=3 -> [0, 4/9, 2/9, 3/9]; mass before 2/9 is 7/9 >= 0.72 so it is dropped
    # (on the un-renormalised probs it would have been kept: 0.7 < 0.72).
    got = _probs(SamplingParams(top_k=3, top_p=0.72))
    assert got == pytest.approx([0, 4 / 7, 0, 3 / 7], abs=1e-6)


def test_min_p() -> None:
    # threshold 0.6 * 0.4 = 0.24 drops 0.1 and 0.2
    assert _probs(SamplingParams(min_p=0.6)) == pytest.approx([0, 4 / 7, 0, 3 / 7], abs=1e-6)
    # threshold 0.08 drops nothing
    assert _probs(SamplingParams(min_p=0.2)) == pytest.approx(BASE, abs=1e-6)
    assert _probs(SamplingParams(min_p=1.0)) == pytest.approx([0, 1, 0, 0], abs=1e-6)


def test_greedy_rows_are_one_hot() -> None:
    logits = torch.tensor(
        [[0.1, 2.0, -1.0, 1.9], [0.1, 2.0, -1.0, 1.9], [0.1, 2.0, -1.0, 1.9]]
    )  # [3, 4]
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1), SamplingParams()]
    probs = processed_probs(logits, params)
    assert probs.dtype == torch.float32
    assert probs[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert probs[1].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert probs[2].tolist() == pytest.approx(torch.softmax(logits[2], -1).tolist(), abs=1e-6)
    tokens = sample(probs[:2], [None, make_generator(0)])
    assert tokens.tolist() == [1, 1]


def test_processed_probs_rows_sum_to_one() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3  # [5, 50]
    params = [
        SamplingParams(temperature=0.3, top_k=7),
        SamplingParams(top_p=0.5, min_p=0.05),
        SamplingParams(temperature=1.7, top_p=0.95, top_k=20, min_p=0.01),
        SamplingParams(temperature=0.0),
        SamplingParams(),
    ]
    probs = processed_probs(logits, params)
    assert probs.shape == (5, 50)
    assert torch.allclose(probs.sum(-1), torch.ones(5), atol=1e-5)
    assert int((probs[0] > 0).sum()) == 7
    assert (probs >= 0).all()


# --------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    probs = torch.full((1, 100), 0.01)  # [1, 100] uniform

    def draw(seed: int | None, batch_extra: int) -> list[int]:
        gen = make_generator(seed)
        batch = probs.expand(1 + batch_extra, 100)  # [1 + extra, 100]
        gens = [gen, *[make_generator(None) for _ in range(batch_extra)]]
        return [int(sample(batch, gens)[0]) for _ in range(50)]

    a = draw(42, 0)
    assert a == draw(42, 3)
    assert a != draw(43, 0)


def test_unseeded_generators_differ_but_follow_global_seed() -> None:
    torch.manual_seed(123)
    g1, g2 = make_generator(None), make_generator(None)
    assert g1.initial_seed() != g2.initial_seed()
    torch.manual_seed(123)
    assert make_generator(None).initial_seed() == g1.initial_seed()
    # any Python int is a valid seed
    assert make_generator(-1).initial_seed() == 2**64 - 1


def test_sampled_frequencies_match_processed_distribution() -> None:
    base = [0.35, 0.25, 0.15, 0.12, 0.08, 0.05]
    params = SamplingParams(temperature=0.7, top_p=0.9)
    # Expected distribution by hand: p^(1/T) normalised, then the nucleus.
    scaled = [p ** (1 / 0.7) for p in base]
    scaled = [q / sum(scaled) for q in scaled]
    # cumulative: 0.432, 0.699, 0.827, 0.921 -> the 4th token reaches 0.9
    kept = scaled[:4]
    expected = [q / sum(kept) for q in kept] + [0.0, 0.0]
    probs = processed_probs(_logits(base), [params])  # [1, 6]
    assert probs[0].tolist() == pytest.approx(expected, abs=1e-6)

    n = 20000
    gen = make_generator(2024)
    tokens = sample(probs.expand(n, 6), [gen] * n)  # [n]
    freq = torch.bincount(tokens, minlength=6).double() / n
    tv = 0.5 * sum(abs(f - e) for f, e in zip(freq.tolist(), expected))
    # Bound: E[TV] <= 0.5 * sum_i sqrt(p_i (1 - p_i) / n) ~= 0.0057 for n = 20000,
    # so 0.02 is a > 3x margin (and the generator is seeded, so the test is stable).
    assert tv < 0.02, f"total variation {tv:.4f} >= 0.02"
    assert freq[4] == 0 and freq[5] == 0, "tokens outside the nucleus were sampled"


def test_sample_one_follows_the_weights_and_never_picks_a_zero() -> None:
    from specdec.sampler import sample_one

    weights = torch.zeros(1000)
    weights[[3, 10, 500, 999]] = torch.tensor([2.0, 1.0, 0.5, 0.5])  # unnormalised, total 4
    expected = {3: 0.5, 10: 0.25, 500: 0.125, 999: 0.125}
    n = 20000
    gen = make_generator(7)
    counts: dict[int, int] = {}
    for _ in range(n):
        i = sample_one(weights, gen)
        counts[i] = counts.get(i, 0) + 1
    assert set(counts) <= set(expected), "a zero-weight index was drawn"
    # E[TV] <= 0.5 * sum_i sqrt(p_i (1 - p_i) / n) ~= 0.0046 for n = 20000: 0.02 is a 4x margin
    tv = 0.5 * sum(abs(counts.get(i, 0) / n - p) for i, p in expected.items())
    assert tv < 0.02, f"total variation {tv:.4f}"
    with pytest.raises(ValueError, match="positive"):
        sample_one(torch.zeros(5), gen)


def test_uniform_temperature_batch_equals_the_general_path() -> None:
    """The shortcut for a batch with one temperature and no truncation (a verified tree) gives
    the general path's probabilities exactly."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3))
    hot = SamplingParams(temperature=0.7)
    fast = processed_probs(logits, [hot] * 4)
    general = processed_probs(torch.cat([logits, logits[:1]]), [hot] * 4 + [SamplingParams(temperature=0.0)])
    assert torch.equal(fast, general[:4])
