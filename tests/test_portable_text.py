"""A backbone pickled for a search's workers: its text tower and tokenizer travel in forms
that unpickle without open_clip (`croft_search.portable_text`) and compute what open_clip's
compute, bit for bit; a tower or tokenizer it does not mirror travels whole, as before."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import open_clip
import pytest
import torch
from torch import nn

from croft_search.backbones import load_backbone
from croft_search.portable_text import PortableTokenizer, TextTower, portable_text
from trainables.text import FrozenTextEncoder, PromptLearner

NAMES = ("zero", "one", "two", "three", "four", "five")
TEXTS = ["a photo of the number zero.", "a sketch of the number seven", "x", "Ünïcödé, 42!"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class OpenClipTower:
    """A backbone whose text encoder uses open_clip's own tower and tokenizer (the
    reference the portable forms are held to)."""

    def __init__(self, backbone) -> None:  # noqa: ANN001
        self.backbone = backbone

    def text_parts(self):  # noqa: ANN201
        model = self.backbone.model
        return (model.text if hasattr(model, "text") else model), self.backbone.tokenizer

    def to(self, device):  # noqa: ANN001, ANN201
        return self.backbone.to(device)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.backbone, name)


def quickgelu_layerscale_clip() -> nn.Module:
    """A small open_clip CLIP whose text blocks have QuickGELU and LayerScale (OpenAI's
    activation, and the scale some towers add)."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg={"layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32},
        text_cfg={"context_length": 16, "width": 32, "heads": 2, "layers": 2, "ls_init_value": 0.5},
        quick_gelu=True,
    )
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    return copy.deepcopy(load_backbone("tiny-digits"))


