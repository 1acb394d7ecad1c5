"""Backbone loading: the embedded tiny model, local checkpoints, tags, and every user error.
Offline and CPU only: downloads are replaced by fakes so no test touches the network."""

from __future__ import annotations

import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from croft_search import backbones
from croft_search.backbones import Backbone, backbone_names, load_backbone
from croft_search.errors import BackboneError

CAPTIONS = ["a sketch of the number seven", "a photo of the number two", "a print of zero"]


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return load_backbone("tiny-digits", pretrained=None)


@pytest.fixture(scope="module")
def image_batch(tiny: Backbone) -> torch.Tensor:
    images = [
        Image.new("RGB", (32, 32), (30, 200, 90)),
        Image.new("L", (40, 28), 200),  # grayscale and not square: the transform must cope
        Image.effect_noise((32, 32), 60).convert("RGB"),
    ]
    return torch.stack([tiny.eval_transform(image) for image in images])


def _save_torch(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state_dict, path)
    return path


def _save_safetensors(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({key: value.contiguous() for key, value in state_dict.items()}, str(path))
    return path


def _perturbed(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = {key: value.clone() for key, value in state_dict.items()}
    changed["visual.attnpool.c_proj.bias"] += 0.01
    return changed


def test_embedded_config_is_registered_and_small(tiny: Backbone) -> None:
    assert "tiny-digits" in backbone_names()
    assert backbone_names() == open_clip.list_models()
    n_params = sum(p.numel() for p in tiny.model.parameters())
    assert 2 * n_params < 18e6, "fp16 checkpoint must stay under the 20 MB budget"
    assert (tiny.embed_dim, tiny.image_size, tiny.context_length) == (128, 32, 16)


def test_random_init_encodes_images_and_texts(tiny: Backbone, image_batch: torch.Tensor) -> None:
    assert image_batch.shape == (3, 3, 32, 32)
    image_features = tiny.encode_images(image_batch)
    text_features = tiny.encode_texts(CAPTIONS)
    assert image_features.shape == (3, tiny.embed_dim)
    assert text_features.shape == (len(CAPTIONS), tiny.embed_dim)
    assert not image_features.requires_grad and not text_features.requires_grad
    # Raw features: the contract is that callers normalise, so they must not arrive unit-norm.
    assert not torch.allclose(image_features.norm(dim=-1), torch.ones(3))
    assert tiny.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)


def test_model_is_frozen_and_in_eval_mode(tiny: Backbone) -> None:
    assert not tiny.model.training
    assert all(not p.requires_grad for p in tiny.model.parameters())
    assert tiny.device == torch.device("cpu")


def test_random_init_is_reproducible_and_leaves_global_rng_alone(tiny: Backbone) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    again = load_backbone("tiny-digits", pretrained=None)
    assert torch.rand(1) == expected_next
    assert again.identity == tiny.identity
    assert again.identity.startswith("tiny-digits@") and len(again.identity.split("@")[1]) == 16
    # "random" is how a command line asks for the same untrained weights
    assert load_backbone("tiny-digits", pretrained="random").identity == tiny.identity


def test_tokenizer_respects_context_length_16(tiny: Backbone) -> None:
    tokens = tiny.tokenizer(CAPTIONS + [" ".join(["seven"] * 40)])
    assert tokens.shape == (len(CAPTIONS) + 1, 16)
    assert open_clip.get_tokenizer("tiny-digits")(["a"]).shape == (1, 16)


@pytest.mark.parametrize("hflip", [False, True])
def test_train_transform_shapes(tiny: Backbone, hflip: bool) -> None:
    transform = tiny.train_transform(hflip)
    view = transform(Image.new("L", (48, 40), 100))
    assert view.shape == (3, 32, 32) and view.dtype == torch.float32
    flips = [step for step in transform.transforms if "Flip" in type(step).__name__]
    assert bool(flips) == hflip


@pytest.mark.parametrize("save", [_save_torch, _save_safetensors], ids=["pt", "safetensors"])
def test_local_checkpoint_round_trip(
    tiny: Backbone, image_batch: torch.Tensor, tmp_path: Path, save
) -> None:
    suffix = ".pt" if save is _save_torch else ".safetensors"
    state = tiny.model.state_dict()
    checkpoint = save(state, tmp_path / f"same{suffix}")
    # A copy, not a second save: identity hashes file bytes, and torch.save writes the file
    # name into its archive.
    twin = Path(shutil.copyfile(checkpoint, tmp_path / f"twin{suffix}"))
    other = save(_perturbed(state), tmp_path / f"other{suffix}")

    loaded = load_backbone("tiny-digits", pretrained=str(checkpoint))
    assert loaded.pretrained == str(checkpoint)
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert not loaded.model.training
    torch.testing.assert_close(loaded.encode_images(image_batch), tiny.encode_images(image_batch))
    torch.testing.assert_close(loaded.encode_texts(CAPTIONS), tiny.encode_texts(CAPTIONS))

    assert load_backbone("tiny-digits", pretrained=twin).identity == loaded.identity
    assert load_backbone("tiny-digits", pretrained=other).identity != loaded.identity


def test_fp16_safetensors_loads_into_fp32_model(
    tiny: Backbone, image_batch: torch.Tensor, tmp_path: Path
) -> None:
    half = {key: value.half() for key, value in tiny.model.state_dict().items()}
    loaded = load_backbone("tiny-digits", _save_safetensors(half, tmp_path / "half.safetensors"))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    torch.testing.assert_close(
        loaded.encode_images(image_batch), tiny.encode_images(image_batch), atol=0.05, rtol=0.05
    )


def test_default_loads_shipped_weights(
    tiny: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = _save_safetensors(tiny.model.state_dict(), tmp_path / "tiny-digits.safetensors")
    monkeypatch.setattr(backbones, "EMBEDDED_WEIGHTS", shipped)
    loaded = load_backbone()
    assert loaded.name == "tiny-digits" and loaded.pretrained == str(shipped)
    assert loaded.identity == load_backbone("tiny-digits", pretrained=shipped).identity
    assert loaded.describe()["identity"] == loaded.identity


def test_missing_shipped_weights_point_to_pretrain_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backbones, "EMBEDDED_WEIGHTS", tmp_path / "absent.safetensors")
    with pytest.raises(BackboneError, match="python -m croft_search.pretrain"):
        load_backbone("tiny-digits", pretrained="default")


def test_missing_checkpoint_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(BackboneError, match="not found") as caught:
        load_backbone("tiny-digits", pretrained=str(missing))
    assert str(missing) in str(caught.value)


def test_checkpoint_for_another_architecture_is_a_user_error(tmp_path: Path) -> None:
    garbage = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, garbage)
    with pytest.raises(BackboneError, match="cannot load checkpoint"):
        load_backbone("tiny-digits", pretrained=garbage)


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(BackboneError) as caught:
        load_backbone("tiny-digit", pretrained=None)
    message = str(caught.value)
    assert "tiny-digits" in message and "open_clip.list_models()" in message
    assert "\n" not in message


