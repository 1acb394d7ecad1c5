"""Feature cache: hit, miss on changed data or weights, corruption, atomic writes, the
prepare command. Runs on the embedded digits data with a random-init tiny-digits model."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from croft_search import features as features_module
from croft_search.backbones import load_backbone
from croft_search.data import get_dataset_spec, load_domain_split
from croft_search.features import CLEAN_VIEW, FeatureCache, augmented_view_kind
from croft_search.prepare import main as prepare_main

VIEWS = 2


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny-digits", pretrained=None)


@pytest.fixture()
def data_copy(digits_root: Path, tmp_path: Path) -> Path:
    """A private copy of the digits data that a test may modify."""
    root = tmp_path / "data"
    shutil.copytree(digits_root, root)
    return root


def parquet_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.rglob("*.parquet"))


def test_second_run_is_a_cache_hit(backbone, digits_root, tmp_path):
    first = FeatureCache(backbone, digits_root, tmp_path / "cache", progress=False)
    units = first.prepare_dataset("digits", views=VIEWS)
    spec = get_dataset_spec("digits")
    n_images = sum(len(units[(d, CLEAN_VIEW)].paths) for d in spec.domains)
    n_train = sum(len(units[(d, augmented_view_kind(VIEWS, 0))].paths) for d in spec.domains)
    assert first.encoded_images == n_images + VIEWS * n_train
    # one file per (domain, view kind)
    assert len(parquet_files(tmp_path / "cache")) == 2 * len(spec.domains)

    second = FeatureCache(backbone, digits_root, tmp_path / "cache", progress=False)
    again = second.prepare_dataset("digits", views=VIEWS)
    assert second.encoded_images == 0
    for key, unit in units.items():
        assert again[key].paths == unit.paths
        assert torch.equal(again[key].features, unit.features)


def test_cached_features_equal_direct_encoding(backbone, digits_root, tmp_path):
    cache = FeatureCache(backbone, digits_root, tmp_path / "cache", progress=False)
    split = load_domain_split("digits", digits_root, "sketch")
    samples = list(split.test[:5])
    from_cache = cache.features_of("digits", samples)
    images = torch.stack([backbone.eval_transform(_open(s.path)) for s in samples])
    direct = backbone.encode_images(images)
    torch.testing.assert_close(from_cache, direct, rtol=1e-4, atol=1e-5)


def _open(path: Path):
    from croft_search.data import load_image

    return load_image(path)


def test_augmented_views_are_seeded_and_differ_from_clean(backbone, digits_root, tmp_path):
    split = load_domain_split("digits", digits_root, "photo")
    samples = list(split.train[:8])
    kind = augmented_view_kind(3, 7)
    a = FeatureCache(backbone, digits_root, tmp_path / "a", progress=False)
    b = FeatureCache(backbone, digits_root, tmp_path / "b", progress=False)
    views_a = a.features_of("digits", samples, kind)
    views_b = b.features_of("digits", samples, kind)
    assert views_a.shape == (8, 3, backbone.embed_dim)
    assert torch.equal(views_a, views_b)  # same seed, separate caches: same views
    clean = a.features_of("digits", samples)
    assert not torch.allclose(views_a[:, 0], clean)
    assert not torch.allclose(views_a[:, 0], views_a[:, 1])
    other_seed = a.features_of("digits", samples, augmented_view_kind(3, 8))
    assert not torch.allclose(other_seed, views_a)


def test_changed_image_misses_only_its_domain(backbone, data_copy, tmp_path):
    cache_dir = tmp_path / "cache"
    FeatureCache(backbone, data_copy, cache_dir, progress=False).prepare_dataset("digits", views=0)
    split = load_domain_split("digits", data_copy, "cartoon")
    victim = split.test[0].path
    donor = split.test[-1].path
    shutil.copyfile(donor, victim)  # new content, new size/mtime

    rerun = FeatureCache(backbone, data_copy, cache_dir, progress=False)
    units = rerun.prepare_dataset("digits", views=0)
    assert rerun.encoded_images == len(units[("cartoon", CLEAN_VIEW)].paths)
    index = {p: i for i, p in enumerate(units[("cartoon", CLEAN_VIEW)].paths)}
    rel = lambda p: p.relative_to(data_copy).as_posix()  # noqa: E731
    feats = units[("cartoon", CLEAN_VIEW)].features[:, 0]
    torch.testing.assert_close(feats[index[rel(victim)]], feats[index[rel(donor)]])


def test_changed_weights_miss(backbone, digits_root, tmp_path):
    cache_dir = tmp_path / "cache"
    FeatureCache(backbone, digits_root, cache_dir, progress=False).prepare_dataset(
        "digits", views=0
    )
    state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    state["visual.attnpool.c_proj.bias"] += 0.01
    path = tmp_path / "perturbed.pt"
    torch.save(state, path)
    other = load_backbone("tiny-digits", pretrained=str(path))
    assert other.identity != backbone.identity
    rerun = FeatureCache(other, digits_root, cache_dir, progress=False)
    rerun.prepare_dataset("digits", views=0)
    assert rerun.encoded_images > 0


def test_corrupt_cache_file_is_recomputed_with_a_warning(backbone, digits_root, tmp_path):
    cache_dir = tmp_path / "cache"
    first = FeatureCache(backbone, digits_root, cache_dir, progress=False)
    original = first.domain_unit("digits", "painting")
    path = first.unit_path("digits", "painting", CLEAN_VIEW)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated, as after a crash of another tool

    rerun = FeatureCache(backbone, digits_root, cache_dir, progress=False)
    with pytest.warns(UserWarning, match="unreadable"):
        unit = rerun.domain_unit("digits", "painting")
    assert rerun.encoded_images == len(original.paths)
    assert torch.equal(unit.features, original.features)
    assert pq.read_table(path).num_rows == len(original.paths)  # rewritten whole


def test_interrupted_write_leaves_no_valid_looking_file(
    backbone, digits_root, tmp_path, monkeypatch
):
    cache_dir = tmp_path / "cache"

    def write_half_then_die(table, where):
        Path(where).write_bytes(b"PAR1 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(features_module.pq, "write_table", write_half_then_die)
    cache = FeatureCache(backbone, digits_root, cache_dir, progress=False)
    with pytest.raises(KeyboardInterrupt):
        cache.domain_unit("digits", "sketch")
    assert not cache.unit_path("digits", "sketch", CLEAN_VIEW).exists()
    monkeypatch.undo()
    rerun = FeatureCache(backbone, digits_root, cache_dir, progress=False)
    rerun.domain_unit("digits", "sketch")
    assert rerun.encoded_images > 0


def test_split_features_shapes_and_alignment(backbone, digits_root, tmp_path):
    cache = FeatureCache(backbone, digits_root, tmp_path / "cache", progress=False)
    split = load_domain_split("digits", digits_root, "painting")
    feats = cache.split_features("digits", "painting", views=VIEWS)
    d = backbone.embed_dim
    assert feats.train_views.shape == (len(split.train), VIEWS, d)
    assert feats.train_clean.shape == (len(split.train), d)
    assert feats.val.shape == (len(split.val), d)
    assert feats.test.shape == (len(split.test), d)
    assert feats.test_labels.tolist() == [s.label for s in split.test]
    assert feats.classnames == split.classnames
    assert "painting" not in {feats.domains[i] for i in feats.train_domains.tolist()}
    assert feats.val_open.shape[0] > 0 and feats.test_open.shape[0] > 0
    # rows follow the split file's order, whatever the domain grouping inside the cache
    torch.testing.assert_close(feats.val[3], cache.features_of("digits", [split.val[3]])[0])


def test_text_features_are_cached(backbone, digits_root, tmp_path):
    prompts = ["a photo of the number zero.", "a sketch of the number one."]
    first = FeatureCache(backbone, digits_root, tmp_path / "cache", progress=False)
    text = first.text_features(prompts)
    assert text.shape == (2, backbone.embed_dim)
    torch.testing.assert_close(text, backbone.encode_texts(prompts))
    second = FeatureCache(backbone, digits_root, tmp_path / "cache", progress=False)
    again = second.text_features(prompts)
    assert torch.equal(text, again)
    assert len(list((tmp_path / "cache").rglob("_text/*.parquet"))) == 1


def test_prepare_command_reports_counts_and_hits(backbone, digits_root, tmp_path, capsys):
    weights = tmp_path / "tiny.pt"
    torch.save(backbone.model.state_dict(), weights)
    argv = [
        "--dataset", "digits", "--backbone", "tiny-digits", "--pretrained", str(weights),
        "--views", "1", "--data-root", str(digits_root), "--cache-dir", str(tmp_path / "c"),
    ]  # fmt: skip
    assert prepare_main(argv) == 0
    out = capsys.readouterr().out
    split = load_domain_split("digits", digits_root, "sketch")
    assert re.search(
        rf"^sketch\s+{len(split.test)}\s+{len(split_train_sketch(digits_root))}\s+1$", out, re.M
    )
    assert "cache filled" in out
    assert prepare_main(argv) == 0
    assert "encoded 0 image views" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--dataset", "digits", "--views", "-1"], "--views must be >= 0"),
        (["--dataset", "digits_open_test"], "open-set dataset"),
        (["--backbone", "no-such-model"], "no-such-model"),
    ],
)
def test_prepare_bad_input_is_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare_main([*argv, "--data-root", str(tmp_path), "--cache-dir", str(tmp_path / "c")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err
    assert len(err.splitlines()) == 1


def split_train_sketch(root: Path) -> set:
    """Sketch images that some split file trains on."""
    spec = get_dataset_spec("digits")
    return {
        s.path
        for d in spec.domains
        for s in load_domain_split("digits", root, d).train
        if s.domain == "sketch"
    }


def test_prepare_missing_real_dataset_names_the_path(tmp_path, capsys):
    # the dataset is checked before any backbone is loaded: no weights needed for this error
    argv = ["--dataset", "PACS", "--data-root", str(tmp_path), "--pretrained", "/nonexistent.pt"]
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(tmp_path / "PACS") in err


def test_the_crop_scale_names_its_own_views(backbone, digits_root, tmp_path):
    split = load_domain_split("digits", digits_root, "photo")
    samples = list(split.train[:6])
    cache = FeatureCache(backbone, digits_root, tmp_path, progress=False)
    assert augmented_view_kind(3, 7) == "aug3s7"  # the default scale keeps old caches valid
    reference_kind = augmented_view_kind(3, 7, 0.08)
    assert reference_kind == "aug3s7c0.08"
    default = cache.features_of("digits", samples, augmented_view_kind(3, 7))
    wide = cache.features_of("digits", samples, reference_kind)
    assert wide.shape == default.shape and not torch.allclose(wide, default)
    again = FeatureCache(backbone, digits_root, tmp_path, progress=False)
    assert torch.equal(again.features_of("digits", samples, reference_kind), wide)
    assert again.encoded_images == 0  # read back from its own cache unit
    crop = backbone.train_transform(hflip=False, crop_scale=0.08).transforms[1]
    assert crop.scale == (0.08, 1.0)


def test_encoding_views_leaves_the_global_random_stream_alone(backbone, digits_root, tmp_path):
    split = load_domain_split("digits", digits_root, "photo")
    cache = FeatureCache(backbone, digits_root, tmp_path, progress=False)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    views = cache.features_of("digits", list(split.train[:4]), augmented_view_kind(2, 5))
    assert torch.equal(torch.rand(3), expected)
    again = FeatureCache(backbone, digits_root, tmp_path / "other", progress=False)
    assert torch.equal(again.features_of("digits", list(split.train[:4]),
                                         augmented_view_kind(2, 5)), views)  # fmt: skip
