"""The five non-prompt baselines (zsclip, linear_probe, plp, clip_adapter, tip_adapter_f) on
cached features of a few-shot digits training set, encoded by the shipped tiny-digits
backbone: every test checks a property of the method's equations, never zero-shot quality."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from croft_search.backbones import load_backbone
from croft_search.data import get_dataset_spec, load_domain_split, sample_few_shot
from croft_search.errors import ConfigError
from croft_search.features import CLEAN_VIEW, FeatureCache, augmented_view_kind
from croft_search.prompts import class_prompts
from croft_search.trial import loop
from trainables.base import MethodContext, TrainData
from trainables.linear_probe import UNSEEN_CLASS_LOGIT
from trainables.registry import get_method, method_names, resolve_hparams
from trainables.text import FrozenTextEncoder
from trainables.zsclip import PLP_TEMPLATES, ensemble_templates

SHOTS = 4
VIEWS = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny-digits")


@pytest.fixture(scope="module")
def train_data(backbone, digits_root: Path, tmp_path_factory) -> tuple[TrainData, tuple]:
    """SHOTS images per class and source domain (target "photo"): clean view and VIEWS
    augmented views from the feature cache; only these images are encoded."""
    split = load_domain_split("digits", digits_root, "photo")
    spec = get_dataset_spec("digits")
    chosen = sample_few_shot(split.train, SHOTS, seed=0)
    cache = FeatureCache(backbone, digits_root, tmp_path_factory.mktemp("cache"), progress=False)
    clean, views = [], []
    for domain in dict.fromkeys(s.domain for s in chosen):
        samples = [s for s in chosen if s.domain == domain]
        for kind, out in ((CLEAN_VIEW, clean), (augmented_view_kind(VIEWS, 0), views)):
            unit = cache.image_features("digits", domain, samples, kind)
            out.append(unit.select(samples, digits_root))
    ordered = [s for d in dict.fromkeys(s.domain for s in chosen) for s in chosen if s.domain == d]
    data = TrainData(
        views=torch.cat(views),
        clean=torch.cat(clean)[:, 0],
        labels=torch.as_tensor([s.label for s in ordered]),
        domains=torch.as_tensor([spec.domains.index(s.domain) for s in ordered]),
    )
    return data, split.classnames


def make_context(backbone, train: TrainData, classnames) -> MethodContext:
    template = get_dataset_spec("digits").prompt_template
    return MethodContext(
        classnames=tuple(classnames),
        template=template,
        make_text_encoder=lambda: FrozenTextEncoder(backbone),
        class_text=backbone.encode_texts(class_prompts(template, classnames)).float(),
        logit_scale=backbone.logit_scale,
        embed_dim=backbone.embed_dim,
        train=train,
        device=torch.device("cpu"),
    )


def build(name: str, backbone, train_data, train: TrainData | None = None, **overrides):
    """(method, data, hp) for ``name``, seeded as run_trial seeds it."""
    data, classnames = train_data
    data = train or data
    hp = resolve_hparams(name, overrides)
    torch.manual_seed(hp["seed"])
    method = get_method(name)(make_context(backbone, data, classnames), hp)
    return method, data, hp


def zero_shot(backbone, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return backbone.logit_scale * F.normalize(features, dim=-1) @ F.normalize(text, dim=-1).T


def by_hand_ensemble(backbone, classnames, templates) -> torch.Tensor:
    """Normalise each template's text features, average, renormalise (through the backbone's
    own encode_text, not the method's text encoder)."""
    parts = [
        F.normalize(backbone.encode_texts(class_prompts(t, classnames)).float(), dim=-1)
        for t in templates
    ]
    return F.normalize(torch.stack(parts).mean(0), dim=-1)


def test_the_five_baselines_are_registered_with_their_scores():
    expected = {
        "zsclip": "mcm",
        "linear_probe": "msp",
        "plp": "msp",
        "clip_adapter": "mcm",
        "tip_adapter_f": "energy",
    }
    assert set(expected) <= set(method_names())
    assert {name: get_method(name).default_score for name in expected} == expected


# ---------------------------------------------------------------------------- zsclip
def test_zsclip_logits_are_scaled_cosines_of_the_template(backbone, train_data):
    method, data, hp = build("zsclip", backbone, train_data)
    expected = zero_shot(backbone, data.clean, method.context.class_text)
    torch.testing.assert_close(method.logits(data.clean), expected, rtol=1e-5, atol=1e-5)
    assert method.trainable_parameters() == []
    assert loop.train(method, data, hp) == []
    with pytest.raises(ConfigError, match="epochs"):
        resolve_hparams("zsclip", {"epochs": 5})


