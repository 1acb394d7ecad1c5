"""A backbone's text tower and tokenizer in a form that unpickles without open_clip.

A search's workers receive the backbone pickled with the trials' features. open_clip's
classes unpickle only by importing open_clip, which imports torchvision, which imports
torch._dynamo: about two seconds in every worker that trains a prompt learner, on the
critical path of a short search. The text encoder of the prompt learners needs only the
text tower and the tokenizer. For a tower of plain pre-norm blocks (open_clip's CLIP text
tower) `portable_text` rebuilds the tower from torch's own modules and the small classes
here, sharing its parameters and its computation step for step, so its features are
those of the original bit for bit; open_clip's `SimpleTokenizer` travels as its
constructor's arguments and is rebuilt in the worker from open_clip's tokenizer file
alone, loaded without the package (`PortableTokenizer`). Any other tower or tokenizer gets
None, and the worker unpacks the whole model as before.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Pool types a text feature is read at one position per text for (what `TextTower` mirrors).
SINGLE_POSITION_POOLS = ("first", "last", "argmax", "eos")
# Texts a rebuilt tokenizer must tokenize as the original does before it stands in for it.
TOKENIZER_PROBES = (
    "a photo of a dog.",
    "X X X X X X X X airplane.",
    "An Ugly, CAPITALISED text -- with punctuation & numbers 12345!",
    "",
)
_TOKENIZER_MODULE = "croft_search._open_clip_tokenizer"


def text_tower(model: nn.Module) -> nn.Module:
    """The module holding ``model``'s text transformer: ``model.text`` for open_clip's
    `CustomTextCLIP`, the model itself for `CLIP` (its text tower inlined)."""
    return model.text if hasattr(model, "text") else model


def pool_type(tower: nn.Module) -> str:
    """How ``tower`` reads a text's feature off its sequence (open_clip's two spellings)."""
    return getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))


def eos_id(tower: nn.Module) -> int | None:
    """The end-of-text token id ``tower`` pools at, for the "eos" pool type."""
    return getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))


class CastLayerNorm(nn.LayerNorm):
    """Layer norm whose output has its input's dtype (open_clip's ``LayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(dtype)


