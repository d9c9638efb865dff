"""Running acceptance of copied chains, engine-wide (adaptive speculation's copy shapes).

A copied chain c_1..c_L is what followed the latest earlier occurrence of the context's final
n-gram in the request's own prompt and output (`--speculative-ngram-merge`, n = the matched
length). `q(greedy, n, d)` estimates P(the target's token at depth d = c_d | c_1..c_{d-1}
accepted), for greedy or sampled requests, n bucketed as 1, 2, 3, 4+ (longer matches repeat more
reliably) and d = 1..`MAX_DEPTH` (deeper tokens share the last). A verified copy chain is one
*exposure* at every depth the accepted path reached or stopped at, and a *hit* at each accepted
one. Counts decay by `DECAY` per observed chain, and lean on the measured priors
(draft/ngram_merge.py's `copy_accept`, from the greedy chat answers) until there is evidence.
Each request keeps its own counts too, leaning on the engine-wide estimates as its prior
(`q(..., prior=engine_wide)`): a request whose copies keep failing (its text repeats where the
target does not) stops being offered copies after a few chains, the others keep theirs.

`expected(greedy, n, length)` is the expected number of accepted copies of a chain of `length`
tokens: sum over d of the product of q up to d.
"""

from __future__ import annotations

from collections.abc import Sequence

from specdec.draft.ngram_merge import copy_accept

DECAY = 0.98
PRIOR_WEIGHT = 4.0
MAX_DEPTH = 8
BUCKETS = 4  # n = 1, 2, 3, 4+


def _bucket(n: int) -> int:
    return min(max(n, 1), BUCKETS) - 1


class CopyStats:
    """Decayed hit / exposure counts per (greedy or sampled, match bucket, depth)."""

    __slots__ = ("exposures", "hits")

    def __init__(self) -> None:
        # [greedy 0/1][bucket][depth - 1]
        self.hits = [[[0.0] * MAX_DEPTH for _ in range(BUCKETS)] for _ in range(2)]
        self.exposures = [[[0.0] * MAX_DEPTH for _ in range(BUCKETS)] for _ in range(2)]

    def observe(self, greedy: bool, n: int, length: int, accepted: int) -> None:
        """A verified chain of `length` copies from an n-token match, `accepted` of them taken."""
        if length <= 0 or n <= 0:
            return
        if not 0 <= accepted <= length:
            raise ValueError(f"accepted {accepted} of a chain of {length}")
        for side_h, side_e in zip(self.hits, self.exposures, strict=True):
            for row_h, row_e in zip(side_h, side_e, strict=True):
                for d in range(MAX_DEPTH):
                    row_h[d] *= DECAY
                    row_e[d] *= DECAY
        h, e = self.hits[greedy][_bucket(n)], self.exposures[greedy][_bucket(n)]
        for d in range(min(accepted + 1, length)):
            i = min(d, MAX_DEPTH - 1)
            e[i] += 1.0
            if d < accepted:
                h[i] += 1.0

    def q(self, greedy: bool, n: int, prior: CopyStats | None = None) -> list[float]:
        """[depth - 1] acceptance estimates of a chain from an n-token match, leaning on
        `prior`'s estimates (a request's counts on the engine's), else on the measured priors."""
        base = prior.q(greedy, n) if prior is not None else [copy_accept(n)] * MAX_DEPTH
        h, e = self.hits[greedy][_bucket(n)], self.exposures[greedy][_bucket(n)]
        return [(h[d] + PRIOR_WEIGHT * base[d]) / (e[d] + PRIOR_WEIGHT) for d in range(MAX_DEPTH)]

    def expected(self, greedy: bool, n: int, lengths: Sequence[int], prior: CopyStats | None = None) -> list[float]:
        """Expected accepted copies for chains of each of `lengths` tokens (0 without a match)."""
        if n <= 0:
            return [0.0] * len(lengths)
        q = self.q(greedy, n, prior)
        cum, reach, total = [0.0], 1.0, 0.0
        for d in range(max(lengths, default=0)):
            reach *= q[min(d, MAX_DEPTH - 1)]
            total += reach
            cum.append(total)
        return [cum[max(0, k)] for k in lengths]
