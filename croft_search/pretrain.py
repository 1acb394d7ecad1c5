"""`python -m croft_search.pretrain`: contrastively pre-train the embedded `tiny-digits` CLIP
from scratch on captioned images of the digits pre-training corpus, save it as the fp16
checkpoint that ships with the package, and print its zero-shot report on the benchmark.

The run is deterministic for a seed on a given machine: one thread, seeded init, seeded
data order, augmentation and caption choice, and deterministic torch kernels.

What makes a from-scratch CLIP learn digits in minutes on a CPU (see README.md for the runs
that did not):
- a convolutional image tower (the ViT needed far more steps to leave chance level);
- a learning-rate warm-up: at full rate from step one, both towers collapse within 20 steps
  to one constant feature each (uniform logits are the quickest way down from the random
  start's loss), and the gradients left afterwards are too small to recover from;
- a caption curriculum: the first quarter of the run captions every image with its bare
  class name ("seven"), so the untrained text tower's ten outputs differ from the start;
  then templates naming class and style take over. With every template from the start the
  text features are dominated by the template words, not the digit, and neither tower
  gets a signal;
- balanced batches: every (digit, style) pair equally often in each batch.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import math
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.loss import ClipLoss
from PIL import Image
from safetensors.torch import save_file

from croft_search import backbones
from croft_search.config import data_root
from croft_search.contract import EMBEDDED_BACKBONE, EMBEDDED_DATASET
from croft_search.data.digits import pretrain_corpus
from croft_search.data.digits_layout import (
    DIGIT_NAMES,
    DOMAINS,
    PRETRAIN_IMAGES_PER_CLASS_PER_DOMAIN,
)
from croft_search.errors import ConfigError, OneLineArgumentParser, exit_on_user_error

# Results are only bit-identical for one thread count (reductions split differently), so the
# run pins it. One, not two: on a 2-core machine that is also running anything else, two
# OpenMP threads wait on each other and a step takes 5-10x longer than on one thread.
NUM_THREADS = 1
# A wider random crop than open_clip's default (0.9-1): the corpus is small, and digits keep
# their identity under moderate crops. Never flipped: a mirrored 2, 5 or 7 is not a digit.
CROP_SCALE = (0.7, 1.0)
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp on the learned temperature

# Several names per style so the text encoder learns the style as a concept, not one token.
STYLE_NAMES = {
    "photo": ("photo", "photograph"),
    "sketch": ("sketch", "pencil sketch"),
    "cartoon": ("cartoon", "cartoon drawing"),
    "painting": ("painting", "painting"),
}
# {word} is the class name ("seven"), {numeral} the digit ("7"), {style} a style name. Every
# template names the class as a word, which is how the zero-shot prompts name it; some add
# the numeral, some leave out the style so the class name alone carries the meaning.
CAPTION_TEMPLATES = (
    "a {style} of the number {word}",
    "a {style} of the digit {word}",
    "a {style} of a {word}",
    "a {style} of the number {word} ({numeral})",
    "the number {word} as a {style}",
    "the digit {word} in {style} style",
    "a {numeral}, the number {word}, in {style} style",
    "{word}, a {style}",
    "the number {word}",
    "the digit {word}, {numeral}",
    "an image of the number {word}",
    "{word}",
)
# The curriculum's first captions (see caption_variety): the bare class name.
ANCHOR_TEMPLATE = "{word}"


def caption(digit: int, domain: str, rng: random.Random, variety: float = 1.0) -> str:
    """A caption naming the digit (as a word, sometimes also as a numeral) and, most of the
    time, the style of the image. With probability `variety` the template is drawn from all
    of CAPTION_TEMPLATES, otherwise it is ANCHOR_TEMPLATE."""
    template = rng.choice(CAPTION_TEMPLATES) if rng.random() < variety else ANCHOR_TEMPLATE
    text = template.format(
        word=DIGIT_NAMES[digit], numeral=str(digit), style=rng.choice(STYLE_NAMES[domain])
    )
    text = re.sub(r"\ba (8|eight)\b", r"an \1", text)
    return text + "." if rng.random() < 0.5 else text


def caption_variety(step: int, steps: int) -> float:
    """Share of captions drawn from all templates at `step`: none for the first 25% of the
    run (the encoders learn digits from the bare class names), then rising linearly to all
    of them at 50%, so the second half trains on the full variety."""
    return min(1.0, max(0.0, (step / steps - 0.25) / 0.25))


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings of one pre-training run."""

    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 150
    weight_decay: float = 0.1
    log_every: int = 50


