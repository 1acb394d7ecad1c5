"""Seeded k-shot subsets of a training set."""

from __future__ import annotations

import functools
import zlib
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from croft_search.contract import SHOTS_PER
from croft_search.data.base import Sample
from croft_search.errors import ConfigError


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
    canonical = _canonical(tuple(samples))
    if shots is None or shots <= 0:
        return canonical.ordered
    chosen: list[Sample] = []
    for key, members in canonical.groups[per_domain]:
        rng = np.random.default_rng([seed, _stable_hash(key)])
        picks = rng.permutation(len(members))[:shots]
        chosen.extend(members[index] for index in sorted(picks))
    return tuple(sorted(chosen, key=canonical.rank.__getitem__))


def positions(samples: Sequence[Sample]) -> Mapping[Sample, int]:
    """Where each sample is in ``samples``. Kept for the last few sets asked about (every
    member of a population asks about the same training set), hence read-only."""
    return _positions(tuple(samples))


# Every member of a population asks about one training set, once per target domain: a few
# sets are kept (a lookup hashes the samples once; sorting them again costs far more).
KEPT_SETS = 4


def _kept_sets(build: Callable[[tuple[Sample, ...]], Any]) -> Callable[[tuple[Sample, ...]], Any]:
    """``build`` kept for `KEPT_SETS` sets: found first by identity (a split's own tuple,
    which every member passes: hashing thousands of samples per member cost more than
    its few-shot pick), then by value."""
    by_value = functools.lru_cache(maxsize=KEPT_SETS)(build)
    recent: deque[tuple[tuple[Sample, ...], Any]] = deque(maxlen=KEPT_SETS)

    @functools.wraps(build)
    def kept(samples: tuple[Sample, ...]) -> Any:
        for seen, value in recent:
            if seen is samples:
                return value
        value = by_value(samples)
        recent.append((samples, value))
        return value

    return kept


@_kept_sets
def _positions(samples: tuple[Sample, ...]) -> Mapping[Sample, int]:
    return MappingProxyType({sample: index for index, sample in enumerate(samples)})


@dataclass(frozen=True)
class _Canonical:
    """Samples in their canonical order, each one's rank in it, and their groups in key
    order: by (label, domain) under True, by (label, "") under False."""

    ordered: tuple[Sample, ...]
    rank: Mapping[Sample, int]
    groups: Mapping[bool, tuple[tuple[tuple[int, str], tuple[Sample, ...]], ...]]


@_kept_sets
def _canonical(samples: tuple[Sample, ...]) -> _Canonical:
    ordered = tuple(sorted(samples, key=_sort_key))
    groups = {}
    for per_domain in (True, False):
        grouped: dict[tuple[int, str], list[Sample]] = defaultdict(list)
        for sample in ordered:
            grouped[(sample.label, sample.domain if per_domain else "")].append(sample)
        groups[per_domain] = tuple((key, tuple(grouped[key])) for key in sorted(grouped))
    rank = MappingProxyType({sample: index for index, sample in enumerate(ordered)})
    return _Canonical(ordered, rank, MappingProxyType(groups))


def _sort_key(sample: Sample) -> tuple[str, int, str]:
    return (sample.domain, sample.label, sample.path.as_posix())


def _stable_hash(key: tuple[int, str]) -> int:
    # Python's hash() of a str changes between processes; crc32 does not.
    return zlib.crc32(f"{key[0]}|{key[1]}".encode())


# How a k-shot training set is drawn: k per class and source domain (ours), k per class over
# the pooled source domains (Dassl's generate_fewshot_dataset), or Dassl's
# generate_fewshot_dataset_balance as the CRoFT reference runs it on PACS.
DASSL_BALANCE_MIN_SHOTS = 4


def sample_shots(
    samples: Sequence[Sample], shots: int | None, seed: int, per: str = "class_and_domain"
) -> tuple[Sample, ...]:
    """The k-shot subset under one of `SHOTS_PER`. ``dassl_balance`` reproduces the
    reference's sampler with its quirk: for every class with at least k images it draws
    int(k / domains) images from *each source domain, whatever their class*, so 16 shots of
    PACS's 7 classes over 3 domains give 7 x 3 x 5 = 105 images of a random class mix, an
    image possibly more than once (its rows repeat); a class with fewer images adds all of
    them. At k <= 4 the reference's PACS reader draws k per class instead
    (CoOp/datasets/PACS.py), and so does this."""
    if per not in SHOTS_PER:
        raise ConfigError(f"shots_per {per!r} unknown (use {', '.join(SHOTS_PER)})")
    if per == "class_and_domain":
        return sample_few_shot(samples, shots, seed)
    if per == "class":
        return sample_few_shot(samples, shots, seed, per_domain=False)
    if shots is not None and 0 < shots <= DASSL_BALANCE_MIN_SHOTS:
        return sample_few_shot(samples, shots, seed, per_domain=False)
    canonical = _canonical(tuple(samples))
    ordered = canonical.ordered
    if shots is None or shots <= 0:
        return ordered
    by_class: dict[int, list[Sample]] = defaultdict(list)
    by_domain: dict[str, list[Sample]] = defaultdict(list)
    for sample in ordered:
        by_class[sample.label].append(sample)
        by_domain[sample.domain].append(sample)
    per_domain = shots // len(by_domain)
    chosen: list[Sample] = []
    for label in sorted(by_class):
        if len(by_class[label]) < shots:
            chosen.extend(by_class[label])
            continue
        for domain in sorted(by_domain):
            members = by_domain[domain]
            rng = np.random.default_rng([seed, label, _stable_hash((label, domain))])
            picks = rng.permutation(len(members))[:per_domain]
            chosen.extend(members[index] for index in sorted(picks))
    return tuple(sorted(chosen, key=canonical.rank.__getitem__))
