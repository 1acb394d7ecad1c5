"""The opened-up text encoder, the prompt learner, and the prompt-learning baselines CoOp,
CoCoOp and DPLCLIP trained through the shared loop on digits features.

The tiny-digits backbone is the shipped one; every assertion is about exact equivalences
and method-specific structure, never about zero-shot quality."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from open_clip.transformer import TextTransformer

from croft_search.backbones import load_backbone
from croft_search.data import get_dataset_spec, load_domain_split, load_image, sample_few_shot
from croft_search.errors import ConfigError
from croft_search.trial.loop import train
from trainables.base import MethodContext, TrainData
from trainables.registry import get_method, resolve_hparams
from trainables.text import FrozenTextEncoder, PromptLearner

TEMPLATE_WORDS = "a photo of the number"
TEMPLATE_TOKENS = 5  # "a photo of the number" in open_clip's CLIP tokenizer
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five")
# Beyond the embedded model: a CLIP whose text tower is wider and deeper, with context
# length 77, and a CustomTextCLIP (text tower in model.text) with a bidirectional (no causal
# mask) text transformer.
OTHER_BACKBONES = ("ViT-S-32-alt", "MobileCLIP-S1")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny-digits")


@pytest.fixture(scope="module", params=("tiny-digits", *OTHER_BACKBONES))
def any_backbone(request, tiny):
    return tiny if request.param == "tiny-digits" else load_backbone(request.param, None)


def template_prompts(words: str, names=DIGIT_NAMES) -> list[str]:
    return [f"{words} {name}." for name in names]


# ------------------------------------------------------------------ FrozenTextEncoder
def test_encoder_reproduces_open_clip_encode_text(any_backbone):
    encoder = FrozenTextEncoder(any_backbone)
    texts = ["a photo of the number zero.", "a sketch of the number seven", "x"]
    expected = any_backbone.encode_texts(texts)
    with torch.no_grad():
        got = encoder.encode(texts)
    assert got.shape == (len(texts), any_backbone.embed_dim)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # Held outside the module tree: no backbone weight is a parameter of the encoder.
    assert list(encoder.parameters()) == [] and encoder.state_dict() == {}


def _fake_backbone(tower: torch.nn.Module, tokenizer) -> SimpleNamespace:
    return SimpleNamespace(
        name="fake", text_parts=lambda: (tower, tokenizer), context_length=16, embed_dim=32
    )


def test_encoder_applies_a_padding_mask_like_open_clip(tiny):
    """open_clip's bidirectional TextTransformer can mask padding; the encoder must too."""
    torch.manual_seed(0)
    tower = TextTransformer(
        context_length=16, width=32, heads=2, layers=2, output_dim=32,
        no_causal_mask=True, use_pad_mask=True, pad_id=0,
    ).eval()  # fmt: skip
    encoder = FrozenTextEncoder(_fake_backbone(tower, tiny.tokenizer))
    assert encoder.pad_mask
    # More texts x heads than context positions: the padding mask is [texts * heads, L, L].
    texts = ["a photo of the number two.", "one"] * 5
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode(texts), tower(tiny.tokenizer(texts)))


@pytest.mark.parametrize("pool_type", ["first", "last", "argmax", "eos"])
@pytest.mark.parametrize("causal", [True, False])
def test_encoder_reads_every_pool_type_like_open_clip(tiny, pool_type, causal):
    """The encoder reads each text where open_clip's tower pools it, causal or not."""
    torch.manual_seed(1)
    tower = TextTransformer(
        context_length=16, width=32, heads=2, layers=3, output_dim=32,
        no_causal_mask=not causal, pool_type=pool_type, eos_id=int(tiny.tokenizer(["x"])[0, 2]),
    ).eval()  # fmt: skip
    encoder = FrozenTextEncoder(_fake_backbone(tower, tiny.tokenizer))
    texts = ["a photo of the number two.", "one", "x", "a sketch of a seven"]
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode(texts), tower(tiny.tokenizer(texts)),
                                   rtol=0, atol=1e-5)  # fmt: skip