def train_tiny_clip(
    corpus: Sequence[tuple[Image.Image, int, str]],
    recipe: Recipe,
    seed: int = 0,
    log: Callable[[dict[str, float]], None] | None = None,
) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Train a randomly initialised `tiny-digits` CLIP with open_clip's contrastive loss on
    (image, caption) pairs drawn from `corpus`; returns the model and its loss curve."""
    with _reproducible_torch(seed):
        return _train(corpus, recipe, seed, log)


def caption_tokenizer() -> Callable[[list[str]], torch.Tensor]:
    """The tokenizer the captions are trained with: the registered model's, whose context
    length (16) is the one every later user of the model gets from load_backbone."""
    return backbones.open_clip_models().get_tokenizer(EMBEDDED_BACKBONE)


@contextlib.contextmanager
def _reproducible_torch(seed: int) -> Iterator[None]:
    """Seeded, deterministic torch on a fixed number of threads, restored afterwards so
    callers (tests) keep their own settings and random state."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill_memory = torch.utils.deterministic.fill_uninitialized_memory
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            torch.set_num_threads(NUM_THREADS)
            torch.use_deterministic_algorithms(True)
            # Filling fresh tensors only guards against reading uninitialised memory, which
            # none of these kernels does, and costs about a tenth of every step.
            torch.utils.deterministic.fill_uninitialized_memory = False
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill_memory


def _train(
    corpus: Sequence[tuple[Image.Image, int, str]],
    recipe: Recipe,
    seed: int,
    log: Callable[[dict[str, float]], None] | None,
) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    model, train_transform, _ = backbones.open_clip_models().create_model_and_transforms(
        EMBEDDED_BACKBONE, pretrained=None, aug_cfg={"scale": CROP_SCALE}
    )
    tokenizer = caption_tokenizer()
    model.train()
    # Fused: three times faster on the 49408-row token table, which every step updates.
    optimizer = torch.optim.AdamW(
        _param_groups(model, recipe.weight_decay), lr=recipe.lr, fused=True
    )
    loss_fn = ClipLoss()
    caption_rng = random.Random(seed)
    order = torch.Generator().manual_seed(seed)
    pairs = [(digit, domain) for _, digit, domain in corpus]
    batches = _balanced_batches(pairs, recipe.batch_size, order)

    curve: list[dict[str, float]] = []
    losses_since_log: list[float] = []
    started = time.monotonic()
    for step in range(1, recipe.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, recipe)
        variety = caption_variety(step, recipe.steps)
        indices = next(batches)
        images = torch.stack([train_transform(corpus[i][0]) for i in indices])
        texts = tokenizer(
            [caption(corpus[i][1], corpus[i][2], caption_rng, variety) for i in indices]
        )
        image_features, text_features, logit_scale = model(images, texts)
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses_since_log.append(loss.item())
        if step % recipe.log_every == 0 or step == recipe.steps:
            row = {
                "step": step,
                # The mean since the last row: one batch is too noisy to read a trend.
                "loss": round(sum(losses_since_log) / len(losses_since_log), 5),
                "lr": round(_learning_rate(step, recipe), 8),
                "caption_variety": round(variety, 3),
                "logit_scale": round(model.logit_scale.exp().item(), 3),
                "seconds": round(time.monotonic() - started, 1),
            }
            curve.append(row)
            losses_since_log.clear()
            if log is not None:
                log(row)
    model.eval()
    return model, curve


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # As in CLIP: decay only weight matrices; biases, norms, embeddings and the temperature
    # are left alone (decaying the 49408-row token table would only shrink unused rows).
    decayed, kept = [], []
    for name, param in model.named_parameters():
        no_decay = param.ndim < 2 or "embedding" in name or "logit_scale" in name
        (kept if no_decay else decayed).append(param)
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": kept, "weight_decay": 0.0},
    ]