def test_zsclip_ensemble_is_the_renormalised_mean_of_normalised_templates(train_data):
    # The untrained text tower: its template features differ in norm far more than the
    # trained one's, so skipping the per-template normalisation would show.
    backbone = load_backbone("tiny-digits", pretrained=None)
    method, data, _ = build("zsclip", backbone, train_data, ensemble=True)
    single, _, _ = build("zsclip", backbone, train_data)
    templates = ensemble_templates(method.context.template)
    # The digits template first, then the five PLP templates.
    assert templates == ("a photo of the number {}.", *PLP_TEMPLATES)
    assert ensemble_templates("a photo of a {}.") == PLP_TEMPLATES
    expected = by_hand_ensemble(backbone, method.context.classnames, templates)
    torch.testing.assert_close(method.text_weights, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.text_weights.norm(dim=-1), torch.ones(6))
    # A plain mean of unnormalised features is a different direction: the per-template
    # normalisation matters.
    raw_mean = torch.stack(
        [backbone.encode_texts(class_prompts(t, method.context.classnames)) for t in templates]
    ).mean(0)
    assert not torch.allclose(F.normalize(raw_mean, dim=-1), expected, atol=1e-4)
    assert (method.logits(data.clean) - single.logits(data.clean)).abs().max() > 1e-3


# ---------------------------------------------------------------------------- linear probe
def test_linear_probe_softmax_equals_sklearn_predict_proba(backbone, train_data):
    method, data, hp = build("linear_probe", backbone, train_data, C=0.5)
    assert loop.train(method, data, hp) == []  # fitted in setup(), no SGD
    reference = LogisticRegression(C=0.5, max_iter=1000)
    reference.fit(F.normalize(data.clean.double(), dim=-1).numpy(), data.labels.numpy())
    for features in (data.clean, data.views[:, 1]):
        probabilities = torch.softmax(method.logits(features).double(), dim=-1)
        expected = reference.predict_proba(F.normalize(features.double(), dim=-1).numpy())
        torch.testing.assert_close(probabilities, torch.from_numpy(expected), rtol=0, atol=1e-5)
    assert method.trainable_parameters() == []


def test_linear_probe_fits_the_training_set_and_can_use_views(backbone, train_data):
    data, _ = train_data
    losses, accuracies = [], []
    for c in (1e-3, 1.0, 1e3):
        method, _, hp = build("linear_probe", backbone, train_data, C=c, max_iter=5000)
        loop.train(method, data, hp)
        logits = method.logits(data.clean)
        losses.append(float(F.cross_entropy(logits, data.labels)))
        accuracies.append(float((logits.argmax(-1) == data.labels).float().mean()))
    # Weaker regularisation fits the training set better, and the weakly regularised probe
    # is far above chance (1/6).
    assert losses[0] > losses[1] > losses[2]
    assert losses[0] > 0.99 * torch.log(torch.tensor(6.0))  # C = 1e-3: nearly uniform
    assert accuracies[2] >= 0.6
    on_views, _, hp_views = build("linear_probe", backbone, train_data, use_views=True)
    loop.train(on_views, data, hp_views)
    reference = LogisticRegression(C=1.0, max_iter=1000)
    rows = F.normalize(data.views.double(), dim=-1).reshape(-1, data.views.shape[-1])
    reference.fit(rows.numpy(), data.labels.repeat_interleave(VIEWS).numpy())
    torch.testing.assert_close(
        on_views.weight, torch.from_numpy(reference.coef_).float(), rtol=0, atol=1e-6
    )