def test_encoder_refuses_a_text_tower_with_a_class_token(tiny):
    tower = TextTransformer(context_length=16, width=32, heads=2, layers=1, embed_cls=True)
    with pytest.raises(ConfigError, match="prompt learning cannot open"):
        FrozenTextEncoder(_fake_backbone(tower, tiny.tokenizer))


# ------------------------------------------------------------------ PromptLearner
def test_prompt_learner_starts_as_the_hand_written_template(any_backbone):
    encoder = FrozenTextEncoder(any_backbone)
    learner = PromptLearner(encoder, DIGIT_NAMES, TEMPLATE_TOKENS, init_words=TEMPLATE_WORDS)
    expected = any_backbone.encode_texts(template_prompts(TEMPLATE_WORDS))
    torch.testing.assert_close(learner(), expected, rtol=0, atol=1e-5)
    assert learner.context.shape == (TEMPLATE_TOKENS, encoder.width)
    assert learner.context.requires_grad


@pytest.mark.parametrize(
    ("position", "layout"),
    [("front", "{name} a photo of the number."), ("middle", "a photo {name} of the number.")],
)
def test_class_positions_place_the_name_where_asked(tiny, position, layout):
    encoder = FrozenTextEncoder(tiny)
    learner = PromptLearner(
        encoder, DIGIT_NAMES, TEMPLATE_TOKENS, init_words=TEMPLATE_WORDS, class_position=position
    )
    with torch.no_grad():
        got = learner()
        end = PromptLearner(encoder, DIGIT_NAMES, TEMPLATE_TOKENS, init_words=TEMPLATE_WORDS)()
    # Equal to the plain text with the name moved (context initialised from the words) ...
    expected = tiny.encode_texts([layout.format(name=name) for name in DIGIT_NAMES])
    assert got.shape == (len(DIGIT_NAMES), tiny.embed_dim)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # ... hence different from the class-name-last prompts.
    assert (got - end).abs().max() > 1e-3


def test_class_position_handles_multi_token_names(tiny):
    """Class names of several tokens ("dining table") move as a whole."""
    encoder = FrozenTextEncoder(tiny)
    names = ("dog", "dining table", "guitar")
    learner = PromptLearner(encoder, names, 2, init_words="a photo", class_position="front")
    assert learner.name_lengths == [1, 2, 1]
    expected = tiny.encode_texts([f"{name} a photo." for name in names])
    with torch.no_grad():
        torch.testing.assert_close(learner(), expected, rtol=0, atol=1e-5)


def test_class_specific_contexts_are_one_per_class(tiny):
    encoder = FrozenTextEncoder(tiny)
    learner = PromptLearner(
        encoder, DIGIT_NAMES, TEMPLATE_TOKENS, init_words=TEMPLATE_WORDS, class_specific=True
    )
    assert learner.context.shape == (len(DIGIT_NAMES), TEMPLATE_TOKENS, encoder.width)
    with torch.no_grad():
        before = learner()
        torch.testing.assert_close(before, tiny.encode_texts(template_prompts(TEMPLATE_WORDS)))
        # Move the context of class "two" only (randomly: pre-LN towers ignore a constant).
        learner.context[2] += torch.randn(
            learner.context[2].shape, generator=torch.Generator().manual_seed(0)
        )
        after = learner()
    changed = (after - before).abs().amax(dim=1) > 1e-4
    assert changed.tolist() == [k == 2 for k in range(len(DIGIT_NAMES))]


