"""Frozen open_clip backbones: a model name plus a pretrained tag, a local checkpoint, or the
embedded tiny model that ships with the package.

Every backbone, embedded or real, is built by ``open_clip.create_model_and_transforms`` so the
embedded default exercises exactly the code path a real checkpoint takes.

The embedded model ``tiny-digits`` (``model_configs/tiny-digits.json``) is a small CLIP for
32x32 RGB digit images and short captions ("a sketch of the number seven"):
- vision: open_clip's ModifiedResNet (CLIP's ResNet: 3-conv stem, anti-aliased strides,
  attention pooling), one bottleneck block per stage, width 24 (768 channels out). A ViT
  (patch 4, width 128, 4 layers) was tried first: from scratch on this corpus it needed
  several times more steps than a convolutional tower to leave chance level, more than the
  30-minute CPU budget allows;
- text: width 96, 4 layers, 4 heads, context length 16 (the captions are about 8 tokens);
- embed_dim 128; open_clip's default tokenizer, whose 49408-token vocabulary makes the token
  embedding most of the parameters, which is why the text width stays below 128;
- preprocessing: open_clip's defaults (OpenAI mean/std, bicubic). The model is trained from
  scratch, so any fixed normalisation works as long as training and evaluation share it, and
  the defaults keep the embedded model indistinguishable from a real one downstream.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import io
import os
import pickle
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from PIL import Image

from croft_search.config import model_dir
from croft_search.contract import DEFAULT_CROP_SCALE, EMBEDDED_BACKBONE, check_setting
from croft_search.errors import BackboneError
from croft_search.portable_text import portable_text, shared_tensors, tensor_lookup, text_tower

PACKAGE_DIR = Path(__file__).resolve().parent
EMBEDDED_CONFIG: Path = PACKAGE_DIR / "model_configs" / f"{EMBEDDED_BACKBONE}.json"
EMBEDDED_WEIGHTS: Path = PACKAGE_DIR / "weights" / f"{EMBEDDED_BACKBONE}.safetensors"

DEFAULT_PRETRAINED = "default"
# Explicit opt-in to untrained weights from the command line (where None cannot be written).
RANDOM_PRETRAINED = "random"
# The tag `pretrained="default"` resolves to for real models.
DEFAULT_REAL_TAG = "openai"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


def check_crop_scale(value: object) -> float:
    """A crop scale (the smallest area fraction of a training crop), checked."""
    return check_setting("crop_scale", value)


# Fixed so that random-init backbones (tests, smoke runs) have the same weights, and hence
# the same identity and cache key, in every process.
RANDOM_INIT_SEED = 0
IDENTITY_HEX_CHARS = 16


@functools.cache
def open_clip_models() -> ModuleType:
    """open_clip, with the embedded model's config registered. Imported on first use: with
    torchvision it takes seconds, which a search's worker spends only when it runs a
    backbone (a prompt learner's text encoder), never for trials on cached features."""
    import open_clip

    if EMBEDDED_BACKBONE not in open_clip.list_models():
        open_clip.add_model_config(EMBEDDED_CONFIG)
    return open_clip


def _convert_to_rgb(image: Image.Image) -> Image.Image:
    # Module-level (not a lambda) so transforms stay picklable for DataLoader/Ray workers.
    return image.convert("RGB")


@dataclass
class Backbone:
    """A frozen open_clip CLIP with its preprocessing and tokenizer."""

    name: str
    pretrained: str | None
    identity: str
    model: torch.nn.Module
    eval_transform: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    embed_dim: int
    image_size: int
    context_length: int
    device: torch.device
    logit_scale: float  # CLIP's learned temperature s = exp(logit_scale) (100 for OpenAI's)

    def to(self, device: torch.device | str) -> Backbone:
        """Moves the model to ``device``, in place, and records it (encoding sends its
        inputs there); a model still packed moves when it is unpacked."""
        self.device = torch.device(device)
        if "model" in self.__dict__:
            self.model.to(self.device)
        text = self.__dict__.get("_text")
        if text is not None:
            text[0].to(self.device)
        return self

    def text_parts(self) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
        """The text tower and the tokenizer, for prompt learners: in a search's worker, their
        portable forms where the backbone travelled with them (`croft_search.portable_text`:
        nothing of open_clip is imported), else the model's own."""
        text = self.__dict__.get("_text")
        if text is not None:
            return text
        return text_tower(self.model), self.tokenizer

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """open_clip's preprocessing settings for this model (size, mean, std, ...)."""
        return dict(self.model.visual.preprocess_cfg)

    def train_transform(
        self, hflip: bool, crop_scale: float = DEFAULT_CROP_SCALE
    ) -> Callable[[Image.Image], torch.Tensor]:
        """Augmented view: random resized crop of area fraction ``crop_scale``..1, optional
        horizontal flip, and the same normalisation as the evaluation transform. Flip is
        optional because it changes the meaning of some images (digits, text)."""
        from torchvision import transforms

        cfg = self.preprocess_cfg
        steps: list[Callable] = [
            _convert_to_rgb,
            transforms.RandomResizedCrop(
                cfg["size"],
                scale=(crop_scale, 1.0),
                interpolation=_interpolation_mode(cfg["interpolation"]),
            ),
        ]
        if hflip:
            steps.append(transforms.RandomHorizontalFlip())
        steps += [transforms.ToTensor(), transforms.Normalize(mean=cfg["mean"], std=cfg["std"])]
        return transforms.Compose(steps)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Raw (not normalised) image features [N, embed_dim] of preprocessed images."""
        # no_grad, not inference_mode: cached features feed trainable heads later, and
        # inference tensors cannot be saved for backward.
        with torch.no_grad():
            return self.model.encode_image(images.to(self.device, self._dtype()))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Raw (not normalised) text features [len(texts), embed_dim]."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        with torch.no_grad():
            return self.model.encode_text(tokens)

    def describe(self) -> dict[str, Any]:
        """Everything that determines the features, for cache metadata."""
        cfg = self.preprocess_cfg
        return {
            "name": self.name,
            "pretrained": self.pretrained,
            "identity": self.identity,
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
            "context_length": self.context_length,
            "open_clip_version": open_clip_models().__version__,
            "preprocessing": {
                "size": _jsonable(_height_width(cfg["size"])),
                "mean": _jsonable(cfg["mean"]),
                "std": _jsonable(cfg["std"]),
                "interpolation": cfg["interpolation"],
                "resize_mode": cfg["resize_mode"],
            },
        }

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # A backbone travels to a search's workers with the trials' features. Its model,
    # transform and tokenizer are open_clip's and torchvision's objects, which cannot be
    # unpickled without importing both (seconds per worker); they travel packed instead and
    # are unpacked when first used, so a worker whose trials never run the backbone (every
    # trial on cached features without learned prompts) never imports them. The text tower
    # and tokenizer also travel in portable forms where they have them (`text_parts`), so
    # a worker training prompt learners does not import them either; the packed model
    # refers to the tower's tensors rather than holding them twice.
    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any], bytes]]:
        light = {f.name: self.__dict__[f.name] for f in fields(self) if f.name not in _PACKED}
        if "_text" not in self.__dict__:
            unpacked = "_packed" not in self.__dict__
            self.__dict__["_text"] = portable_text(self.model, self.tokenizer) if unpacked else None
        text = self.__dict__["_text"]
        light["_text"] = text
        packed = self.__dict__.get("_packed")
        if packed is None:
            buffer = io.BytesIO()
            pickler = pickle.Pickler(buffer, protocol=5)
            shared = shared_tensors(text[0]) if text is not None else {}
            pickler.persistent_id = lambda obj: shared.get(id(obj))
            pickler.dump(tuple(self.__dict__[name] for name in _PACKED))
            packed = buffer.getvalue()
        return _unpickled_backbone, (light, packed)

    def __getattr__(self, name: str) -> Any:
        # Reached only for attributes not set: the packed ones, before their first use.
        packed = self.__dict__.get("_packed")
        if name not in _PACKED or packed is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        open_clip_models()  # the embedded config, for objects that look it up
        unpickler = pickle.Unpickler(io.BytesIO(packed))
        text = self.__dict__.get("_text")
        if text is not None:
            unpickler.persistent_load = tensor_lookup(text[0])
        self.__dict__.update(zip(_PACKED, unpickler.load(), strict=True))
        del self.__dict__["_packed"]
        self.__dict__["model"].to(self.device)
        return self.__dict__[name]


# The fields of a `Backbone` that need open_clip or torchvision to unpickle.
_PACKED = ("model", "eval_transform", "tokenizer")


def _unpickled_backbone(light: dict[str, Any], packed: bytes) -> Backbone:
    backbone = object.__new__(Backbone)
    backbone.__dict__.update(light, _packed=packed)
    return backbone


def backbone_names() -> list[str]:
    """Every model name open_clip knows, the embedded `tiny-digits` included."""
    return list(open_clip_models().list_models())


def load_backbone(
    name: str = EMBEDDED_BACKBONE,
    pretrained: str | os.PathLike | None = DEFAULT_PRETRAINED,
    device: str | torch.device = "cpu",
) -> Backbone:
    """Load a frozen open_clip model.

    `pretrained`: "default" (the shipped checkpoint for `tiny-digits`, the "openai" tag for
    real models that have one), a pretrained tag (downloaded into the model cache), a local
    checkpoint file (.pt/.pth/.bin/.safetensors), or None / "random" for a seeded random init
    (tests and smoke runs of the pipeline; such a model has no zero-shot ability).
    Raises BackboneError with a one-line explanation for every user-caused failure.
    """
    name = _check_model_name(name)
    target_device = _check_device(device)

    if pretrained is None or pretrained == RANDOM_PRETRAINED:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model, eval_transform = _create(name, None, target_device)
        identity = f"{name}@{_state_dict_sha256(model.state_dict())[:IDENTITY_HEX_CHARS]}"
        return _assemble(name, None, identity, model, eval_transform, target_device)

    pretrained = os.fspath(pretrained)
    if pretrained == DEFAULT_PRETRAINED:
        if name == EMBEDDED_BACKBONE:
            return _load_from_file(name, _embedded_weights_path(), target_device)
        pretrained = _default_tag(name)

    tag_cfg = open_clip_models().get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        return _load_from_tag(name, pretrained, tag_cfg, target_device)

    checkpoint = Path(pretrained).expanduser()
    if checkpoint.is_file():
        return _load_from_file(name, checkpoint, target_device)
    if checkpoint.exists():
        raise BackboneError(f"checkpoint path is not a file: {checkpoint}")
    if _looks_like_path(pretrained):
        raise BackboneError(f"checkpoint file not found: {checkpoint}")
    known_tags = open_clip_models().list_pretrained_tags_by_model(name)
    raise BackboneError(
        f"unknown pretrained tag {pretrained!r} for {name} and no such file; "
        f"tags open_clip knows for {name}: {', '.join(known_tags) or 'none'}; "
        f"or pass --pretrained /path/to/checkpoint"
    )


def _check_model_name(name: str) -> str:
    # open_clip accepts the old "ViT-B/16" spelling; keep one spelling in identities.
    normalised = name.replace("/", "-")
    known = open_clip_models().list_models()
    if normalised in known:
        return normalised
    close = difflib.get_close_matches(normalised, known, n=5, cutoff=0.5)
    hint = f"close names: {', '.join(close)}; " if close else ""
    raise BackboneError(
        f"unknown backbone {name!r}; {hint}all names: "
        f"python -c 'import open_clip; print(open_clip.list_models())'"
    )


def _check_device(device: str | torch.device) -> torch.device:
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise BackboneError(f"invalid device {device!r}: {err}") from err
    if target.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"device {device!r} requested but CUDA is not available")
    return target


def _embedded_weights_path() -> Path:
    # Read the module global at call time so tests (and users) can point it elsewhere.
    weights = EMBEDDED_WEIGHTS
    if not weights.is_file():
        raise BackboneError(
            f"the embedded {EMBEDDED_BACKBONE} weights are missing ({weights}): "
            f"create them with `python -m croft_search.pretrain`"
        )
    return weights


def _default_tag(name: str) -> str:
    tags = open_clip_models().list_pretrained_tags_by_model(name)
    if DEFAULT_REAL_TAG in tags:
        return DEFAULT_REAL_TAG
    raise BackboneError(
        f"{name} has no {DEFAULT_REAL_TAG!r} weights to use by default; pass --pretrained "
        f"with one of its tags ({', '.join(tags) or 'none known'}) or a checkpoint path"
    )


def _looks_like_path(value: str) -> bool:
    return (
        os.sep in value
        or "/" in value
        or value.startswith(("~", "."))
        or value.lower().endswith(CHECKPOINT_SUFFIXES)
    )


def _load_from_tag(name: str, tag: str, tag_cfg: dict[str, Any], device: torch.device) -> Backbone:
    # OpenAI-trained weights need QuickGELU, which plain configs such as ViT-B-16 lack; the
    # "-quickgelu" twin config builds the right network, and its name keeps these features
    # apart in the cache from a GELU model loaded from the same file by path.
    model_has_quick_gelu = bool(open_clip_models().get_model_config(name).get("quick_gelu", False))
    needs_quick_gelu = bool(tag_cfg.get("quick_gelu", False)) and not model_has_quick_gelu
    model_name = name
    if needs_quick_gelu and f"{name}-quickgelu" in open_clip_models().list_models():
        model_name, needs_quick_gelu = f"{name}-quickgelu", False

    # Download here rather than inside open_clip so that a network failure is told apart
    # from every other failure (open_clip turns both into the same RuntimeError), and so the
    # weights are fetched once and then loaded like any local checkpoint.
    weights_file = _cached_hub_weights(tag_cfg)
    try:
        if weights_file is None:
            weights_file = open_clip_models().pretrained.download_pretrained(
                tag_cfg, cache_dir=str(model_dir())
            )
    except Exception as err:  # every download failure means the same thing to the user
        backbone_hint = f" (with --backbone {model_name})" if model_name != name else ""
        raise BackboneError(
            f"cannot download {name}/{tag} weights (no network?): download them elsewhere "
            f"and pass --pretrained /path/to/open_clip_pytorch_model.bin{backbone_hint}"
        ) from err
    if not weights_file:
        raise BackboneError(f"open_clip has no download location for {name}/{tag}")
    # The tag's own preprocessing (e.g. SigLIP's mean/std) replaces open_clip's defaults.
    return _load_from_file(
        model_name,
        Path(weights_file),
        device,
        source=tag,
        preprocess_overrides=tag_cfg,
        force_quick_gelu=needs_quick_gelu,
    )


def _cached_hub_weights(tag_cfg: dict[str, Any]) -> str | None:
    """The Hugging Face cache copy of a tag's weights, if there is one.

    Offline, huggingface_hub retries its metadata request for about 45 s before falling back
    to the cache, so a machine without network that already holds the weights would wait on
    every load. Looks for the same files, in the same order, as open_clip's download
    (safetensors first). Tags hosted at plain URLs need no help: open_clip checks its own
    cache before touching the network."""
    hub_location = tag_cfg.get("hf_hub", "")
    if not hub_location:
        return None
    try:
        import huggingface_hub
    except ImportError:
        return None
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo_id, filename = os.path.split(hub_location)
    filename = filename or HF_WEIGHTS_NAME
    candidates = [filename]
    if filename == HF_WEIGHTS_NAME:
        candidates.insert(0, HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        candidates.insert(0, filename[:-4] + ".safetensors")
    for candidate in candidates:
        try:
            cached = huggingface_hub.try_to_load_from_cache(
                repo_id, candidate, cache_dir=str(model_dir())
            )
        except Exception:  # a malformed repo id: let the real download report it
            return None
        # Besides a path, the cache can answer None or a "known not to exist" marker.
        if isinstance(cached, str) and os.path.isfile(cached):
            return cached
    return None


def _load_from_file(
    name: str,
    checkpoint: Path,
    device: torch.device,
    source: str | None = None,
    preprocess_overrides: dict[str, Any] | None = None,
    force_quick_gelu: bool = False,
) -> Backbone:
    try:
        model, eval_transform = _create(
            name, str(checkpoint), device, preprocess_overrides, force_quick_gelu
        )
    except Exception as err:  # a bad checkpoint fails in torch, safetensors or open_clip
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        raise BackboneError(
            f"cannot load checkpoint {checkpoint} into {name} ({type(err).__name__}: {first_line})"
        ) from err
    # A forced activation changes the features, so it must change the cache key too.
    architecture = f"{name}-quickgelu" if force_quick_gelu else name
    identity = f"{architecture}@{_file_sha256(checkpoint)[:IDENTITY_HEX_CHARS]}"
    source = source or str(checkpoint.absolute())
    return _assemble(name, source, identity, model, eval_transform, device)


def _create(
    name: str,
    checkpoint: str | None,
    device: torch.device,
    preprocess_overrides: dict[str, Any] | None = None,
    quick_gelu: bool = False,
) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor]]:
    overrides = preprocess_overrides or {}
    model, _, eval_transform = open_clip_models().create_model_and_transforms(
        name,
        pretrained=checkpoint,
        device=device,
        force_quick_gelu=quick_gelu,
        image_mean=overrides.get("mean"),
        image_std=overrides.get("std"),
        image_interpolation=overrides.get("interpolation"),
        image_resize_mode=overrides.get("resize_mode"),
        cache_dir=str(model_dir()),
    )
    model.eval()
    model.requires_grad_(False)
    return model, eval_transform


def _assemble(
    name: str,
    pretrained: str | None,
    identity: str,
    model: torch.nn.Module,
    eval_transform: Callable[[Image.Image], torch.Tensor],
    device: torch.device,
) -> Backbone:
    try:
        tokenizer = open_clip_models().get_tokenizer(name, cache_dir=str(model_dir()))
    except Exception as err:  # HF-hosted tokenizers fail in many ways when offline
        raise BackboneError(
            f"cannot load the tokenizer of {name} (no network?): {type(err).__name__}"
        ) from err
    size = model.visual.preprocess_cfg["size"]
    image_size = int(size if isinstance(size, int) else size[0])
    return Backbone(
        name=name,
        pretrained=pretrained,
        identity=identity,
        model=model,
        eval_transform=eval_transform,
        tokenizer=tokenizer,
        embed_dim=int(open_clip_models().get_model_config(name)["embed_dim"]),
        image_size=image_size,
        context_length=int(tokenizer.context_length),
        device=device,
        logit_scale=float(model.logit_scale.detach().exp().reshape(-1)[0]),
    )


_FILE_HASHES: dict[tuple[str, int, int], str] = {}
_FILE_HASHES_LOCK = threading.Lock()
_HASH_CHUNK_BYTES = 8 * 1024 * 1024


def _file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) because real checkpoints
    are hundreds of MB and the same one is loaded many times in a process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _FILE_HASHES_LOCK:
        cached = _FILE_HASHES.get(key)
    if cached is not None:
        return cached
    digest = _hash_file_bytes(path)
    with _FILE_HASHES_LOCK:
        _FILE_HASHES[key] = digest
    return digest


def _hash_file_bytes(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()


def _state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Deterministic digest of a state dict: sorted keys, then each tensor's dtype, shape and
    raw bytes, so equal weights hash equal whatever the insertion order."""
    hasher = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        hasher.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def _interpolation_mode(name: str) -> Any:
    from torchvision import transforms

    return {
        "bicubic": transforms.InterpolationMode.BICUBIC,
        "bilinear": transforms.InterpolationMode.BILINEAR,
        "nearest": transforms.InterpolationMode.NEAREST,
    }.get(name, transforms.InterpolationMode.BICUBIC)


def _height_width(size: int | Sequence[int]) -> list[int]:
    # open_clip gives a square size as one int for some towers and as a pair for others.
    return [int(size), int(size)] if isinstance(size, int) else [int(v) for v in size]


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