def test_linear_probe_handles_classes_missing_from_training(backbone, train_data):
    data, _ = train_data
    keep = (data.labels == 1) | (data.labels == 4)  # a binary fit among six classes
    subset = TrainData(data.views[keep], data.clean[keep], data.labels[keep], data.domains[keep])
    method, _, hp = build("linear_probe", backbone, train_data, train=subset)
    loop.train(method, subset, hp)
    logits = method.logits(data.clean)
    assert torch.all(logits[:, [0, 2, 3, 5]] == UNSEEN_CLASS_LOGIT)
    reference = LogisticRegression(C=1.0, max_iter=1000)
    reference.fit(F.normalize(subset.clean.double(), dim=-1).numpy(), subset.labels.numpy())
    probabilities = torch.softmax(logits.double(), dim=-1)[:, [1, 4]]
    expected = reference.predict_proba(F.normalize(data.clean.double(), dim=-1).numpy())
    torch.testing.assert_close(probabilities, torch.from_numpy(expected), rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides", [{"C": 1e4}, {"C": 1e-4}, {"C": 0.0}, {"epochs": 3}])
def test_linear_probe_rejects_values_out_of_range(overrides):
    with pytest.raises(ConfigError):
        resolve_hparams("linear_probe", overrides)


# ---------------------------------------------------------------------------- PLP
def test_plp_pseudo_labels_are_the_zero_shot_ensemble_argmax(backbone, train_data):
    method, data, _ = build("plp", backbone, train_data)
    method.setup()
    ensemble, _, _ = build("zsclip", backbone, train_data, ensemble=True)
    expected = ensemble.logits(data.clean).argmax(dim=-1)
    assert torch.equal(method.pseudo_labels, expected)
    index = torch.tensor([5, 0, 17])
    assert torch.equal(method.targets(torch.full((3,), 99), index), expected[index])


def test_plp_never_uses_ground_truth_labels(backbone, train_data):
    data, _ = train_data
    shuffled = dataclasses.replace(data, labels=data.labels[torch.randperm(len(data))])
    assert not torch.equal(shuffled.labels, data.labels)
    weights = []
    for train in (data, shuffled):
        method, _, hp = build("plp", backbone, train_data, train=train, epochs=5, batch_size=32)
        initial = method.probe.weight.detach().clone()
        history = loop.train(method, train, hp)
        assert len(history) == 5 and history[-1]["ce"] < history[0]["ce"]
        assert not torch.equal(method.probe.weight, initial)
        weights.append(method.probe.state_dict())
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


# ---------------------------------------------------------------------------- CLIP-Adapter
def test_clip_adapter_with_ratio_zero_is_zero_shot(backbone, train_data):
    method, data, hp = build("clip_adapter", backbone, train_data, ratio=0.0)
    expected = zero_shot(backbone, data.clean, method.context.class_text)
    torch.testing.assert_close(method.logits(data.clean), expected, rtol=1e-5, atol=1e-5)
    assert method.trainable_parameters() == []
    adapted, _, _ = build("clip_adapter", backbone, train_data, ratio=0.2)
    assert (adapted.logits(data.clean) - expected).abs().max() > 1e-3


def test_clip_adapter_trains_only_the_adapter(backbone, train_data):
    def checksum() -> str:
        digest = hashlib.sha256()
        for value in backbone.model.state_dict().values():
            digest.update(value.detach().cpu().numpy().tobytes())
        return digest.hexdigest()

    method, data, hp = build("clip_adapter", backbone, train_data, epochs=8, lr=0.05)
    before = checksum()
    initial = {k: v.clone() for k, v in method.state_dict().items()}
    assert {id(p) for p in method.trainable_parameters()} == {
        id(p) for p in method.adapter.parameters()
    }
    hidden = backbone.embed_dim // 4
    assert [tuple(p.shape) for p in method.adapter.parameters()] == [
        (hidden, backbone.embed_dim),
        (backbone.embed_dim, hidden),
    ]
    history = loop.train(method, data, hp)
    assert history[-1]["ce"] < history[0]["ce"]
    assert checksum() == before
    after = method.state_dict()
    assert set(after) == {"adapter.0.weight", "adapter.2.weight", "text_weights"}
    assert torch.equal(after["text_weights"], initial["text_weights"])
    assert not torch.equal(after["adapter.0.weight"], initial["adapter.0.weight"])
    x = method.adapted(data.clean)
    a = torch.relu(
        torch.relu(data.clean @ after["adapter.0.weight"].T) @ after["adapter.2.weight"].T
    )
    torch.testing.assert_close(x, 0.2 * a + 0.8 * data.clean)
    torch.testing.assert_close(method.embed(data.clean), F.normalize(x, dim=-1))


# ---------------------------------------------------------------------------- Tip-Adapter-F
def test_tip_adapter_cache_is_built_from_the_views(backbone, train_data):
    method, data, _ = build("tip_adapter_f", backbone, train_data, alpha=2.0, beta=5.5)
    keys = F.normalize(data.views.mean(dim=1), dim=-1)
    torch.testing.assert_close(method.keys.detach(), keys)
    assert torch.equal(method.values, F.one_hot(data.labels, 6).float())
    image = F.normalize(data.clean, dim=-1)
    cache = torch.exp(-5.5 * (1 - image @ keys.T)) @ method.values
    expected = zero_shot(backbone, data.clean, method.context.class_text) + 2.0 * cache
    torch.testing.assert_close(method.logits(data.clean), expected, rtol=1e-5, atol=1e-4)


def test_tip_adapter_without_cache_weight_is_zero_shot(backbone, train_data):
    method, data, _ = build("tip_adapter_f", backbone, train_data, alpha=0.0)
    expected = zero_shot(backbone, data.clean, method.context.class_text)
    torch.testing.assert_close(method.logits(data.clean), expected, rtol=1e-5, atol=1e-5)
    assert method.trainable_parameters() == []


def test_tip_adapter_f_fine_tunes_only_the_keys(backbone, train_data):
    method, data, hp = build("tip_adapter_f", backbone, train_data, epochs=5, batch_size=32)
    keys = method.keys.detach().clone()
    values, text = method.values.clone(), method.text_weights.clone()
    assert method.trainable_parameters() == [method.keys]
    history = loop.train(method, data, hp)
    assert len(history) == 5
    assert (method.keys - keys).abs().max() > 1e-4
    assert torch.equal(method.values, values) and torch.equal(method.text_weights, text)


@pytest.mark.parametrize(
    "overrides", [{"beta": 0.05}, {"beta": 101.0}, {"alpha": -0.5}, {"alpha": 150.0}]
)
def test_tip_adapter_rejects_values_out_of_range(overrides):
    with pytest.raises(ConfigError):
        resolve_hparams("tip_adapter_f", overrides)