def test_per_sample_bias_gives_per_sample_prompts(tiny):
    encoder = FrozenTextEncoder(tiny)
    learner = PromptLearner(encoder, DIGIT_NAMES, 4)
    bias = torch.randn(3, encoder.width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        shared = learner(bias)  # [B, w]: one shift for every slot
        per_slot = learner(bias[:, None].expand(-1, 4, -1))  # [B, M, w]: the same shift
        zero = learner(torch.zeros(2, encoder.width))
    assert shared.shape == (3, len(DIGIT_NAMES), tiny.embed_dim)
    torch.testing.assert_close(shared, per_slot)
    torch.testing.assert_close(zero, learner().expand(2, -1, -1).detach(), rtol=0, atol=1e-5)
    assert (shared[0] - shared[1]).abs().max() > 1e-3


# Forty names of one to three tokens: more prompts than one packed sequence of the tiny
# model holds, and prompts of different lengths side by side.
MANY_NAMES = tuple(
    f"{word} {extra}".strip()
    for word in ("cat", "dog", "fish", "bird", "horse", "guitar", "house", "person")
    for extra in ("", "red", "small green", "big", "old")
)


def _whole_sequences(learner: PromptLearner, bias: torch.Tensor | None) -> torch.Tensor:
    """What the encoder gives on every prompt's whole token sequence, padding included."""
    ctx = learner.context_vectors()
    if bias is None:
        return learner.encoder(learner.prompt_embeddings(ctx), learner.tokens)
    embeddings = learner.prompt_embeddings(ctx + bias[:, None, None])
    features = learner.encoder(embeddings.flatten(0, 1), learner.tokens.repeat(len(bias), 1))
    return features.view(len(bias), learner.n_classes, -1)


@pytest.mark.parametrize("names", [DIGIT_NAMES, MANY_NAMES], ids=["6 classes", "40 classes"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["shared", "per-image"])
@pytest.mark.parametrize("backbone_name", ["tiny-digits", "ViT-S-32-alt"])
def test_prompts_sharing_their_start_equal_the_whole_sequences(
    backbone_name, with_bias, names, tiny
):
    """A causal encoder computes the shared start (start token + context) once and skips
    the padding; features and the context's gradient are those of the whole sequences."""
    backbone = tiny if backbone_name == "tiny-digits" else load_backbone(backbone_name, None)
    encoder = FrozenTextEncoder(backbone)
    learner = PromptLearner(encoder, names, 4, seed=3)
    generator = torch.Generator().manual_seed(1)
    bias = torch.randn(3, encoder.width, generator=generator) if with_bias else None
    got, expected = learner(bias), _whole_sequences(learner, bias)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    weights = torch.randn(expected.shape, generator=generator)
    (grad,) = torch.autograd.grad((got * weights).sum(), learner.context)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), learner.context)
    # float32 rounding of a sum over every prompt's gradient, relative to the largest entry
    scale = float(expected_grad.abs().max())
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6 * scale)


def test_prompts_sharing_their_start_cost_a_fraction_of_the_whole_sequences(tiny):
    """On a 77-token CLIP, 16 context tokens and short class names, the shared start and
    the skipped padding leave under a fifth of the arithmetic."""
    from torch.utils.flop_counter import FlopCounterMode

    encoder = FrozenTextEncoder(load_backbone("ViT-S-32-alt", None))
    learner = PromptLearner(encoder, DIGIT_NAMES, 16)
    with torch.no_grad(), FlopCounterMode(display=False) as shared:
        learner()
    with torch.no_grad(), FlopCounterMode(display=False) as whole:
        _whole_sequences(learner, None)
    assert shared.get_total_flops() < whole.get_total_flops() / 5


def test_context_that_does_not_fit_is_a_config_error(tiny):
    encoder = FrozenTextEncoder(tiny)
    # tiny-digits: 16 tokens = start + context + name + "." + end, so at most 12 slots.
    assert PromptLearner(encoder, DIGIT_NAMES, 12)().shape == (6, tiny.embed_dim)
    with pytest.raises(ConfigError, match=r"context length is 16; use n_ctx <= 12"):
        PromptLearner(encoder, DIGIT_NAMES, 13)
    with pytest.raises(ConfigError, match=r"use n_ctx <= 10"):
        PromptLearner(encoder, ("zero", "dining table chair"), 13)
    with pytest.raises(ConfigError, match="are 4 tokens but n_ctx is 5"):
        PromptLearner(encoder, DIGIT_NAMES, 5, init_words="a photo of a")
    with pytest.raises(ConfigError, match="class_position"):
        PromptLearner(encoder, DIGIT_NAMES, 4, class_position="left")


