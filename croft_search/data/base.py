"""The records every dataset produces, whatever its layout on disk."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    """One image: absolute path, class index (-1 for open-set images), class name, domain
    (empty string when the dataset has no domains)."""

    path: Path
    label: int
    classname: str
    domain: str = ""


@dataclass(frozen=True)
class DomainSplit:
    """One leave-one-domain-out split: train/val from the source domains, test from the
    target domain, as listed in `NAME/test_on_<domain>.json`."""

    dataset: str
    target_domain: str
    source_domains: tuple[str, ...]
    classnames: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    test: tuple[Sample, ...]
    split_file: Path

    def part(self, name: str) -> tuple[Sample, ...]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


@dataclass(frozen=True)
class OpenSet:
    """Semantic-shift images: classes disjoint from the ID classes (labels are -1)."""

    name: str
    classnames: tuple[str, ...]
    samples: tuple[Sample, ...]
    source: Path = field(default=Path("."))