def _no_network(*args, **kwargs):
    raise ConnectionError("[Errno -2] Name or service not known")


def test_tag_offline_gives_pretrained_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", _no_network)
    monkeypatch.setattr(backbones, "_cached_hub_weights", lambda tag_cfg: None)
    with pytest.raises(BackboneError, match="--pretrained /path/to/") as caught:
        load_backbone("ViT-B-16", pretrained="openai")
    assert "cannot download ViT-B-16/openai weights (no network?)" in str(caught.value)
    # OpenAI weights need QuickGELU: the hint names the config that has it.
    assert "--backbone ViT-B-16-quickgelu" in str(caught.value)
    # "default" means the openai tag for real models, so it fails the same way.
    with pytest.raises(BackboneError, match="ViT-B-16/openai"):
        load_backbone("ViT-B/16", pretrained="default")


def test_default_for_model_without_openai_weights_asks_for_pretrained() -> None:
    without_openai = next(
        name
        for name in open_clip.list_models()
        if open_clip.list_pretrained_tags_by_model(name)
        and "openai" not in open_clip.list_pretrained_tags_by_model(name)
    )
    with pytest.raises(BackboneError, match="--pretrained"):
        load_backbone(without_openai, pretrained="default")


def test_unknown_tag_lists_known_tags() -> None:
    with pytest.raises(BackboneError, match="laion2b_s34b_b88k"):
        load_backbone("ViT-B-16", pretrained="no_such_tag")


