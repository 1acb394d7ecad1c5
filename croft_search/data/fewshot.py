"""Seeded k-shot subsets of a training set."""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from croft_search.data.base import Sample


def sample_few_shot(
    samples: Sequence[Sample], shots: int | None, seed: int, per_domain: bool = True
) -> tuple[Sample, ...]:
    """`shots` samples of every class (of every class and domain when `per_domain`),
    all of a group that has fewer; all samples when `shots` is None or <= 0.

    The result depends only on the set of samples, `shots` and `seed`: input order does
    not matter, each group draws from its own seeded stream (adding a domain leaves the
    other domains' picks alone), and a group's k-shot pick is the first k of one seeded
    permutation, so the 4-shot subset is inside the 8-shot subset of the same seed.
    """
    ordered = sorted(samples, key=_sort_key)
    if shots is None or shots <= 0:
        return tuple(ordered)
    groups: dict[tuple[int, str], list[Sample]] = defaultdict(list)
    for sample in ordered:
        groups[(sample.label, sample.domain if per_domain else "")].append(sample)
    chosen: list[Sample] = []
    for key in sorted(groups):
        members = groups[key]
        rng = np.random.default_rng([seed, _stable_hash(key)])
        picks = rng.permutation(len(members))[:shots]
        chosen.extend(members[index] for index in sorted(picks))
    return tuple(sorted(chosen, key=_sort_key))


def _sort_key(sample: Sample) -> tuple[str, int, str]:
    return (sample.domain, sample.label, sample.path.as_posix())


def _stable_hash(key: tuple[int, str]) -> int:
    # Python's hash() of a str changes between processes; crc32 does not.
    return zlib.crc32(f"{key[0]}|{key[1]}".encode())