# ------------------------------------------------------------------ the methods
@pytest.fixture(scope="module")
def digits_train(digits_root, tiny) -> tuple[TrainData, tuple[str, ...], list[str]]:
    """1 shot x 6 classes x 3 source domains of the sketch split, 2 augmented views and the
    clean view, encoded directly (the feature cache would encode the whole benchmark)."""
    spec = get_dataset_spec("digits")
    split = load_domain_split("digits", digits_root, "sketch")
    samples = sample_few_shot(split.train, 1, seed=0)
    images = [load_image(s.path) for s in samples]
    torch.manual_seed(0)
    augment = tiny.train_transform(hflip=False)
    views = torch.stack(
        [tiny.encode_images(torch.stack([augment(im) for im in images])) for _ in range(2)], 1
    )
    clean = tiny.encode_images(torch.stack([tiny.eval_transform(im) for im in images]))
    data = TrainData(
        views=views,
        clean=clean,
        labels=torch.as_tensor([s.label for s in samples]),
        domains=torch.as_tensor([spec.domains.index(s.domain) for s in samples]),
    )
    return data, split.classnames, [spec.prompt_template.format(c) for c in split.classnames]


def build(name: str, tiny, digits_train, **overrides):
    data, classnames, prompts = digits_train
    hp = resolve_hparams(name, overrides)
    context = MethodContext(
        classnames=classnames,
        template="a photo of the number {}.",
        make_text_encoder=lambda: FrozenTextEncoder(tiny),
        class_text=tiny.encode_texts(prompts),
        # OpenAI's temperature rather than the tiny model's 15: at 15 the loss is bounded
        # well away from zero, so a few epochs could not visibly reduce it.
        logit_scale=100.0,
        embed_dim=tiny.embed_dim,
        train=data,
        device=torch.device("cpu"),
    )
    torch.manual_seed(0)
    return get_method(name)(context, hp), hp


def _full_batch_loss(method, data: TrainData) -> float:
    method.eval()
    with torch.no_grad():
        logits = method.logits(data.clean, data.domains)
        return float(torch.nn.functional.cross_entropy(logits, data.labels))


OWN_PARAMETERS = {
    "coop": {"prompt_learner.context"},
    "cocoop": {
        "prompt_learner.context", "meta_net.0.weight", "meta_net.0.bias",
        "meta_net.2.weight", "meta_net.2.bias",
    },
    "dplclip": {f"mlp.{i}.{kind}" for i in (0, 3, 6) for kind in ("weight", "bias")},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OWN_PARAMETERS))
def test_method_trains_only_its_own_parameters(name, tiny, digits_train):
    data = digits_train[0]
    method, hp = build(
        name, tiny, digits_train, epochs=10, warmup_epochs=0, lr=0.0005, batch_size=8
    )
    backbone_before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    trainable = {k: v.detach().clone() for k, v in method.named_parameters() if v.requires_grad}
    assert set(trainable) == OWN_PARAMETERS[name]
    # No backbone weight was copied into the method.
    assert all(not key.startswith(("transformer", "visual")) for key in method.state_dict())
    loss_before = _full_batch_loss(method, data)

    history = train(method, data, hp)

    assert len(history) == 10
    assert _full_batch_loss(method, data) < 0.9 * loss_before
    for key, value in method.named_parameters():
        assert not torch.equal(value, trainable[key]), f"{key} did not train"
    after = tiny.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in backbone_before.items())
    assert not any(p.requires_grad for p in tiny.model.parameters())
    with torch.no_grad():
        logits = method.logits(data.clean[:5], data.domains[:5])
    assert logits.shape == (5, len(digits_train[1]))
    assert torch.isfinite(logits).all()


def test_methods_are_registered_with_their_defaults():
    for name in ("coop", "cocoop", "dplclip"):
        assert get_method(name).default_score == "mcm"
    assert get_method("dplclip").batch_dependent
    assert not get_method("coop").batch_dependent and not get_method("cocoop").batch_dependent
    assert resolve_hparams("coop")["n_ctx"] == 4 and resolve_hparams("coop")["lr"] == 0.002
    assert resolve_hparams("cocoop")["ctx_init"] == "a photo of a"


