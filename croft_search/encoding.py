"""Image encoding for the feature cache: images are decoded and augmented (in worker processes
when asked), pushed through the frozen encoder in batches, and the finished part of a large
unit is kept on disk in shards so an interrupted encoding resumes where it stopped.

Jobs are the (image, view) pairs of a unit, image-major. Shard k holds jobs [k*S, (k+1)*S)
and no batch crosses a shard boundary, so which jobs share a batch depends only on the shard
and batch sizes: not on the worker count, nor on whether the run was resumed. Each augmented
view is drawn from its own seed (``_view_seed``), so the views do not depend on which process
draws them or in which order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from croft_search.backbones import Backbone
from croft_search.contract import DEFAULT_CROP_SCALE
from croft_search.data import Sample, load_image
from croft_search.errors import ConfigError, CroftError

# Image views per shard: large enough that a shard file (S x d float32, 8 MiB at d=512) and its
# write are small beside the encoding, small enough that an interruption loses little: S views
# are seconds of a GPU's work on ViT-B/16, a few minutes of a CPU's.
SHARD_SIZE = 4096
# float16 rather than bfloat16: OpenAI's CLIP was trained in float16 mixed precision, so its
# activations fit that range, and 3 more mantissa bits keep the features closer to float32.
CUDA_AUTOCAST_DTYPE = torch.float16
# Default decoding workers on CUDA (see default_workers).
MAX_DEFAULT_WORKERS = 4
_SHARD_SUFFIX = ".shards"
_DIGEST_CHARS = 16


def check_workers(value: int) -> int:
    """A decoding worker count, checked: 0 decodes in the encoding process."""
    if value < 0:
        raise ConfigError(f"--workers must be >= 0, got {value}")
    return value


def default_workers(device: str | torch.device) -> int:
    """Decoding workers when none are asked for. On CPU the encoder's forward pass is the
    bottleneck and already uses every core through intra-op threads, so worker processes
    would only take cores from it (and on the small embedded images their start-up is most of
    their cost): 0. On CUDA the CPU has nothing to do but decode, so decode on up to
    MAX_DEFAULT_WORKERS cores; the cap bounds the shared memory the prefetched batches hold
    (2 batches per worker), and --workers raises it where decoding starves the GPU."""
    if torch.device(device).type != "cuda":
        return 0
    return min(MAX_DEFAULT_WORKERS, usable_cores())


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class _ViewJobs(Dataset):
    """Job index -> (job index, preprocessed image, None), or (job index, None, the user error
    that stopped it): an error crosses the worker boundary as a value so it reaches the user
    as its one line, not wrapped in the worker's traceback."""

    def __init__(
        self,
        samples: Sequence[Sample],
        views: int,
        seed: int,
        transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        self.paths = [sample.path for sample in samples]
        self.views = views
        self.n_views = max(views, 1)
        self.seed = seed
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths) * self.n_views

    def __getitem__(self, job: int) -> tuple[int, torch.Tensor | None, CroftError | None]:
        image_index, view = divmod(job, self.n_views)
        path = self.paths[image_index]
        try:
            image = load_image(path)
        except CroftError as err:
            return job, None, err
        if not self.views:
            return job, self.transform(image), None
        # Seeded per (image, view) so the views depend on neither batch order nor worker; in a
        # forked generator, so the caller's random stream is left alone. Only the CPU
        # generator (the transforms draw from it): torch.manual_seed would also reseed CUDA's,
        # which fork_rng(devices=[]) does not restore.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_view_seed(self.seed, path, view))
            return job, self.transform(image), None


def _collate(
    items: Sequence[tuple[int, torch.Tensor | None, CroftError | None]],
) -> tuple[torch.Tensor, torch.Tensor | None, CroftError | None]:
    jobs = torch.as_tensor([job for job, _, _ in items], dtype=torch.long)
    for _, _, error in items:
        if error is not None:
            return jobs, None, error
    return jobs, torch.stack([image for _, image, _ in items]), None