def learned_features(encoder: FrozenTextEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of a prompt learner's prompts (4 context tokens) and the context's gradient."""
    learner = PromptLearner(encoder, NAMES, 4, seed=3)
    features = learner()
    weights = torch.randn(features.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((features * weights).sum(), learner.context)
    return features.detach(), grad


@pytest.mark.parametrize("name", ["tiny-digits", "ViT-S-32-alt"])
def test_the_portable_tower_computes_open_clips_features_and_gradients_bit_for_bit(name, tiny):
    backbone = tiny if name == "tiny-digits" else load_backbone(name, None)
    portable = FrozenTextEncoder(pickle.loads(pickle.dumps(backbone)))
    assert isinstance(portable.tower, TextTower)
    assert "model" not in vars(portable._backbone[0])  # the model itself stayed packed
    reference = FrozenTextEncoder(OpenClipTower(backbone))
    assert not isinstance(reference.tower, TextTower)
    assert torch.equal(portable.tokenize(TEXTS), reference.tokenize(TEXTS))
    with torch.no_grad():
        assert torch.equal(portable.encode(TEXTS), reference.encode(TEXTS))
    for got, expected in zip(learned_features(portable), learned_features(reference), strict=True):
        assert torch.equal(got, expected)


def test_quickgelu_and_layerscale_blocks_are_mirrored_exactly(tiny):
    model = quickgelu_layerscale_clip()
    tower, _ = portable_text(model, tiny.tokenizer)
    tokens = tiny.tokenizer(TEXTS)
    copied = pickle.loads(pickle.dumps(tower))
    x = model.token_embedding(tokens) + model.positional_embedding
    with torch.no_grad():
        expected = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        got = copied.ln_final(copied.transformer(x, attn_mask=copied.attn_mask))
    assert torch.equal(got, expected)
    assert copied.transformer.resblocks[0].ls_1.gamma.shape == (32,)


def test_a_worker_learns_prompts_without_importing_open_clip(tiny, tmp_path):
    """In a fresh process, the unpickled backbone's text encoder and tokenizer work, and
    neither open_clip nor torchvision is imported."""
    (tmp_path / "backbone.pkl").write_bytes(pickle.dumps(tiny))
    script = f"""
import pickle, sys, torch
sys.path[:0] = {sys.path!r}
torch.set_num_threads(1)  # as this test's process: the same reduction order
backbone = pickle.loads(open({str(tmp_path / "backbone.pkl")!r}, "rb").read())
from trainables.text import FrozenTextEncoder, PromptLearner
learner = PromptLearner(FrozenTextEncoder(backbone), {list(NAMES)!r}, 4, seed=3)
features = learner()
weights = torch.randn(features.shape, generator=torch.Generator().manual_seed(1))
(grad,) = torch.autograd.grad((features * weights).sum(), learner.context)
torch.save((features.detach(), grad), {str(tmp_path / "out.pt")!r})
print(sorted(m for m in ("open_clip", "torchvision", "torch._dynamo") if m in sys.modules))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
    got = torch.load(tmp_path / "out.pt")
    expected = learned_features(FrozenTextEncoder(OpenClipTower(tiny)))
    for value, reference in zip(got, expected, strict=True):
        assert torch.equal(value, reference)


def test_the_pickled_backbone_holds_the_text_towers_tensors_once(tiny):
    model = tiny.model
    tensors = [*model.parameters(), *model.buffers()]
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    tower = FrozenTextEncoder(pickle.loads(pickle.dumps(tiny))).tower
    text_bytes = sum(t.numel() * t.element_size() for t in tower.parameters())
    assert text_bytes > model_bytes / 2  # the token embedding: twice would show
    assert len(pickle.dumps(tiny)) < 1.1 * model_bytes
    again = pickle.loads(pickle.dumps(tiny))
    # Unpacked, the model shares the portable tower's tensors, as in the driver.
    tower = FrozenTextEncoder(again).tower
    assert again.model.token_embedding.weight is tower.token_embedding.weight
    assert torch.equal(again.encode_texts(TEXTS), tiny.encode_texts(TEXTS))


def test_a_tower_or_tokenizer_it_does_not_mirror_travels_whole(tiny):
    model = copy.deepcopy(tiny.model)
    model.transformer.resblocks[1].mlp.gelu = nn.ReLU()
    assert portable_text(model, tiny.tokenizer) is None
    # MobileCLIP's text tower is bidirectional: read at end-of-text, but not causal.
    mobile = load_backbone("MobileCLIP-S1", None)
    assert portable_text(mobile.model, mobile.tokenizer) is None
    copied = pickle.loads(pickle.dumps(mobile))
    encoder = FrozenTextEncoder(copied)
    assert not isinstance(encoder.tower, TextTower)
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode(TEXTS), mobile.encode_texts(TEXTS),
                                   rtol=0, atol=1e-5)  # fmt: skip
    assert PortableTokenizer.of(lambda texts: torch.zeros(len(texts), 16)) is None


def test_the_portable_tokenizer_tokenizes_as_open_clips_and_pickles_small(tiny):
    portable = PortableTokenizer.of(tiny.tokenizer)
    assert portable is not None and portable.context_length == tiny.context_length
    copied = pickle.loads(pickle.dumps(portable))
    assert len(pickle.dumps(portable)) < 1000  # its arguments, not its vocabulary
    texts = [*TEXTS, *(f"a photo of the number {name}." for name in NAMES)]
    assert torch.equal(copied(texts), tiny.tokenizer(texts))
    assert torch.equal(copied(texts, context_length=40), tiny.tokenizer(texts, context_length=40))


def test_unpickled_tokenizers_of_one_process_build_their_vocabulary_once(tiny):
    # A worker unpickles the backbone for every trial; each copy must not rebuild the BPE.
    portable = PortableTokenizer.of(tiny.tokenizer)
    first, second = (pickle.loads(pickle.dumps(portable)) for _ in range(2))
    assert first.tokenizer is second.tokenizer
    longer = PortableTokenizer(portable.context_length + 8, portable.special_tokens,
                               portable.clean)  # fmt: skip
    assert longer.tokenizer is not first.tokenizer
    assert longer(TEXTS).shape == (len(TEXTS), portable.context_length + 8)