def test_coop_starting_from_the_template_is_zero_shot_clip(tiny, digits_train):
    method, _ = build("coop", tiny, digits_train, n_ctx=TEMPLATE_TOKENS, ctx_init=TEMPLATE_WORDS)
    data = digits_train[0]
    expected = method.clip_logits(data.clean, method.context.class_text)
    with torch.no_grad():
        torch.testing.assert_close(method.logits(data.clean), expected, rtol=0, atol=1e-4)


def test_cocoop_prompts_are_per_image_and_independent_of_the_batch(tiny, digits_train):
    method, _ = build("cocoop", tiny, digits_train)
    method.eval()
    features = digits_train[0].clean[:4]
    with torch.no_grad():
        bias = method.meta_net(torch.nn.functional.normalize(features, dim=-1))
        prompts = method.prompt_learner(bias)
        together = method.logits(features)
        alone = torch.cat([method.logits(features[i : i + 1]) for i in range(4)])
    assert prompts.shape == (4, len(DIGIT_NAMES), tiny.embed_dim)
    assert (prompts[0] - prompts[1]).abs().max() > 1e-5
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)


def test_dplclip_prompts_come_from_the_batch_domain_mean(tiny, digits_train):
    method, _ = build("dplclip", tiny, digits_train)
    method.eval()
    data = digits_train[0]
    first, second = (
        torch.nonzero(data.domains == d).flatten()[:4] for d in data.domains.unique()[:2]
    )
    features = torch.cat([data.clean[first], data.clean[second]])
    domains = torch.cat([data.domains[first], data.domains[second]])
    with torch.no_grad():
        mixed = method.logits(features, domains)
        text = method.domain_text(features, domains)
        # Batch-dependent: the same image scores differently among other images.
        alone = method.logits(features[:1])
        among_four = method.logits(features[:4])
        # Domains given: each domain's rows see only their own domain's mean.
        first_only = method.logits(features[:4], domains[:4])
        # No domains (test time): the whole batch is one domain.
        as_one = method.logits(features)
        as_one_explicit = method.logits(features, torch.zeros_like(domains))
    assert (alone[0] - among_four[0]).abs().max() > 1e-5
    assert (text[0] - text[4]).abs().max() > 1e-5  # different domains, different prompts
    torch.testing.assert_close(text[0], text[3])  # same domain, same prompts
    torch.testing.assert_close(mixed[:4], first_only, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(as_one, as_one_explicit)
    assert (as_one[:4] - mixed[:4]).abs().max() > 1e-5


def test_dplclip_reference_order_and_cross_domain_logits(tiny, digits_train):
    # The reference (trainers/DPLCLIP.py): MLP on every raw image feature, the mean of the
    # outputs per domain, and in training every image against all G domains' prompts.
    given = {"domain_context": "mlp_then_mean", "cross_domain_logits": True}
    method, _ = build("dplclip", tiny, digits_train, **given)
    data = digits_train[0]
    first, second = (
        torch.nonzero(data.domains == d).flatten()[:3] for d in data.domains.unique()[:2]
    )
    features = torch.cat([data.clean[first], data.clean[second]])
    domains = torch.cat([data.domains[first], data.domains[second]])
    method.eval()  # dropout off, so the MLP is a function
    with torch.no_grad():
        contexts = [method.mlp(features[rows]).mean(0) for rows in (slice(0, 3), slice(3, 6))]
        shape = (method.n_ctx, method.width)
        texts = [method.prompt_learner(c.view(1, *shape))[0] for c in contexts]  # [K, d] each
        image = torch.nn.functional.normalize(features, dim=-1)
        every = torch.nn.functional.normalize(torch.cat(texts), dim=-1)  # [2K, d]
        expected_train = method.logit_scale * image @ every.T
        own = torch.stack([texts[0]] * 3 + [texts[1]] * 3)
        expected_eval = method.logit_scale * torch.einsum(
            "bd,bkd->bk", image, torch.nn.functional.normalize(own, dim=-1)
        )
        evaluated = method.logits(features, domains)
        method.train()
        method.mlp.eval()  # keep dropout off; the training path is what differs
        trained = method.logits(features, domains)
    torch.testing.assert_close(evaluated, expected_eval, rtol=1e-5, atol=1e-4)
    assert trained.shape == (6, 2 * len(DIGIT_NAMES))
    torch.testing.assert_close(trained, expected_train, rtol=1e-5, atol=1e-4)
    # Ours maps the mean normalised feature instead: other prompts.
    ours, _ = build("dplclip", tiny, digits_train)
    ours.load_state_dict(method.state_dict())
    ours.eval()
    with torch.no_grad():
        assert (ours.logits(features, domains) - evaluated).abs().max() > 1e-4


def test_dplclip_context_is_generated_not_learned(tiny, digits_train):
    method, _ = build("dplclip", tiny, digits_train, n_ctx=6)
    assert not method.prompt_learner.context.requires_grad
    assert method.prompt_learner.context.abs().max() == 0
    assert method.mlp[-1].out_features == 6 * FrozenTextEncoder(tiny).width


# ------------------------------------------------------------------ bad hyper-parameters
@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("coop", {"n_ctx": 0}, "below its minimum"),
        ("coop", {"n_ctx": 17}, "above its maximum"),
        ("coop", {"class_position": "left"}, "must be one of end, middle, front"),
        ("coop", {"class_specific": "sometimes"}, "must be of type bool"),
        ("cocoop", {"n_ctx": 2.5}, "must be of type int"),
        ("cocoop", {"meta_width": 8}, "unknown hyper-parameter"),
        ("dplclip", {"mlp_depth": 1}, "below its minimum"),
        ("dplclip", {"mlp_dropout": 1.0}, "above its maximum"),
        ("dplclip", {"batch_size": 1}, "below its minimum"),
    ],
)
def test_bad_hyper_parameters_are_config_errors(name, overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_hparams(name, overrides)


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("coop", {"n_ctx": 16}, "use n_ctx <= 12"),
        ("dplclip", {"n_ctx": 13}, "use n_ctx <= 12"),
        ("cocoop", {"n_ctx": 8}, "init words 'a photo of a' are 4 tokens but n_ctx is 8"),
        ("coop", {"n_ctx": 4, "ctx_init": TEMPLATE_WORDS}, "are 5 tokens but n_ctx is 4"),
    ],
)
def test_contexts_that_cannot_be_built_fail_at_construction(
    name, overrides, message, tiny, digits_train
):
    with pytest.raises(ConfigError, match=message):
        build(name, tiny, digits_train, **overrides)


