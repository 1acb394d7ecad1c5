"""Feature encoding at real sizes: decoding workers, resumable shards, the feature checksum and
the prepare command's --workers. Runs on the embedded digits data with a random-init
tiny-digits model, on small shards so a dozen images make several of them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from croft_search.backbones import load_backbone
from croft_search.data import load_domain_split
from croft_search.encoding import MAX_DEFAULT_WORKERS, default_workers, usable_cores
from croft_search.errors import DataError
from croft_search.features import CLEAN_VIEW, FeatureCache, augmented_view_kind
from croft_search.prepare import main as prepare_main

IMAGES = 12
KIND = augmented_view_kind(2, 3)  # 2 views: 24 jobs, 3 shards of 8, 2 batches of 4 each
BATCH, SHARD = 4, 8


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny-digits", pretrained=None)


@pytest.fixture(scope="module")
def samples(digits_root: Path) -> list:
    """Photo-domain training images (the sketch split trains on them)."""
    train = load_domain_split("digits", digits_root, "sketch").train
    return sorted((s for s in train if s.domain == "photo"), key=lambda s: str(s.path))[:IMAGES]


def make_cache(backbone, root: Path, cache_dir: Path, **kwargs) -> FeatureCache:
    options = {"batch_size": BATCH, "shard_size": SHARD, "progress": False} | kwargs
    return FeatureCache(backbone, root, cache_dir, **options)


def encode(cache: FeatureCache, samples, kind: str = KIND) -> torch.Tensor:
    return cache.image_features("digits", "photo", samples, kind).features


def shard_folders(cache: FeatureCache, kind: str = KIND) -> list[Path]:
    unit = cache.unit_path("digits", "photo", kind)
    return sorted(unit.parent.glob(f".{unit.stem}.*.shards"))


def kill_encoding(monkeypatch, backbone, root: Path, cache_dir: Path, samples, batches: int):
    """Encode ``samples`` into ``cache_dir`` with a backbone whose encoder raises on its
    (batches + 1)-th call, as a killed run stops; the cache that was interrupted."""
    calls = {"n": 0}
    encode_images = backbone.encode_images

    def encode_then_die(images):
        calls["n"] += 1
        if calls["n"] > batches:
            raise KeyboardInterrupt
        return encode_images(images)

    monkeypatch.setattr(backbone, "encode_images", encode_then_die)
    killed = make_cache(backbone, root, cache_dir)
    with pytest.raises(KeyboardInterrupt):
        encode(killed, samples)
    monkeypatch.undo()
    return killed


@pytest.fixture()
def uninterrupted(backbone, digits_root, samples, tmp_path) -> torch.Tensor:
    return encode(make_cache(backbone, digits_root, tmp_path / "reference"), samples)


@pytest.mark.parametrize("kind", [CLEAN_VIEW, KIND])
def test_workers_give_identical_features(backbone, digits_root, samples, tmp_path, kind):
    in_process = make_cache(backbone, digits_root, tmp_path / "w0", workers=0)
    two_workers = make_cache(backbone, digits_root, tmp_path / "w2", workers=2)
    expected = encode(in_process, samples, kind)
    assert torch.equal(encode(two_workers, samples, kind), expected)
    assert (
        two_workers.encoded_images
        == in_process.encoded_images
        == expected.shape[0] * (expected.shape[1])
    )


def test_an_interrupted_encoding_resumes_from_its_last_shard(
    backbone, digits_root, samples, tmp_path, monkeypatch, uninterrupted
):
    cache_dir = tmp_path / "cache"
    # shards 0 and 1 done, shard 2 half done
    killed = kill_encoding(monkeypatch, backbone, digits_root, cache_dir, samples, batches=5)
    assert not killed.unit_path("digits", "photo", KIND).exists()
    (folder,) = shard_folders(killed)
    assert sorted(p.name for p in folder.iterdir()) == ["000000.npy", "000001.npy"]

    resumed = make_cache(backbone, digits_root, cache_dir)
    features = encode(resumed, samples)
    assert resumed.encoded_images == 2 * IMAGES - 2 * SHARD
    assert torch.equal(features, uninterrupted)
    assert shard_folders(resumed) == []  # assembled into the unit, then removed
    again = make_cache(backbone, digits_root, cache_dir)
    assert torch.equal(encode(again, samples), uninterrupted) and again.encoded_images == 0


def test_the_progress_bar_counts_resumed_shards(
    backbone, digits_root, samples, tmp_path, monkeypatch, capsys
):
    kill_encoding(monkeypatch, backbone, digits_root, tmp_path, samples, batches=2)
    capsys.readouterr()
    encode(make_cache(backbone, digits_root, tmp_path, progress=True), samples)
    bar = capsys.readouterr().err
    assert f"{SHARD}/{2 * IMAGES}" in bar and f"{2 * IMAGES}/{2 * IMAGES}" in bar
    assert "img/s" in bar and "<" in bar  # rate and elapsed<remaining


def test_shards_of_other_images_are_ignored(backbone, digits_root, samples, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    killed = kill_encoding(monkeypatch, backbone, digits_root, cache_dir, samples, batches=4)
    (stale,) = shard_folders(killed)

    # The same unit over other images: another fingerprint, so another shard key.
    changed = make_cache(backbone, digits_root, cache_dir)
    features = encode(changed, samples[1:])
    assert changed.encoded_images == 2 * (IMAGES - 1)
    fresh = encode(make_cache(backbone, digits_root, tmp_path / "fresh"), samples[1:])
    assert torch.equal(features, fresh)
    assert not stale.exists()  # superseded by the rewritten unit


def test_a_damaged_shard_is_encoded_again(
    backbone, digits_root, samples, tmp_path, monkeypatch, uninterrupted
):
    cache_dir = tmp_path / "cache"
    killed = kill_encoding(monkeypatch, backbone, digits_root, cache_dir, samples, batches=4)
    (folder,) = shard_folders(killed)
    np.save(folder / "000001.npy", np.zeros((3, 5), np.float32))  # wrong shape
    resumed = make_cache(backbone, digits_root, cache_dir)
    assert torch.equal(encode(resumed, samples), uninterrupted)
    assert resumed.encoded_images == 2 * IMAGES - SHARD


def flip_a_feature_bit(path: Path, first_row: torch.Tensor) -> None:
    """Flip one bit inside the stored bytes of the first feature row, the way bit rot would:
    Parquet decodes the file as before, only the values differ."""
    data = bytearray(path.read_bytes())
    at = data.find(first_row.numpy().tobytes()[:32])
    assert at > 0, "feature bytes are stored as they are (incompressible floats)"
    data[at + 1] ^= 0x10
    path.write_bytes(bytes(data))


def edit_the_checksum(path: Path, _: torch.Tensor) -> None:
    table = pq.read_table(path)
    metadata = dict(table.schema.metadata) | {b"sha256": b"0" * 64}
    pq.write_table(table.replace_schema_metadata(metadata), path)


def change_a_value_keeping_the_metadata(path: Path, _: torch.Tensor) -> None:
    table = pq.read_table(path)
    column = table.column("feature").combine_chunks()
    values = column.values.to_numpy().copy()
    values[0] += 1.0
    feature = pa.FixedSizeListArray.from_arrays(pa.array(values), column.type.list_size)
    table = table.set_column(table.schema.get_field_index("feature"), "feature", feature)
    pq.write_table(table.replace_schema_metadata(table.schema.metadata), path)


@pytest.mark.parametrize(
    "damage", [flip_a_feature_bit, edit_the_checksum, change_a_value_keeping_the_metadata]
)
def test_a_unit_that_fails_its_checksum_is_recomputed(
    backbone, digits_root, samples, tmp_path, damage
):
    first = make_cache(backbone, digits_root, tmp_path)
    original = encode(first, samples, CLEAN_VIEW)
    path = first.unit_path("digits", "photo", CLEAN_VIEW)
    damage(path, original[0, 0])

    rerun = make_cache(backbone, digits_root, tmp_path)
    with pytest.warns(UserWarning, match="unreadable.*sha256"):
        features = encode(rerun, samples, CLEAN_VIEW)
    assert rerun.encoded_images == IMAGES
    assert torch.equal(features, original)
    clean = make_cache(backbone, digits_root, tmp_path)
    assert torch.equal(encode(clean, samples, CLEAN_VIEW), original)  # rewritten, valid
    assert clean.encoded_images == 0


def test_the_precision_is_recorded(backbone, digits_root, samples, tmp_path):
    cache = make_cache(backbone, digits_root, tmp_path)
    encode(cache, samples[:2], CLEAN_VIEW)
    metadata = pq.read_schema(cache.unit_path("digits", "photo", CLEAN_VIEW)).metadata
    assert metadata[b"precision"] == b"float32"  # autocast only on CUDA


def test_prepare_rejects_negative_workers_in_one_line(tmp_path, capsys):
    argv = ["--workers", "-1", "--data-root", str(tmp_path), "--cache-dir", str(tmp_path / "c")]
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --workers must be >= 0, got -1"


def test_a_bad_image_in_a_worker_is_its_one_line_error(backbone, digits_root, samples, tmp_path):
    bad_path = tmp_path / "broken.png"
    bad_path.write_bytes(b"not a png")
    broken = list(samples)
    broken[5] = dataclasses.replace(samples[5], path=bad_path)
    cache = make_cache(backbone, digits_root, tmp_path / "cache", workers=2)
    with pytest.raises(DataError, match=r"^cannot read image .*broken\.png: [^\n]*$"):
        encode(cache, broken, CLEAN_VIEW)


def test_default_workers_decode_in_process_on_cpu_only():
    assert default_workers("cpu") == 0
    assert default_workers("cuda") == min(MAX_DEFAULT_WORKERS, usable_cores()) >= 1
