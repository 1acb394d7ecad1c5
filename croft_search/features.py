"""Feature cache: every image goes through the frozen image encoder once per view, the
result is stored as Parquet, and every trial of every search reads it back as tensors.

Cache unit: (backbone identity, dataset, domain, view kind). The four leave-one-domain-out
split files of a dataset list the same images in different roles, so caching per domain
(instead of per split file) encodes each image once however many split files name it; a
split's train/val/test tensors are gathered from the units of its domains by path.

View kinds: ``clean`` (the evaluation transform, one view per image) for every image, and
``aug<V>s<seed>`` (V random-resized-crop views, with flips where the dataset allows them)
for the images some split file uses for training.

A unit is written whole (write-then-rename) with a sha256 of its feature bytes in its
metadata, checked on every read. Encoding itself (worker processes, mixed precision on CUDA,
shards that let an interrupted encoding resume) is ``croft_search.encoding``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from croft_search.backbones import Backbone
from croft_search.config import feature_cache_dir
from croft_search.contract import DEFAULT_CROP_SCALE
from croft_search.data import (
    Sample,
    dataset_fingerprint,
    get_dataset_spec,
    id_classes_in,
    load_domain_split,
    load_open_set,
)
from croft_search.data.base import OpenSet
from croft_search.encoding import SHARD_SIZE, ImageEncoder
from croft_search.errors import DataError

# 2: a sha256 of the feature bytes in the metadata, and the precision they were computed in.
CACHE_FORMAT_VERSION = 2
CLEAN_VIEW = "clean"


def augmented_view_kind(views: int, seed: int, crop_scale: float = DEFAULT_CROP_SCALE) -> str:
    """The cache name of ``views`` augmented views per image drawn with ``seed``; a crop scale
    other than the default is part of the name (``aug30s0c0.08``)."""
    if crop_scale == DEFAULT_CROP_SCALE:
        return f"aug{views}s{seed}"
    return f"aug{views}s{seed}c{crop_scale:g}"


@dataclass(frozen=True)
class CachedFeatures:
    """Features of one cache unit, rows aligned with ``paths``.

    ``features`` is [N, V, d] (V = 1 for the clean view), raw encoder output (not normalised)."""

    paths: tuple[str, ...]
    labels: torch.Tensor
    features: torch.Tensor

    def select(self, samples: Sequence[Sample], root: Path) -> torch.Tensor:
        index = {path: row for row, path in enumerate(self.paths)}
        try:
            rows = [index[_relative(sample.path, root)] for sample in samples]
        except KeyError as missing:
            raise KeyError(f"image {missing} is not in this cache unit") from None
        return self.features[torch.as_tensor(rows, dtype=torch.long)]


@dataclass(frozen=True)
class SplitFeatures:
    """Everything a trial needs for one leave-one-domain-out split, as tensors.

    Image features are raw encoder outputs; ``train_views`` holds [N, V, d] augmented views,
    the other image tensors [N, d] clean views."""

    classnames: tuple[str, ...]
    domains: tuple[str, ...]
    train_clean: torch.Tensor
    train_views: torch.Tensor
    train_labels: torch.Tensor
    train_domains: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    val_domains: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    val_open: torch.Tensor
    test_open: torch.Tensor
    target_domain: str
    backbone_identity: str
    train_samples: tuple[Sample, ...] = ()
    # Per row of ``test_open``: which of ``test_open_names`` it comes from, and its class
    # index within that open set (the reference protocol caps images per class).
    test_open_names: tuple[str, ...] = ()
    test_open_set_ids: torch.Tensor | None = None
    test_open_classes: torch.Tensor | None = None


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return Path(path).resolve().as_posix()


class FeatureCache:
    """Computes, stores and loads image and text features of one backbone."""

    def __init__(
        self,
        backbone: Backbone,
        data_root: Path,
        cache_dir: Path | None = None,
        batch_size: int = 256,
        progress: bool = True,
        workers: int = 0,
        shard_size: int = SHARD_SIZE,
        mixed_precision: bool = True,
    ) -> None:
        """``workers``: processes that decode and augment images (0: this one);
        ``shard_size``: image views per resumable shard of a unit being encoded;
        ``mixed_precision``: autocast the forward pass on CUDA (ignored elsewhere)."""
        self.backbone = backbone
        self.data_root = Path(data_root)
        self.cache_dir = Path(cache_dir) if cache_dir else feature_cache_dir()
        self.encoder = ImageEncoder(
            backbone, batch_size, workers, shard_size, mixed_precision, progress
        )
        self._units: dict[tuple[str, str, str], CachedFeatures] = {}
        self._images: dict[str, tuple[dict[str, list[Sample]], dict[str, list[Sample]]]] = {}

    @property
    def encoded_images(self) -> int:
        """How many image views this instance pushed through the encoder."""
        return self.encoder.encoded_images

    # ------------------------------------------------------------------ image units
    def unit_path(self, dataset: str, domain: str, view_kind: str) -> Path:
        safe_identity = self.backbone.identity.replace("/", "_").replace("@", "-")
        return (
            self.cache_dir / safe_identity / dataset / (domain or "_all") / f"{view_kind}.parquet"
        )

    def image_features(
        self,
        dataset: str,
        domain: str,
        samples: Sequence[Sample],
        view_kind: str = CLEAN_VIEW,
        hflip: bool = False,
    ) -> CachedFeatures:
        """Features of ``samples`` (all from one domain) for one view kind: read from the cache
        when it holds exactly these images and these weights, else encoded and stored."""
        samples = sorted(set(samples), key=lambda s: str(s.path))
        path = self.unit_path(dataset, domain, view_kind)
        expected = {
            "format": str(CACHE_FORMAT_VERSION),
            "backbone": self.backbone.identity,
            "preprocessing": json.dumps(self.backbone.describe().get("preprocessing", "")),
            "view_kind": view_kind,
            "hflip": str(hflip),
            "fingerprint": dataset_fingerprint(samples),
        }
        cached = self._read(path, expected)
        if cached is not None:
            return cached
        views, seed, crop_scale = _parse_view_kind(view_kind)
        features = self.encoder.encode(
            samples,
            views,
            seed,
            crop_scale,
            hflip,
            label=f"{dataset}/{domain or '-'} {view_kind}",
            shard_dir=self.encoder.shard_folder(path, expected),
        )
        unit = CachedFeatures(
            paths=tuple(_relative(s.path, self.data_root) for s in samples),
            labels=torch.as_tensor([s.label for s in samples], dtype=torch.long),
            features=features,
        )
        metadata = expected | {"dataset": dataset, "domain": domain}
        # The precision is recorded, not part of the key: a unit filled on a GPU in autocast
        # serves the trials of every device, as one filled on the CPU does.
        self._write(path, unit, metadata | {"precision": self.encoder.precision})
        self.encoder.discard_shards(path)
        return unit

    # ------------------------------------------------------------------ text
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Raw text features of ``prompts`` [P, d], cached per backbone and prompt list."""
        prompts = list(prompts)
        digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
        safe_identity = self.backbone.identity.replace("/", "_").replace("@", "-")
        path = self.cache_dir / safe_identity / "_text" / f"{digest}.parquet"
        expected = {
            "format": str(CACHE_FORMAT_VERSION),
            "backbone": self.backbone.identity,
            "prompts": json.dumps(prompts),
        }
        cached = self._read(path, expected)
        if cached is not None:
            return cached.features[:, 0]
        with torch.no_grad():
            features = self.backbone.encode_texts(prompts).float().cpu()
        unit = CachedFeatures(
            paths=tuple(prompts),
            labels=torch.full((len(prompts),), -1, dtype=torch.long),
            features=features[:, None],
        )
        self._write(path, unit, expected)
        return features

    # ------------------------------------------------------------------ storage
    def _read(self, path: Path, expected: dict[str, str]) -> CachedFeatures | None:
        if not path.exists():
            return None
        try:
            table = pq.read_table(path)
            meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
            if any(meta.get(key) != value for key, value in expected.items()):
                return None  # stale: other weights, other images or other views
            n_views, dim = int(meta["views"]), int(meta["dim"])
            flat = table.column("feature").combine_chunks().values.to_numpy(zero_copy_only=False)
            rows = table.num_rows
            if rows != int(meta["rows"]) or flat.size != rows * dim:
                raise ValueError(f"{rows} rows, {flat.size} values")
            if _feature_digest(flat) != meta.get("sha256"):
                # Bytes changed on disk that Parquet's own decoding did not notice.
                raise ValueError("the features do not match their sha256")
            features = torch.from_numpy(
                flat.astype(np.float32, copy=True)
            )  # arrow buffers are read-only
            features = features.view(rows // n_views, n_views, dim)
            paths = table.column("path").to_pylist()[::n_views]
            labels = torch.tensor(table.column("label").to_numpy()[::n_views], dtype=torch.long)
        except Exception as err:  # noqa: BLE001 - any unreadable cache file is recomputed
            warnings.warn(
                f"feature cache file {path} is unreadable ({err}); recomputing", stacklevel=3
            )
            return None
        return CachedFeatures(paths=tuple(paths), labels=labels, features=features)

    @staticmethod
    def _write(path: Path, unit: CachedFeatures, metadata: dict[str, str]) -> None:
        n, n_views, dim = unit.features.shape
        values = unit.features.reshape(-1).numpy()
        flat = pa.array(values, type=pa.float32())
        table = pa.table(
            {
                "path": pa.array([p for p in unit.paths for _ in range(n_views)], pa.string()),
                "label": pa.array(np.repeat(unit.labels.numpy(), n_views), pa.int64()),
                "view": pa.array(np.tile(np.arange(n_views), n), pa.int32()),
                "feature": pa.FixedSizeListArray.from_arrays(flat, dim),
            }
        )
        metadata = metadata | {
            "views": str(n_views),
            "dim": str(dim),
            "rows": str(n * n_views),
            "sha256": _feature_digest(values),
        }
        table = table.replace_schema_metadata(metadata)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: an interrupted run leaves a temp file, never a half cache file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    # ------------------------------------------------------------------ datasets
    def domain_unit(self, dataset: str, domain: str, view_kind: str = CLEAN_VIEW) -> CachedFeatures:
        """One domain's unit: the clean view of every image any split file names, or the
        augmented views of every image any split file trains on. Held in memory once read."""
        spec = get_dataset_spec(dataset)
        key = (spec.name, domain, view_kind)
        if key not in self._units:
            every_image, train_images = self._domain_images(spec.name)
            images = every_image[domain] if view_kind == CLEAN_VIEW else train_images[domain]
            self._units[key] = self.image_features(
                spec.name, domain, images, view_kind, hflip=spec.hflip and view_kind != CLEAN_VIEW
            )
        return self._units[key]

    def features_of(
        self, dataset: str, samples: Sequence[Sample], view_kind: str = CLEAN_VIEW
    ) -> torch.Tensor:
        """Cached features of ``samples`` of a domain-split dataset, in their order:
        [N, d] for the clean view, [N, V, d] for augmented views."""
        n_views = _parse_view_kind(view_kind)[0]
        out = torch.empty(len(samples), max(n_views, 1), self.backbone.embed_dim)
        for domain in dict.fromkeys(s.domain for s in samples):
            rows = [i for i, s in enumerate(samples) if s.domain == domain]
            unit = self.domain_unit(dataset, domain, view_kind)
            out[torch.as_tensor(rows, dtype=torch.long)] = unit.select(
                [samples[i] for i in rows], self.data_root
            )
        return out[:, 0] if view_kind == CLEAN_VIEW else out

    def _domain_images(
        self, dataset: str
    ) -> tuple[dict[str, list[Sample]], dict[str, list[Sample]]]:
        """(every image, training images) per domain, over all split files of the dataset."""
        if dataset not in self._images:
            spec = get_dataset_spec(dataset)
            every_image: dict[str, set[Sample]] = {d: set() for d in spec.domains}
            train_images: dict[str, set[Sample]] = {d: set() for d in spec.domains}
            for domain in spec.target_domains:
                split = load_domain_split(spec.name, self.data_root, domain)
                for sample in (*split.train, *split.val, *split.test):
                    every_image[sample.domain].add(sample)
                for sample in split.train:
                    train_images[sample.domain].add(sample)
            self._images[dataset] = (
                {d: sorted(s, key=lambda x: str(x.path)) for d, s in every_image.items()},
                {d: sorted(s, key=lambda x: str(x.path)) for d, s in train_images.items()},
            )
        return self._images[dataset]

    def prepare_dataset(
        self,
        dataset: str,
        views: int = 8,
        view_seed: int = 0,
        crop_scale: float = DEFAULT_CROP_SCALE,
    ) -> dict[tuple[str, str], CachedFeatures]:
        """Encode (or load) every unit of a domain-split dataset; returns them by
        (domain, view kind)."""
        spec = get_dataset_spec(dataset)
        augmented = augmented_view_kind(views, view_seed, crop_scale)
        kinds = [CLEAN_VIEW] + ([augmented] if views else [])
        _, train_images = self._domain_images(spec.name)
        return {
            (domain, kind): self.domain_unit(spec.name, domain, kind)
            for domain in spec.domains
            for kind in kinds
            if kind == CLEAN_VIEW or train_images[domain]
        }

    def split_features(
        self,
        dataset: str,
        target_domain: str,
        views: int = 8,
        view_seed: int = 0,
        crop_scale: float = DEFAULT_CROP_SCALE,
        val_open_sets: Sequence[str] | None = None,
        test_open_sets: Sequence[str] | None = None,
        test_open_splits: Sequence[str] = ("test",),
    ) -> SplitFeatures:
        """Tensors for one leave-one-domain-out split, encoding only what the cache lacks.
        ``test_open_splits``: the open sets' split lists the test OOD images come from
        (the reference protocol pools train, val and test)."""
        spec = get_dataset_spec(dataset)
        split = load_domain_split(spec.name, self.data_root, target_domain)
        domain_index = {d: i for i, d in enumerate(spec.domains)}
        train_kind = augmented_view_kind(views, view_seed, crop_scale) if views else CLEAN_VIEW

        def labels(samples: Sequence[Sample]) -> torch.Tensor:
            return torch.as_tensor([s.label for s in samples], dtype=torch.long)

        def domains(samples: Sequence[Sample]) -> torch.Tensor:
            return torch.as_tensor([domain_index[s.domain] for s in samples], dtype=torch.long)

        train_views = self.features_of(spec.name, split.train, train_kind)
        test_names = tuple(test_open_sets or spec.test_open_sets)
        test_open, set_ids, classes = self.open_set_rows(
            test_names, test_open_splits, (split.target_domain,), spec.name, split.classnames
        )
        return SplitFeatures(
            classnames=split.classnames,
            domains=tuple(spec.domains),
            train_clean=self.features_of(spec.name, split.train),
            train_views=train_views if views else train_views[:, None],
            train_labels=labels(split.train),
            train_domains=domains(split.train),
            val=self.features_of(spec.name, split.val),
            val_labels=labels(split.val),
            val_domains=domains(split.val),
            test=self.features_of(spec.name, split.test),
            test_labels=labels(split.test),
            # OOD images in the styles of the images they are compared with, where the open
            # set records styles: otherwise style alone would separate ID from OOD.
            val_open=self.open_set_features(
                val_open_sets or spec.val_open_sets,
                "val",
                domains=split.source_domains,
                id_dataset=spec.name,
                id_classes=split.classnames,
            ),
            test_open=test_open,
            target_domain=split.target_domain,
            backbone_identity=self.backbone.identity,
            train_samples=split.train,
            test_open_names=test_names,
            test_open_set_ids=set_ids,
            test_open_classes=classes,
        )

    def open_set_unit(self, name: str, split: str) -> tuple[OpenSet, CachedFeatures]:
        """An open-set dataset's samples and their clean-view features."""
        key = (name, f"_{split}", CLEAN_VIEW)
        open_set = load_open_set(name, self.data_root, split=split)
        if key not in self._units:
            self._units[key] = self.image_features(
                open_set.name, f"_{split}", open_set.samples, CLEAN_VIEW
            )
        return open_set, self._units[key]

    def open_set_features(
        self,
        names: Sequence[str],
        split: str,
        domains: Collection[str] | None = None,
        id_dataset: str = "",
        id_classes: Collection[str] = (),
    ) -> torch.Tensor:
        """Clean-view features of one or more open-set datasets, concatenated [M, d]; with
        ``domains``, only the images of those domains where the open set records domains;
        without the classes each open set drops for ``id_dataset``."""
        return self.open_set_rows(names, (split,), domains, id_dataset, id_classes)[0]

    def open_set_rows(
        self,
        names: Sequence[str],
        splits: Sequence[str],
        domains: Collection[str] | None = None,
        id_dataset: str = "",
        id_classes: Collection[str] = (),
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features [M, d], open-set index [M], class index within its open set [M]) of
        the images of ``names`` in the split lists ``splits`` (an image-folder open set has
        one list, read once), without the classes that are also ``id_classes``."""
        parts, set_ids, classes = [], [], []
        for index, name in enumerate(names):
            spec = get_dataset_spec(name)
            dropped = spec.excluded_for(id_dataset)
            for split in splits if spec.has_split_lists else splits[:1]:
                open_set, unit = self.open_set_unit(name, split)
                shared = id_classes_in(open_set.classnames, id_classes) - dropped
                if shared:
                    warnings.warn(
                        f"open set {name}: dropped {len(shared)} class(es) that are also ID "
                        f"classes of {id_dataset or 'the dataset'} ({', '.join(sorted(shared))})",
                        stacklevel=2,
                    )
                samples = [
                    s
                    for s in open_set.samples
                    if (domains is None or s.domain in ("", *domains))
                    and s.classname not in dropped | shared
                ]
                if not samples:
                    raise DataError(
                        f"open set {name} ({split}) has no images left for {id_dataset or 'it'}"
                    )
                names_sorted = sorted({s.classname for s in open_set.samples})
                order = {c: i for i, c in enumerate(names_sorted)}
                parts.append(unit.select(samples, self.data_root)[:, 0])
                set_ids.append(torch.full((len(samples),), index, dtype=torch.long))
                classes.append(torch.as_tensor([order[s.classname] for s in samples]))
        if not parts:
            empty = torch.empty(0, dtype=torch.long)
            return torch.empty(0, self.backbone.embed_dim), empty, empty
        return torch.cat(parts), torch.cat(set_ids), torch.cat(classes)


def _parse_view_kind(view_kind: str) -> tuple[int, int, float]:
    """(views, seed, crop scale): 0 views for the clean view."""
    if view_kind == CLEAN_VIEW:
        return 0, 0, DEFAULT_CROP_SCALE
    views, rest = view_kind[3:].split("s")
    seed, _, scale = rest.partition("c")
    return int(views), int(seed), float(scale) if scale else DEFAULT_CROP_SCALE


def _feature_digest(values: np.ndarray) -> str:
    """sha256 of features as float32 bytes in the machine's order (little-endian on every
    platform torch runs on), the same whether they come from a tensor or back from Arrow."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float32).data).hexdigest()