@pytest.fixture
def fake_tag(tiny: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Registers tag `fake` for tiny-digits, hosted on the Hub, with its own preprocessing."""
    weights = _save_safetensors(tiny.model.state_dict(), tmp_path / "open_clip_model.safetensors")
    tag_cfg = {
        "hf_hub": "someone/tiny-digits-fake/",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
        "interpolation": "bilinear",
        "resize_mode": "squash",
        "quick_gelu": True,
    }
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny-digits", {"fake": tag_cfg})
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", _no_network)
    return weights


def test_tag_downloaded_once_loads_like_a_file(
    fake_tag: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        open_clip.pretrained, "download_pretrained", lambda cfg, cache_dir=None: str(fake_tag)
    )
    loaded = load_backbone("tiny-digits", pretrained="fake")
    assert loaded.pretrained == "fake"
    # Same file, but a different activation: the cache key must tell them apart.
    from_file = load_backbone("tiny-digits", pretrained=fake_tag).identity
    assert loaded.identity.split("@")[1] == from_file.split("@")[1]
    assert loaded.identity == "tiny-digits-quickgelu@" + from_file.split("@")[1]
    preprocessing = loaded.describe()["preprocessing"]
    assert preprocessing["mean"] == [0.5, 0.5, 0.5] and preprocessing["interpolation"] == "bilinear"
    activations = {type(module).__name__ for module in loaded.model.modules()}
    assert "QuickGELU" in activations, "a tag trained with QuickGELU must get it"


def test_tag_in_hub_cache_loads_without_network(
    fake_tag: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    def cached_only_safetensors(repo_id: str, filename: str, cache_dir: str | None = None):
        assert repo_id == "someone/tiny-digits-fake"
        return str(fake_tag) if filename == "open_clip_model.safetensors" else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cached_only_safetensors)
    assert load_backbone("tiny-digits", pretrained="fake").pretrained == "fake"


def test_file_hash_is_computed_once_per_file_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    real_hash = backbones._hash_file_bytes

    def counting_hash(path: Path) -> str:
        calls.append(path)
        return real_hash(path)

    monkeypatch.setattr(backbones, "_hash_file_bytes", counting_hash)
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"first version")
    first = backbones._file_sha256(weights)
    assert backbones._file_sha256(weights) == first and len(calls) == 1
    weights.write_bytes(b"second version, longer")
    assert backbones._file_sha256(weights) != first and len(calls) == 2


def test_describe_is_json_ready(tiny: Backbone) -> None:
    import json

    description = json.loads(json.dumps(tiny.describe()))
    assert description["name"] == "tiny-digits" and description["pretrained"] is None
    assert description["preprocessing"]["size"] == [32, 32]


# A search ships its backbone to every worker with the features; run in a fresh interpreter,
# where nothing has imported open_clip yet.
WORKER_SIDE = """
import pickle, sys
from trainables.registry import get_method, method_names
from croft_search.trial.runner import run_trial
import croft_search.search.ray_populations  # what a population worker imports
for name in method_names():
    get_method(name)
heavy = [m for m in ("open_clip", "torchvision", "sklearn") if m in sys.modules]
assert not heavy, f"imported by a worker's modules: {heavy}"
resources = pickle.loads(sys.stdin.buffer.read())
fixed = run_trial({"method": "croft", "n_ctx": 0, "epochs": 1, "target_domain": "sketch",
                   "views": 2}, resources)
assert "open_clip" not in sys.modules, "a trial on cached features unpacked the backbone"
prompts = run_trial({"method": "coop", "n_ctx": 4, "epochs": 1, "target_domain": "sketch",
                     "views": 2}, resources)
print(fixed["test_acc"], fixed["test_auroc"], prompts["test_acc"], prompts["test_auroc"])
"""


def test_a_shipped_backbone_unpacks_only_when_a_trial_runs_it(digits_root, tmp_path):
    import pickle
    import subprocess
    import sys

    from croft_search.trial.runner import TrialResources, run_trial

    resources = TrialResources.load("digits", ["sketch"], views=2, root=str(digits_root),
                                    cache_dir=str(tmp_path / "cache"))  # fmt: skip
    shipped = pickle.dumps(resources)
    done = subprocess.run([sys.executable, "-c", WORKER_SIDE], input=shipped,
                          capture_output=True, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    expected = []
    for config in ({"method": "croft", "n_ctx": 0}, {"method": "coop", "n_ctx": 4}):
        result = run_trial({**config, "epochs": 1, "target_domain": "sketch", "views": 2},
                           resources)  # fmt: skip
        expected += [result["test_acc"], result["test_auroc"]]
    assert [float(v) for v in done.stdout.split()] == pytest.approx(expected, abs=1e-6)


def test_a_packed_backbone_travels_again_packed_and_unpacks_whole(tiny):
    import pickle

    once = pickle.loads(pickle.dumps(tiny))
    twice = pickle.loads(pickle.dumps(once))
    assert "model" not in once.__dict__ and "model" not in twice.__dict__
    assert twice.logit_scale == tiny.logit_scale and twice.embed_dim == tiny.embed_dim
    texts = twice.encode_texts(CAPTIONS)
    torch.testing.assert_close(texts, tiny.encode_texts(CAPTIONS), rtol=0, atol=0)
    assert "_packed" not in twice.__dict__ and twice.tokenizer is twice.__dict__["tokenizer"]
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        twice.missing  # noqa: B018
