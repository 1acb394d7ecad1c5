"""Datasets: the registry, loaders for the PACS-style domain-split layout and open-set
layouts, image decoding, few-shot sampling and the embedded digits benchmark."""

from croft_search.data import catalog as _catalog  # noqa: F401  (registers built-ins)
from croft_search.data.base import DomainSplit, OpenSet, Sample
from croft_search.data.digits import build_digits, pretrain_corpus
from croft_search.data.domain_split import load_domain_split
from croft_search.data.fewshot import SHOTS_PER, positions, sample_few_shot, sample_shots
from croft_search.data.fingerprint import dataset_fingerprint
from croft_search.data.images import load_image
from croft_search.data.open_set import OPEN_SET_LABEL, id_classes_in, load_open_set
from croft_search.data.registry import (
    DatasetSpec,
    dataset_names,
    get_dataset_spec,
    register_dataset,
)

__all__ = [
    "OPEN_SET_LABEL",
    "DatasetSpec",
    "DomainSplit",
    "OpenSet",
    "Sample",
    "build_digits",
    "dataset_fingerprint",
    "dataset_names",
    "get_dataset_spec",
    "id_classes_in",
    "load_domain_split",
    "load_image",
    "load_open_set",
    "pretrain_corpus",
    "register_dataset",
    "sample_few_shot",
    "positions",
    "sample_shots",
    "SHOTS_PER",
]
