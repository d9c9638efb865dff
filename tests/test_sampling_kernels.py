"""The sampling kernels (kernels/csrc/sampling.cpp) against their references.

`truncated_probs` keeps the same tokens as a float64 sort of the row, except a token whose mass
before it lies within BOUNDARY of top_p (float rounding decides those); where equal logits straddle
a cut, any of them may be the kept one, so ties are compared by value. `race_rows` equals its numpy
reference index for index, and its draws follow the weights.
"""

from __future__ import annotations

import pytest
import torch

from specdec.kernels import cpu_kernels as ck
from specdec.sampler import processed_probs, sample, sample_one
from specdec.sampling_params import SamplingParams

kernels = ck.extension()
pytestmark = pytest.mark.skipif(kernels is None, reason=f"CPU kernels unavailable: {ck.unsupported_reason()}")

BOUNDARY = 1e-5  # |mass before a token - top_p| below which either decision is right
VALUE_TOL = 1e-5  # relative, on each kept probability (float32 softmax against float64)


def _exact(x: torch.Tensor, top_k: int, top_p: float, min_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs over the kept set, mass before each token in the sorted order) in float64, one row."""
    V = x.shape[0]
    k = top_k if 0 < top_k < V else V
    vals, idx = x.double().sort(descending=True)
    vals[k:] = float("-inf")
    p = torch.softmax(vals, 0)
    before = torch.cumsum(p, 0) - p
    keep = torch.ones(V, dtype=torch.bool)
    if top_p < 1.0:
        keep &= before < top_p
    keep &= p >= min_p * p[0]
    keep[0] = True
    keep &= p > 0
    out = torch.zeros(V, dtype=torch.float64)
    out[idx[keep]] = p[keep] / p[keep].sum()
    mass_before = torch.full((V,), 2.0, dtype=torch.float64)
    mass_before[idx] = before
    return out, mass_before


CASES = [  # (scale of the logits, top_k, top_p, min_p)
    (1.0, 0, 0.9, 0.0), (3.0, 0, 0.95, 0.0), (0.3, 0, 0.5, 0.0), (5.0, 0, 0.99, 0.0),
    (2.0, 40, 1.0, 0.0), (2.0, 40, 0.8, 0.0), (2.0, 1, 0.9, 0.0), (1.0, 1000, 0.95, 0.05),
    (2.0, 0, 1.0, 0.1), (4.0, 0, 0.7, 0.2), (0.1, 0, 0.9, 0.0),
]


@pytest.mark.parametrize("V", [49152, 1000, 13])
@pytest.mark.parametrize(("scale", "top_k", "top_p", "min_p"), CASES)
def test_truncated_probs_keeps_the_sorted_rule(V: int, scale: float, top_k: int, top_p: float, min_p: float) -> None:
    g = torch.Generator().manual_seed(V + int(scale * 10) + top_k)
    x = torch.randn(3, V, generator=g) * scale  # continuous: no ties
    n = x.shape[0]
    got = ck.truncated_probs(x, torch.full((n,), top_k), torch.full((n,), top_p), torch.full((n,), min_p))
    assert got.dtype == torch.float32 and got.shape == x.shape
    for r in range(n):
        exact, before = _exact(x[r], top_k, top_p, min_p)
        differ = (got[r] > 0) != (exact > 0)
        # only where float rounding decides: the mass before it at top_p
        assert bool(((before[differ] - top_p).abs() < BOUNDARY).all()), before[differ]
        both = (got[r] > 0) & (exact > 0)
        renorm = exact[both] / exact[both].sum()
        ours = got[r][both].double() / got[r][both].double().sum()
        assert torch.allclose(ours, renorm, rtol=VALUE_TOL, atol=0.0)
        assert abs(float(got[r].double().sum()) - 1.0) < 1e-5
        assert got[r][x[r].argmax()] > 0  # the most likely token always stays


def test_truncated_probs_equals_the_reference_without_boundary_cases() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 4096, generator=g) * 2.0
    top_k = torch.tensor([0, 10, 100, 4096, 0, 5, 0, 2000])
    top_p = torch.tensor([0.9, 1.0, 0.95, 0.6, 0.999, 0.9, 0.3, 0.8])
    min_p = torch.tensor([0.0, 0.0, 0.01, 0.0, 0.0, 0.2, 0.0, 0.05])
    got = ck.truncated_probs(x, top_k, top_p, min_p)
    ref = ck.truncated_probs_reference(x, top_k, top_p, min_p)
    for r in range(8):
        _, before = _exact(x[r], int(top_k[r]), float(top_p[r]), float(min_p[r]))
        near = (before - float(top_p[r])).abs() < BOUNDARY
        if bool(near.any()):  # (seeded: none of these rows has a boundary case)
            continue
        assert torch.equal(got[r] > 0, ref[r] > 0)
        assert torch.allclose(got[r], ref[r], rtol=VALUE_TOL, atol=1e-9)


def test_truncated_probs_ties_keep_the_same_values() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.round(torch.randn(4, 2000, generator=g) * 3.0)  # few distinct values, many ties
    top_k = torch.tensor([7, 0, 0, 50])
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.95])
    min_p = torch.zeros(4)
    got = ck.truncated_probs(x, top_k, top_p, min_p)
    ref = ck.truncated_probs_reference(x, top_k, top_p, min_p)
    for r in range(4):
        kept, kept_ref = got[r] > 0, ref[r] > 0
        assert int(kept.sum()) == int(kept_ref.sum())
        assert torch.equal(x[r][kept].sort().values, x[r][kept_ref].sort().values)
    # the top-k cut among equal values keeps exactly k, the first ones by index
    assert int((got[0] > 0).sum()) == 7
    kth = x[0].sort(descending=True).values[6]
    at_kth = (x[0] == kth).nonzero().flatten()
    above = int((x[0] > kth).sum())
    assert torch.equal((got[0] > 0)[at_kth], torch.arange(len(at_kth)) < 7 - above)


def test_truncated_probs_edge_rows() -> None:
    x = torch.tensor([[0.0, 5.0, 1.0], [2.0, 2.0, 2.0], [-float("inf"), 1.0, 0.5]])
    one = torch.ones(3, dtype=torch.long)
    got = ck.truncated_probs(x, torch.tensor([0, 0, 0]), torch.tensor([1e-6, 0.5, 1.0]), torch.zeros(3))
    assert got[0].tolist() == [0.0, 1.0, 0.0]  # a tiny top_p keeps the top token alone
    assert int((got[1] > 0).sum()) == 2  # three equal: the first reaches 1/3, the second 2/3 >= 0.5
    assert got[2, 0] == 0.0 and abs(float(got[2].sum()) - 1.0) < 1e-6  # -inf stays impossible
    assert ck.truncated_probs(x[:1], one[:1], torch.tensor([0.9]), torch.zeros(1)).tolist() == [[0.0, 1.0, 0.0]]
    assert ck.truncated_probs(torch.tensor([[3.0]]), one[:1], torch.tensor([0.5]), torch.zeros(1)).tolist() == [[1.0]]


def test_truncated_probs_refuses_bad_input() -> None:
    x = torch.randn(2, 10)
    k, p, m = torch.zeros(2, dtype=torch.long), torch.full((2,), 0.9), torch.zeros(2)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.truncated_probs(x.double(), k, p, m)
    with pytest.raises(RuntimeError, match="top_k"):
        kernels.truncated_probs(x, k[:1], p, m)
    with pytest.raises(RuntimeError, match="top_p in"):
        kernels.truncated_probs(x, k, torch.zeros(2), m)


def test_processed_probs_uses_the_kernel_and_matches_the_reference() -> None:
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 5000, generator=g) * 2.0
    params = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=1.2, top_k=30),
              SamplingParams(temperature=0.0)]
    got = processed_probs(logits, params)
    scaled = logits[:2] / torch.tensor([[0.8], [1.2]])
    ref = ck.truncated_probs_reference(scaled, torch.tensor([5000, 30]), torch.tensor([0.9, 1.0]), torch.zeros(2))
    assert torch.equal(got[:2] > 0, ref > 0)
    assert torch.allclose(got[:2], ref, rtol=VALUE_TOL, atol=1e-9)
    assert got[2].tolist() == torch.nn.functional.one_hot(logits[2].argmax(), 5000).float().tolist()


def test_race_rows_equals_the_reference_and_never_picks_a_zero() -> None:
    g = torch.Generator().manual_seed(5)
    probs = torch.rand(6, 3000, generator=g)
    probs[probs < 0.7] = 0.0  # zeros between the weights
    probs[5, :-1], probs[5, -1] = 0.0, 0.5  # one weight, at the end
    for _ in range(20):
        seeds = torch.randint(-2**62, 2**62, (6,), generator=g)
        got = ck.race_rows(probs, seeds)
        assert got.tolist() == ck.race_rows_reference(probs, seeds).tolist()
        assert all(float(probs[r, int(i)]) > 0 for r, i in enumerate(got))
    peaked = torch.softmax(torch.randn(4, 49152, generator=g) * 4, -1)  # a long tail of small weights
    seeds = torch.randint(0, 2**62, (4,), generator=g)
    assert ck.race_rows(peaked, seeds).tolist() == ck.race_rows_reference(peaked, seeds).tolist()
    with pytest.raises(RuntimeError, match="no positive weight"):
        kernels.race_rows(torch.zeros(1, 5), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="positive weight"):
        sample_one(torch.zeros(5), None)


def test_race_rows_survive_rounding_of_the_weights() -> None:
    """A row computed in a batch and alone differs by rounding: the race's pick does not move
    (each token is judged by its own key, so a flip needs two keys within ~1e-6)."""
    g = torch.Generator().manual_seed(8)
    probs = torch.softmax(torch.randn(200, 49152, generator=g) * 2.5, -1)
    noisy = probs * (1 + 1e-6 * torch.randn(probs.shape, generator=g))  # ~rounding of a float32 forward
    seeds = torch.randint(0, 2**62, (200,), generator=g)
    same = (ck.race_rows(probs, seeds) == ck.race_rows(noisy, seeds)).sum().item()
    assert same >= 199  # a flip needs two keys within ~1e-6 of each other


def test_race_rows_follow_the_weights() -> None:
    weights = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    n = 40000
    tokens = ck.race_rows(weights.expand(n, 4).contiguous(), torch.arange(n))
    freq = torch.bincount(tokens, minlength=4).double() / n
    assert freq[1] == 0.0
    # 5 standard errors of a binomial share at n = 40000: <= 0.0123
    assert torch.allclose(freq, weights[0].double(), atol=0.0123)


def test_sample_is_batch_independent_and_follows_the_distribution() -> None:
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    n = 20000
    gen = torch.Generator().manual_seed(0)
    tokens = sample(probs.expand(n, 4).contiguous(), [gen] * n)
    freq = torch.bincount(tokens, minlength=4).double() / n
    assert freq[1] == 0.0
    # 5 standard errors of a binomial share at n = 20000: <= 0.017
    assert torch.allclose(freq, probs[0].double(), atol=0.017)
    a = [int(sample(probs, [torch.Generator().manual_seed(9)])[0]) for _ in range(3)]
    mixed = torch.cat([torch.tensor([[0.0, 1.0, 0.0, 0.0]]), probs, probs])
    b = int(sample(mixed, [None, torch.Generator().manual_seed(9), torch.Generator().manual_seed(1)])[1])
    assert a == [a[0]] * 3 and b == a[0]  # the same seed, the same token, whatever else is in the batch
