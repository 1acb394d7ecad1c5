"""The frozen text tower of an open_clip CLIP, opened up so prompt learners (CoOp, CoCoOp,
DPLCLIP, CRoFT with n_ctx > 0) can feed it token embeddings with learnable context slots.

Works for open_clip's `CLIP` (text tower inlined in the model, e.g. OpenAI ViT-B-16 and the
embedded tiny-digits) and `CustomTextCLIP` with a built-in `TextTransformer` (`model.text`).
The forward pass mirrors open_clip's own: token embedding, + positional embedding,
transformer with the causal mask, final norm, end-of-text pooling, projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from croft_search.backbones import Backbone
from croft_search.errors import ConfigError

# The placeholder word whose token slots the learnable context replaces (CoOp uses "X").
PLACEHOLDER = "X"


class FrozenTextEncoder(nn.Module):
    """Text encoder that accepts token embeddings; parameters stay frozen (shared with the
    backbone, never copied)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        model = backbone.model
        tower = model.text if hasattr(model, "text") else model
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if not all(hasattr(tower, attr) for attr in needed) or getattr(tower, "cls_emb", None):
            raise ConfigError(
                f"backbone {backbone.name} has a text tower prompt learning cannot open "
                "(needs an open_clip CLIP text transformer); choose another backbone or method"
            )
        # Stored in a tuple so the frozen tower is not registered as a sub-module: its weights
        # then stay out of state_dict() and parameters() of every method.
        self._tower = (tower,)
        self.tokenizer = backbone.tokenizer
        self.context_length = backbone.context_length
        self.pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        self.eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        self.embed_dim = backbone.embed_dim

    @property
    def tower(self) -> nn.Module:
        return self._tower[0]

    @property
    def width(self) -> int:
        return self.tower.token_embedding.weight.shape[1]

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.tower.token_embedding.weight.device)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.tower.token_embedding(tokens)

    def forward(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Raw text features [P, d] from token embeddings [P, L, w]; ``tokens`` [P, L] only
        locate the end-of-text position for pooling."""
        tower = self.tower
        cast_dtype = tower.transformer.get_cast_dtype()
        x = embeddings.to(cast_dtype) + tower.positional_embedding.to(cast_dtype)
        attn_mask = tower.attn_mask
        x = tower.transformer(x, attn_mask=attn_mask)
        x = tower.ln_final(x)
        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        projection = tower.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return x

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Raw features of plain texts (equal to the backbone's encode_text)."""
        tokens = self.tokenize(texts)
        return self(self.embed_tokens(tokens), tokens)


class PromptLearner(nn.Module):
    """CoOp-style prompts ``[V1 .. VM] classname.`` with M learnable context vectors.

    Options follow CoOp: ``init_words`` (e.g. "a photo of a", whose token embeddings start the
    context; needs M tokens), ``class_specific`` (one context per class, CSC) and
    ``class_position`` ("end", "middle" or "front"). ``forward(bias)`` adds an optional
    per-sample bias [B, w] to every context vector (CoCoOp's meta-net, DPLCLIP's domain MLP)
    and returns text features [K, d] or [B, K, d]."""

    def __init__(
        self,
        encoder: FrozenTextEncoder,
        classnames: Sequence[str],
        n_ctx: int,
        init_words: str = "",
        class_specific: bool = False,
        class_position: str = "end",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if n_ctx < 1:
            raise ConfigError(f"n_ctx must be >= 1 for a prompt learner, got {n_ctx}")
        if class_position not in ("end", "middle", "front"):
            raise ConfigError(
                f"class_position must be end, middle or front, got {class_position!r}"
            )
        self.encoder = encoder
        self.n_ctx = n_ctx
        self.class_position = class_position
        self.n_classes = len(classnames)
        width = encoder.width
        placeholder = " ".join([PLACEHOLDER] * n_ctx)
        prompts = [f"{placeholder} {name}." for name in classnames]
        tokens = encoder.tokenize(prompts)
        longest = int(tokens.argmax(dim=-1).max()) + 1
        if longest >= encoder.context_length:
            raise ConfigError(
                f"n_ctx={n_ctx} plus the longest class name does not fit the text encoder's "
                f"context length {encoder.context_length}; use a shorter context"
            )
        embedded = encoder.embed_tokens(tokens)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)  # start token
        self.register_buffer("suffix", embedded[:, 1 + n_ctx :].clone(), persistent=False)
        # Class-name token count per class: the tokens between the context and the ".".
        name_lengths = (
            [len(encoder.tokenizer.encode(name)) for name in classnames]
            if hasattr(encoder.tokenizer, "encode")
            else [1] * len(classnames)
        )
        self.name_lengths = name_lengths

        shape = (self.n_classes, n_ctx, width) if class_specific else (n_ctx, width)
        if init_words:
            init_tokens = encoder.tokenize([init_words])
            n_words = int(init_tokens.argmax(dim=-1)) - 1
            if n_words != n_ctx:
                raise ConfigError(
                    f"init words {init_words!r} are {n_words} tokens but n_ctx is {n_ctx}; "
                    "make them agree or leave init_words empty"
                )
            init = encoder.embed_tokens(init_tokens)[0, 1 : 1 + n_ctx].clone()
            if class_specific:
                init = init.expand(self.n_classes, -1, -1).clone()
        else:
            generator = torch.Generator().manual_seed(0)
            init = torch.randn(shape, generator=generator) * init_std
        self.context = nn.Parameter(init.to(embedded.dtype))

    def context_vectors(self) -> torch.Tensor:
        ctx = self.context
        return ctx if ctx.dim() == 3 else ctx.expand(self.n_classes, -1, -1)

    def prompt_embeddings(self, ctx: torch.Tensor) -> torch.Tensor:
        """Token embeddings [K, L, w] of the prompts for context ``ctx`` [K, M, w]."""
        if self.class_position == "end":
            return torch.cat([self.prefix, ctx, self.suffix], dim=1)
        rows = []
        for k, length in enumerate(self.name_lengths):
            name = self.suffix[k : k + 1, :length]
            rest = self.suffix[k : k + 1, length:]
            c = ctx[k : k + 1]
            if self.class_position == "front":
                rows.append(torch.cat([self.prefix[k : k + 1], name, c, rest], dim=1))
            else:
                half = self.n_ctx // 2
                rows.append(
                    torch.cat([self.prefix[k : k + 1], c[:, :half], name, c[:, half:], rest], 1)
                )
        return torch.cat(rows)

    def forward(self, bias: torch.Tensor | None = None) -> torch.Tensor:
        ctx = self.context_vectors()
        if bias is None:
            return self.encoder(self.prompt_embeddings(ctx), self.tokens)
        # One prompt set per sample: [B, K, M, w] -> B * K prompts through the text encoder.
        shifted = ctx.unsqueeze(0) + bias[:, None, None, :]
        batch = shifted.shape[0]
        embeddings = torch.cat([self.prompt_embeddings(c) for c in shifted])
        tokens = self.tokens.repeat(batch, 1)
        return self.encoder(embeddings, tokens).view(batch, self.n_classes, -1)


def normalized(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