class Float32LayerNorm(nn.LayerNorm):
    """Layer norm computed in float32, cast back (open_clip's ``LayerNormFp32``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        out = F.layer_norm(x.to(torch.float32), self.normalized_shape, self.weight, self.bias,
                           self.eps)  # fmt: skip
        return out.to(dtype)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the activation of OpenAI's CLIP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` (in place where ``inplace``)."""

    def __init__(self, gamma: nn.Parameter, inplace: bool) -> None:
        super().__init__()
        self.gamma, self.inplace = gamma, inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class TextBlock(nn.Module):
    """Pre-norm residual block: ``x + ls_1(attn(ln_1(x)))``, then ``+ ls_2(mlp(ln_2(.)))``."""

    def __init__(self, ln_1: nn.Module, attn: nn.MultiheadAttention, ls_1: nn.Module,
                 ln_2: nn.Module, mlp: nn.Sequential, ls_2: nn.Module) -> None:  # fmt: skip
        super().__init__()
        self.ln_1, self.attn, self.ls_1 = ln_1, attn, ls_1
        self.ln_2, self.mlp, self.ls_2 = ln_2, mlp, ls_2

    def attention(
        self,
        q_x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        k_x = q_x if k_x is None else k_x
        v_x = q_x if v_x is None else v_x
        attn_mask = None if attn_mask is None else attn_mask.to(q_x.dtype)
        return self.attn(q_x, k_x, v_x, need_weights=False, attn_mask=attn_mask)[0]

    def forward(self, q_x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x), attn_mask=attn_mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class TextTransformer(nn.Module):
    """The blocks, batch first."""

    batch_first = True
    grad_checkpointing = False

    def __init__(self, blocks: Sequence[TextBlock]) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(blocks)

    def get_cast_dtype(self) -> torch.dtype:
        return self.resblocks[0].mlp.c_fc.weight.dtype

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


class TextTower(nn.Module):
    """What `trainables.text.FrozenTextEncoder` reads of a CLIP text tower, under the same
    names: token and positional embeddings, transformer, final norm, projection, attention
    mask, pool type and end-of-text id."""

    def __init__(self, source: nn.Module, transformer: TextTransformer, ln_final: nn.Module
                 ) -> None:  # fmt: skip
        super().__init__()
        self.token_embedding = source.token_embedding
        self.positional_embedding = source.positional_embedding
        self.transformer = transformer
        self.ln_final = ln_final
        self.text_projection = source.text_projection
        self.register_buffer("attn_mask", source.attn_mask, persistent=False)
        self.text_pool_type = pool_type(source)
        self.text_eos_id = eos_id(source)


def is_plain_block(block: nn.Module) -> bool:
    """Whether ``block`` computes `TextBlock`'s forward (a `TextBlock`, or open_clip's
    self-attention ``ResidualAttentionBlock``), so a caller may run its parts itself."""
    if isinstance(block, TextBlock):
        return True
    module = sys.modules.get("open_clip.transformer")  # loaded with any open_clip block
    return (
        module is not None
        and type(block) is module.ResidualAttentionBlock
        and not hasattr(block, "ln_1_kv")
    )


def portable_text(model: nn.Module, tokenizer: Any) -> tuple[TextTower, PortableTokenizer] | None:
    """``model``'s text tower and ``tokenizer`` in forms that unpickle without open_clip,
    sharing the tower's parameters; None where either is not one this module mirrors."""
    tower = portable_tower(model)
    words = PortableTokenizer.of(tokenizer)
    return None if tower is None or words is None else (tower, words)


def portable_tower(model: nn.Module) -> TextTower | None:
    """The text tower of ``model`` (open_clip's `CLIP`, or a `CustomTextCLIP`'s ``text``) as
    a `TextTower` sharing its parameters, or None if it has anything else: other blocks,
    activations or norms, no attention mask, a class token, a padding mask, a pool over
    several positions."""
    tower = text_tower(model)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    if not all(hasattr(tower, name) for name in needed) or tower.attn_mask is None:
        return None
    if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
        return None
    pool = pool_type(tower)
    transformer = tower.transformer
    if pool not in SINGLE_POSITION_POOLS or not getattr(transformer, "batch_first", False):
        return None
    if getattr(transformer, "grad_checkpointing", False):
        return None
    projection = getattr(tower, "text_projection", None)
    if projection is not None and not isinstance(projection, (nn.Parameter, nn.Linear)):
        return None
    blocks = [_block(block) for block in transformer.resblocks]
    ln_final = _norm(tower.ln_final)
    if not blocks or any(block is None for block in blocks) or ln_final is None:
        return None
    return TextTower(tower, TextTransformer(blocks), ln_final)


def _block(block: nn.Module) -> TextBlock | None:
    if not is_plain_block(block) or hasattr(block.mlp.c_fc, "int8_original_dtype"):
        return None
    if list(block.mlp._modules) != ["c_fc", "gelu", "c_proj"]:
        return None
    activation = _activation(block.mlp.gelu)
    parts = (_norm(block.ln_1), _scale(block.ls_1), _norm(block.ln_2), _scale(block.ls_2))
    if activation is None or any(part is None for part in parts):
        return None
    ln_1, ls_1, ln_2, ls_2 = parts
    mlp = nn.Sequential()
    mlp.add_module("c_fc", block.mlp.c_fc)
    mlp.add_module("gelu", activation)
    mlp.add_module("c_proj", block.mlp.c_proj)
    return TextBlock(ln_1, block.attn, ls_1, ln_2, mlp, ls_2)


def _norm(norm: nn.Module) -> nn.Module | None:
    name = type(norm).__name__
    kinds = {"LayerNorm": CastLayerNorm, "LayerNormFp32": Float32LayerNorm}
    if type(norm) is nn.LayerNorm:
        return norm
    if not type(norm).__module__.startswith("open_clip") or name not in kinds:
        return None
    portable = kinds[name](norm.normalized_shape, eps=norm.eps, elementwise_affine=False)
    portable.weight, portable.bias = norm.weight, norm.bias
    return portable


def _scale(scale: nn.Module) -> nn.Module | None:
    if type(scale) is nn.Identity:
        return scale
    if type(scale).__name__ == "LayerScale" and type(scale).__module__.startswith("open_clip"):
        return LayerScale(scale.gamma, bool(scale.inplace))
    return None


def _activation(activation: nn.Module) -> nn.Module | None:
    if type(activation) is nn.GELU:
        return activation
    if type(activation).__name__ == "QuickGELU" and type(activation).__module__.startswith(
        "open_clip"
    ):
        return QuickGELU()
    return None


class PortableTokenizer:
    """open_clip's `SimpleTokenizer` as its constructor's arguments: rebuilt where first
    called, once per process, from open_clip's tokenizer module (loaded from its file,
    without importing open_clip's package, where that is not imported already)."""

    def __init__(self, context_length: int, special_tokens: Sequence[str], clean: str) -> None:
        self.context_length = context_length
        self.special_tokens = tuple(special_tokens)
        self.clean = clean

    @classmethod
    def of(cls, tokenizer: Any) -> PortableTokenizer | None:
        """The portable form of ``tokenizer``, or None where it is not a `SimpleTokenizer`
        this class rebuilds exactly (its vocabulary and `TOKENIZER_PROBES` compared)."""
        module = sys.modules.get("open_clip.tokenizer")
        if module is None or type(tokenizer) is not module.SimpleTokenizer:
            return None
        if tokenizer.reduction_fn is not None:
            return None
        cleaners = {"_clean_lower": "lower", "_clean_whitespace": "whitespace",
                    "_clean_canonicalize": "canonicalize"}  # fmt: skip
        clean = cleaners.get(getattr(tokenizer.clean_fn, "__name__", ""))
        if clean is None:
            return None
        special = [tokenizer.decoder[i] for i in tokenizer.all_special_ids[2:]]
        portable = cls(tokenizer.context_length, special, clean)
        rebuilt = portable.tokenizer
        if rebuilt.encoder != tokenizer.encoder or rebuilt.bpe_ranks != tokenizer.bpe_ranks:
            return None
        if not torch.equal(rebuilt(list(TOKENIZER_PROBES)), tokenizer(list(TOKENIZER_PROBES))):
            return None
        return portable

    @property
    def tokenizer(self) -> Any:
        return _simple_tokenizer(self.context_length, self.special_tokens, self.clean)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        return self.tokenizer(texts, context_length=context_length)


# A worker unpickles the backbone afresh for every trial it runs; building the vocabulary
# once per process spares each trial reading and parsing the BPE file again.
@functools.lru_cache(maxsize=8)
def _simple_tokenizer(context_length: int, special_tokens: tuple[str, ...], clean: str) -> Any:
    return _tokenizer_module().SimpleTokenizer(
        additional_special_tokens=list(special_tokens) or None,
        context_length=context_length,
        clean=clean,
    )


def _tokenizer_module() -> ModuleType:
    """open_clip's tokenizer module: the package's own where open_clip is imported, else
    its file loaded alone (it imports nothing of open_clip's)."""
    if "open_clip.tokenizer" in sys.modules:
        return sys.modules["open_clip.tokenizer"]
    if _TOKENIZER_MODULE not in sys.modules:
        package = importlib.util.find_spec("open_clip")  # finds it without importing it
        if package is None or package.origin is None:
            raise ModuleNotFoundError("open_clip is not installed")
        path = Path(package.origin).parent / "tokenizer.py"
        spec = importlib.util.spec_from_file_location(_TOKENIZER_MODULE, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_TOKENIZER_MODULE] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[_TOKENIZER_MODULE]
            raise
    return sys.modules[_TOKENIZER_MODULE]


def shared_tensors(module: nn.Module) -> dict[int, str]:
    """The parameters and buffers of ``module`` by ``id``: their names, the persistent ids
    of a pickle that refers to them instead of writing them again."""
    named = [*module.named_parameters(remove_duplicate=False),
             *module.named_buffers(remove_duplicate=False)]  # fmt: skip
    return {id(tensor): name for name, tensor in named}


def tensor_lookup(module: nn.Module) -> Callable[[str], torch.Tensor]:
    """The inverse of `shared_tensors` on the unpickled ``module``."""
    named = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    return named.__getitem__