def _learning_rate(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step <= recipe.warmup_steps:
        return recipe.lr * step / max(recipe.warmup_steps, 1)
    progress = (step - recipe.warmup_steps) / max(recipe.steps - recipe.warmup_steps, 1)
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _balanced_batches(
    pairs: Sequence[tuple[int, str]], batch_size: int, generator: torch.Generator
) -> Iterator[list[int]]:
    """Endless batches of corpus indices in which every (digit, style) pair appears equally
    often. Each epoch shuffles every pair's images and deals them out in rounds of one image
    per pair (pairs in a fresh random order each round), cut into batches.

    Why: a random batch can hold several images of one pair and miss others; dealt this
    way, a batch of 128 holds every pair three or four times, so each caption has the same
    number of look-alike negatives and every pair contributes to every step.
    """
    members: dict[tuple[int, str], list[int]] = {}
    for index, pair in enumerate(pairs):
        members.setdefault(pair, []).append(index)
    groups = [torch.as_tensor(members[pair]) for pair in sorted(members)]
    while True:
        shuffled = [group[torch.randperm(len(group), generator=generator)] for group in groups]
        dealt: list[int] = []
        for round_index in range(max(len(group) for group in shuffled)):
            for group in torch.randperm(len(shuffled), generator=generator).tolist():
                if round_index < len(shuffled[group]):
                    dealt.append(int(shuffled[group][round_index]))
        for start in range(0, len(dealt) - batch_size + 1, batch_size):
            yield dealt[start : start + batch_size]


def save_fp16_safetensors(model: torch.nn.Module, path: Path) -> str:
    """Write the model's weights as fp16 safetensors, atomically; returns the file's SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().half().contiguous() for key, value in model.state_dict().items()}
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_loss_log(curve: Sequence[dict[str, float]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(curve[0]) if curve else ["step", "loss"])
        writer.writeheader()
        writer.writerows(curve)


def print_zero_shot_report(weights: Path) -> None:
    """The zero-shot table of `weights` on the digits benchmark, from a throwaway cache."""
    from croft_search.backbones import load_backbone
    from croft_search.features import FeatureCache
    from croft_search.zeroshot import zero_shot_report

    backbone = load_backbone(EMBEDDED_BACKBONE, weights)
    with tempfile.TemporaryDirectory(prefix="croft-pretrain-cache-") as cache_dir:
        cache = FeatureCache(backbone, data_root(), cache_dir=Path(cache_dir), progress=False)
        report = zero_shot_report(cache, EMBEDDED_DATASET)
    print(f"zero-shot on {EMBEDDED_DATASET} (template 'a photo of the number {{}}.', MCM)")
    print(f"{'domain':<12}{'acc':>8}{'AUROC':>8}{'FPR95':>8}")
    rows = {**report["domains"], "mean": report["mean"]}
    for domain, row in rows.items():
        print(f"{domain:<12}{row['acc']:>8.3f}{row['auroc']:>8.3f}{row['fpr95']:>8.3f}")


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog="python -m croft_search.pretrain", description=__doc__)
    defaults = Recipe()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=backbones.EMBEDDED_WEIGHTS)
    parser.add_argument("--log", type=Path, default=None, help="loss CSV (default: next to --out)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument(
        "--per-class-per-domain", type=int, default=PRETRAIN_IMAGES_PER_CLASS_PER_DOMAIN
    )
    parser.add_argument("--log-every", type=int, default=defaults.log_every, help="steps")
    parser.add_argument("--no-eval", action="store_true", help="skip the zero-shot report")
    return parser


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("steps", "per_class_per_domain", "log_every"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.batch_size < 2:
        raise ConfigError("--batch-size must be at least 2: the contrastive loss needs negatives")
    if args.lr <= 0 or args.warmup_steps < 0:
        raise ConfigError("--lr must be positive and --warmup-steps not negative")
    corpus_size = 10 * len(DOMAINS) * args.per_class_per_domain
    if args.batch_size > corpus_size:
        raise ConfigError(
            f"--batch-size {args.batch_size} exceeds the corpus ({corpus_size} images); "
            f"lower it or raise --per-class-per-domain"
        )
    if args.out.suffix != ".safetensors":
        raise ConfigError(f"--out must name a .safetensors file, not {args.out}")
    log_path = args.log or args.out.with_name(args.out.name.replace(".safetensors", ".loss.csv"))

    recipe = Recipe(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=min(args.warmup_steps, args.steps),
        log_every=args.log_every,
    )
    started = time.monotonic()
    corpus = pretrain_corpus(args.seed, args.per_class_per_domain)
    print(f"corpus: {len(corpus)} images in {time.monotonic() - started:.0f} s", flush=True)

    def log(row: dict[str, float]) -> None:
        print("  ".join(f"{key} {value}" for key, value in row.items()), flush=True)

    model, curve = train_tiny_clip(corpus, recipe, args.seed, log)
    write_loss_log(curve, log_path)
    sha256 = save_fp16_safetensors(model, args.out)
    minutes = (time.monotonic() - started) / 60
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) in {minutes:.1f} min")
    print(f"SHA-256: {sha256}")
    print(f"loss log: {log_path}")
    if not args.no_eval:
        print_zero_shot_report(args.out)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    main()