class ImageEncoder:
    """Encodes the image views of cache units with one frozen backbone."""

    def __init__(
        self,
        backbone: Backbone,
        batch_size: int = 256,
        workers: int = 0,
        shard_size: int = SHARD_SIZE,
        mixed_precision: bool = True,
        progress: bool = True,
    ) -> None:
        if batch_size < 1 or shard_size < 1:
            raise ValueError(f"batch and shard sizes must be >= 1, got {batch_size}, {shard_size}")
        self.backbone = backbone
        self.batch_size = batch_size
        self.workers = check_workers(workers)
        self.shard_size = shard_size
        self.progress = progress
        self.autocast = mixed_precision and backbone.device.type == "cuda"
        self.encoded_images = 0  # image views pushed through the encoder by this instance

    @property
    def precision(self) -> str:
        """How the forward pass computes, for the cache metadata and the shard key."""
        if self.autocast:
            return f"autocast-{str(CUDA_AUTOCAST_DTYPE).removeprefix('torch.')}"
        return str(next(self.backbone.model.parameters()).dtype).removeprefix("torch.")

    # ------------------------------------------------------------------ shards
    def shard_folder(self, unit_path: Path, key: Mapping[str, str]) -> Path:
        """Where the finished shards of ``unit_path`` go while it is encoded. The folder name
        holds a digest of everything the features depend on (``key``, the unit's expected
        metadata) and of how the jobs are cut, so shards of other weights, images or
        precision are never taken for this unit's."""
        what = dict(key) | {"precision": self.precision, "shard_size": str(self.shard_size)}
        digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
        return unit_path.with_name(f".{unit_path.stem}.{digest[:_DIGEST_CHARS]}{_SHARD_SUFFIX}")

    @staticmethod
    def discard_shards(unit_path: Path) -> None:
        """Remove every shard folder of ``unit_path``, once the unit is written: this one's is
        no longer needed, and one of other content (images or weights changed since) could
        only resume an encoding that the rewritten unit has replaced."""
        prefix = f".{unit_path.stem}."
        for folder in unit_path.parent.glob(f"{prefix}*{_SHARD_SUFFIX}"):
            digest = folder.name[len(prefix) : -len(_SHARD_SUFFIX)]
            if len(digest) == _DIGEST_CHARS and all(c in "0123456789abcdef" for c in digest):
                shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------ encoding
    def encode(
        self,
        samples: Sequence[Sample],
        views: int,
        seed: int = 0,
        crop_scale: float = DEFAULT_CROP_SCALE,
        hflip: bool = False,
        label: str = "",
        shard_dir: Path | None = None,
    ) -> torch.Tensor:
        """Features [N, V, d] of ``samples``: the clean view (V = 1) for ``views`` = 0, else
        ``views`` augmented views. With ``shard_dir``, shards already there are read instead
        of encoded and each newly finished one is written there (the last one excepted: the
        caller writes the whole unit right after it)."""
        backbone = self.backbone
        transform = (
            backbone.eval_transform if views == 0 else backbone.train_transform(hflip, crop_scale)
        )
        n_views = max(views, 1)
        total = len(samples) * n_views
        out = torch.empty(total, backbone.embed_dim)
        shards = [
            range(start, min(start + self.shard_size, total))
            for start in range(0, total, self.shard_size)
        ]
        resumed = self._resume(shard_dir, shards[:-1], out) if shard_dir is not None else set()
        batches = [
            list(shard[start : start + self.batch_size])
            for index, shard in enumerate(shards)
            if index not in resumed
            for start in range(0, len(shard), self.batch_size)
        ]
        bar = tqdm(
            total=total,
            initial=sum(len(shards[index]) for index in resumed),
            desc=f"encoding {label}".strip(),
            unit="img",
            disable=not self.progress,
        )
        missing = {index: len(shard) for index, shard in enumerate(shards)}
        try:
            for jobs, images, error in self._loader(
                _ViewJobs(samples, views, seed, transform), batches
            ):
                if error is not None:
                    raise error
                out[jobs] = self.encode_batch(images)
                self.encoded_images += len(jobs)
                bar.update(len(jobs))
                index = int(jobs[0]) // self.shard_size
                missing[index] -= len(jobs)
                if shard_dir is not None and missing[index] == 0 and index < len(shards) - 1:
                    shard = shards[index]
                    self._write_shard(shard_dir, index, out[shard.start : shard.stop])
        finally:
            bar.close()
        return out.view(len(samples), n_views, backbone.embed_dim)

    def _resume(self, shard_dir: Path, shards: Sequence[range], out: torch.Tensor) -> set[int]:
        """Copy the finished shards found in ``shard_dir`` into ``out``; their indices."""
        resumed = set()
        for index, shard in enumerate(shards):
            stored = self._read_shard(shard_dir / f"{index:06d}.npy", len(shard))
            if stored is not None:
                out[shard.start : shard.stop] = stored
                resumed.add(index)
        return resumed

    def _loader(self, jobs: _ViewJobs, batches: list[list[int]]) -> list | DataLoader:
        if not batches:
            return []
        return DataLoader(
            jobs,
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=_collate,
            # Page-locked host memory makes the copy to the GPU asynchronous; on CPU it is
            # only an extra copy.
            pin_memory=self.backbone.device.type == "cuda",
            # Its own generator: the loader draws the workers' base seed from it, which would
            # otherwise advance the caller's global random stream (the views are seeded per
            # job, so that seed changes nothing here).
            generator=torch.Generator().manual_seed(0),
        )

    def encode_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 features on the CPU of a batch of preprocessed images, computed on the
        backbone's device (in autocast on CUDA unless mixed precision is off)."""
        images = images.to(self.backbone.device, non_blocking=True)
        autocast = (
            torch.autocast("cuda", dtype=CUDA_AUTOCAST_DTYPE)
            if self.autocast
            else contextlib.nullcontext()
        )
        with autocast:
            return self.backbone.encode_images(images).float().cpu()

    def _read_shard(self, path: Path, rows: int) -> torch.Tensor | None:
        try:
            stored = np.load(path)
        except (OSError, ValueError):  # absent, or damaged outside our atomic writes
            return None
        if stored.dtype != np.float32 or stored.shape != (rows, self.backbone.embed_dim):
            return None
        return torch.from_numpy(stored)

    @staticmethod
    def _write_shard(shard_dir: Path, shard: int, features: torch.Tensor) -> None:
        shard_dir.mkdir(parents=True, exist_ok=True)
        path = shard_dir / f"{shard:06d}.npy"
        # Write-then-rename, as for units: a shard file that exists is a finished shard.
        tmp = shard_dir / f".{path.name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as handle:
            np.save(handle, features.numpy())
        os.replace(tmp, path)


def _view_seed(seed: int, path: Path, view: int) -> int:
    digest = hashlib.sha256(f"{seed}:{Path(path).name}:{Path(path).parent.name}:{view}".encode())
    return int.from_bytes(digest.digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