def test_random_context_start_follows_the_trial_seed(tiny):
    # It was pinned to seed 0, so a method's seeds varied only the few-shot data.
    encoder = FrozenTextEncoder(tiny)
    names = DIGIT_NAMES[:3]
    starts = {s: PromptLearner(encoder, names, 4, seed=s).context.detach() for s in (0, 1)}
    assert not torch.allclose(starts[0], starts[1])
    assert torch.equal(PromptLearner(encoder, names, 4, seed=1).context.detach(), starts[1])
    assert float(starts[1].std()) == pytest.approx(0.02, rel=0.3)


def test_the_text_tower_follows_its_prompts_with_the_whole_backbone():
    """A method moved to a device does not move the tower it shares with the backbone; the
    encoder moves the backbone there on first use and records it, so that encoding images
    later sends them to the same device ("meta" stands in for CUDA)."""
    backbone = copy.deepcopy(load_backbone("tiny-digits", pretrained=None))
    encoder = FrozenTextEncoder(backbone)
    tokens = encoder.tokenize(["a photo of the number 1."])
    features = encoder(encoder.embed_tokens(tokens).to("meta"), tokens)
    assert features.device.type == "meta" and features.shape == (1, backbone.embed_dim)
    assert backbone.device == torch.device("meta")
    assert {p.device.type for p in backbone.model.parameters()} == {"meta"}
