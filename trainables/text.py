"""The frozen text tower of an open_clip CLIP, opened up so prompt learners (CoOp, CoCoOp,
DPLCLIP, CRoFT with n_ctx > 0) can feed it token embeddings with learnable context slots.

Works for open_clip's `CLIP` (text tower inlined in the model, e.g. OpenAI ViT-B-16 and the
embedded tiny-digits) and `CustomTextCLIP` with a built-in `TextTransformer` (`model.text`,
e.g. MobileCLIP, PE-Core, SigLIP). The forward pass mirrors open_clip's own: token embedding,
+ positional embedding, transformer with the tower's attention mask, final norm, pooling
(end-of-text, or whatever the tower's pool type says), projection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from open_clip.transformer import text_global_pool
from torch import nn

from croft_search.backbones import Backbone
from croft_search.errors import ConfigError

# The placeholder word whose token slots the learnable context replaces (CoOp uses "X").
PLACEHOLDER = "X"
CLASS_POSITIONS = ("end", "middle", "front")
# Prompts per text-encoder pass when every image has its own prompts (CoCoOp, DPLCLIP):
# bounds the activation memory of evaluation on large batches; gradients are unaffected.
MAX_PROMPTS_PER_PASS = 2048


class FrozenTextEncoder(nn.Module):
    """Text encoder that accepts token embeddings; parameters stay frozen (shared with the
    backbone, never copied)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        model = backbone.model
        tower = model.text if hasattr(model, "text") else model
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if (
            not all(hasattr(tower, attr) for attr in needed)
            or getattr(tower, "cls_emb", None) is not None
        ):
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
        # Only open_clip's bidirectional TextTransformer may mask padding (use_pad_mask).
        self.pad_mask = bool(getattr(tower, "use_pad_mask", False))
        self.embed_dim = backbone.embed_dim

    @property
    def tower(self) -> nn.Module:
        return self._tower[0]

    @property
    def width(self) -> int:
        return self.tower.token_embedding.weight.shape[1]

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.tower.token_embedding.weight.device)

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text needs, special tokens included, before any truncation to the
        context length (so "does it fit?" has an exact answer)."""
        roomy = 4 * self.context_length + 64
        tokens = self.tokenizer(list(texts), context_length=roomy)
        pad = self.tokenizer([""], context_length=roomy)[0, -1]
        lengths = []
        for row in tokens:
            used = torch.nonzero(row != pad).flatten()
            lengths.append(int(used[-1]) + 1 if len(used) else 0)
        return lengths

    def word_span(self, words: str) -> tuple[int, int]:
        """(start, count): where the tokens of ``words`` begin in the tokenised prompt
        ``"{words} ..."`` and how many there are; tokenizer-agnostic (start token or not)."""
        roomy = 4 * self.context_length + 64
        with_words, without = self.tokenizer([f"{words}.", "."], context_length=roomy)
        differs = torch.nonzero(with_words != without).flatten()
        start = int(differs[0]) if len(differs) else 0
        with_length, without_length = self.token_lengths([f"{words}.", "."])
        return start, with_length - without_length

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.tower.token_embedding(tokens)

    def forward(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Raw text features [P, d] from token embeddings [P, L, w]; ``tokens`` [P, L] only
        locate the pooled position (and the padding, for towers that mask it)."""
        tower = self.tower
        cast_dtype = tower.transformer.get_cast_dtype()
        x = embeddings.to(cast_dtype) + tower.positional_embedding.to(cast_dtype)
        attn_mask = tower.attn_mask
        if self.pad_mask:
            length = tokens.shape[1]
            padding = tower._build_additive_mask(tokens, length, x.dtype)
            attn_mask = padding if attn_mask is None else attn_mask[:length, :length] + padding
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
    """CoOp-style prompts ``[V1 .. VM] classname.`` with M context vectors.

    Options follow CoOp: ``init_words`` (e.g. "a photo of a", whose token embeddings start the
    context; must be M tokens), ``class_specific`` (one context per class, CSC) and
    ``class_position`` ("end", "middle": half the context on each side of the class name,
    "front": the class name first). ``learn_context=False`` fixes the context at zero, for
    prompts generated entirely by the bias (DPLCLIP). Without init words the context starts
    from N(0, init_std^2) drawn with ``seed``.

    ``forward(bias)`` returns text features [K, d]; with a bias it returns one prompt set per
    row, [B, K, d]: a bias [B, w] is added to every context vector (CoCoOp's meta-net), a bias
    [B, M, w] to each context slot separately (DPLCLIP's generated context)."""

    @classmethod
    def from_hparams(cls, context: Any, hp: Mapping[str, Any], **options: Any) -> PromptLearner:
        """The learner a prompt method's hyper-parameters ask for: ``n_ctx`` context tokens
        initialised from ``ctx_init`` (random where empty), seeded by ``seed``, over the
        trial's classes (``context``: the method's MethodContext)."""
        return cls(context.text_encoder, context.classnames, hp["n_ctx"],
                   init_words=hp["ctx_init"], seed=hp["seed"], **options)  # fmt: skip

    def __init__(
        self,
        encoder: FrozenTextEncoder,
        classnames: Sequence[str],
        n_ctx: int,
        init_words: str = "",
        class_specific: bool = False,
        class_position: str = "end",
        init_std: float = 0.02,
        learn_context: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if n_ctx < 1:
            raise ConfigError(f"n_ctx must be >= 1 for a prompt learner, got {n_ctx}")
        if class_position not in CLASS_POSITIONS:
            raise ConfigError(
                f"class_position must be one of {', '.join(CLASS_POSITIONS)}, "
                f"got {class_position!r}"
            )
        self.encoder = encoder
        self.n_ctx = n_ctx
        self.class_position = class_position
        self.n_classes = len(classnames)

        placeholder = " ".join([PLACEHOLDER] * n_ctx)
        prompts = [f"{placeholder} {name}." for name in classnames]
        lengths = encoder.token_lengths(prompts)
        longest = max(lengths)
        if longest > encoder.context_length:
            fitting = n_ctx - (longest - encoder.context_length)
            advice = f"use n_ctx <= {fitting}" if fitting >= 1 else "use shorter class names"
            raise ConfigError(
                f"n_ctx={n_ctx} context tokens plus the longest class name need {longest} "
                f"tokens but the text encoder's context length is {encoder.context_length}; "
                f"{advice}"
            )
        start, count = encoder.word_span(placeholder)
        if count != n_ctx:
            raise ConfigError(
                f"this tokenizer turns {n_ctx} placeholder words into {count} tokens; "
                "prompt learning needs one token per context slot"
            )
        tokens = encoder.tokenize(prompts)
        embedded = encoder.embed_tokens(tokens)
        self.register_buffer("prefix", embedded[:, :start].clone(), persistent=False)
        self.register_buffer("suffix", embedded[:, start + n_ctx :].clone(), persistent=False)
        # Class-name tokens per class: what the name adds to the bare "X .. X." prompt.
        bare = encoder.token_lengths([f"{placeholder}."])[0]
        self.name_lengths = [length - bare for length in lengths]
        order = self._position_order(start, tokens.shape[1])
        self.register_buffer("order", order, persistent=False)
        # Token ids only locate the pooled (end-of-text) position: reorder them alike.
        ordered_tokens = tokens if order is None else tokens.gather(1, order)
        self.register_buffer("tokens", ordered_tokens, persistent=False)

        width = encoder.width
        shape = (self.n_classes, n_ctx, width) if class_specific else (n_ctx, width)
        if not learn_context:
            if init_words:
                raise ConfigError("init_words needs a learnable context")
            self.register_buffer("context", torch.zeros(shape, dtype=embedded.dtype))
            return
        if init_words:
            init_start, n_words = encoder.word_span(init_words)
            if n_words != n_ctx:
                raise ConfigError(
                    f"the init words {init_words!r} are {n_words} tokens but n_ctx is {n_ctx}; "
                    "make them agree or leave the init words empty"
                )
            init_tokens = encoder.tokenize([f"{init_words}."])
            init = encoder.embed_tokens(init_tokens)[0, init_start : init_start + n_ctx].clone()
            if class_specific:
                init = init.expand(self.n_classes, -1, -1).clone()
        else:
            # Its own generator, so the draw does not depend on what else used the global one;
            # seeded by the trial, so seeds vary the context's start as CoOp's runs do.
            generator = torch.Generator().manual_seed(seed)
            init = torch.randn(shape, generator=generator) * init_std
        self.context = nn.Parameter(init.to(embedded.dtype))

    def _position_order(self, start: int, length: int) -> torch.Tensor | None:
        """Per class, the positions of the "end" layout [prefix, ctx, name, rest] that form
        the requested layout, [K, L]; None for "end" itself."""
        if self.class_position == "end":
            return None
        rows = []
        for name_length in self.name_lengths:
            prefix = list(range(start))
            ctx = list(range(start, start + self.n_ctx))
            name_end = start + self.n_ctx + name_length
            name = list(range(start + self.n_ctx, name_end))
            rest = list(range(name_end, length))
            if self.class_position == "front":
                rows.append(prefix + name + ctx + rest)
            else:
                half = self.n_ctx // 2
                rows.append(prefix + ctx[:half] + name + ctx[half:] + rest)
        return torch.as_tensor(rows, dtype=torch.long, device=self.prefix.device)

    def context_vectors(self) -> torch.Tensor:
        """The context [K, M, w] (shared contexts expanded over the classes)."""
        ctx = self.context
        return ctx if ctx.dim() == 3 else ctx.expand(self.n_classes, -1, -1)

    def prompt_embeddings(self, ctx: torch.Tensor) -> torch.Tensor:
        """Token embeddings [..., K, L, w] of the prompts for context ``ctx`` [..., K, M, w]."""
        lead = ctx.shape[:-3]
        prefix = self.prefix.expand(*lead, *self.prefix.shape)
        suffix = self.suffix.expand(*lead, *self.suffix.shape)
        sequence = torch.cat([prefix.to(ctx.dtype), ctx, suffix.to(ctx.dtype)], dim=-2)
        if self.order is None:
            return sequence
        index = self.order[..., None].expand(*sequence.shape)
        return sequence.gather(-2, index)

    def forward(self, bias: torch.Tensor | None = None) -> torch.Tensor:
        ctx = self.context_vectors()
        if bias is None:
            return self.encoder(self.prompt_embeddings(ctx), self.tokens)
        if bias.dim() == 2:  # [B, w]: the same shift for every context slot
            bias = bias[:, None, :]
        if bias.dim() != 3 or bias.shape[1] not in (1, self.n_ctx):
            raise ValueError(
                f"bias must be [B, w] or [B, {self.n_ctx}, w], got {tuple(bias.shape)}"
            )
        embeddings = self.prompt_embeddings(ctx.unsqueeze(0) + bias[:, None])  # [B, K, L, w]
        batch = embeddings.shape[0]
        flat = embeddings.flatten(0, 1)
        tokens = self.tokens.repeat(batch, 1)
        features = torch.cat(
            [
                self.encoder(
                    flat[start : start + MAX_PROMPTS_PER_PASS],
                    tokens[start : start + MAX_PROMPTS_PER_PASS],
                )
                for start in range(0, len(flat), MAX_PROMPTS_PER_PASS)
            ]
        )
        return features.view(batch, self.n_classes, -1)
