"""The frozen text tower of an open_clip CLIP, opened up so prompt learners (CoOp, CoCoOp,
DPLCLIP, CRoFT with n_ctx > 0) can feed it token embeddings with learnable context slots.

Works for open_clip's `CLIP` (text tower inlined in the model, e.g. OpenAI ViT-B-16 and the
embedded tiny-digits) and `CustomTextCLIP` with a built-in `TextTransformer` (`model.text`,
e.g. MobileCLIP, PE-Core, SigLIP). The forward pass mirrors open_clip's own: token embedding,
+ positional embedding, transformer with the tower's attention mask, final norm, pooling
(end-of-text, or whatever the tower's pool type says), projection; where the pool type
reads one position per text, the last block computes only the positions read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from croft_search.backbones import Backbone
from croft_search.errors import ConfigError
from croft_search.portable_text import eos_id, is_plain_block, pool_type

# The placeholder word whose token slots the learnable context replaces (CoOp uses "X").
PLACEHOLDER = "X"
CLASS_POSITIONS = ("end", "middle", "front")
# Prompts per text-encoder pass when every image has its own prompts (CoCoOp, DPLCLIP):
# bounds the activation memory of evaluation on large batches; gradients are unaffected.
MAX_PROMPTS_PER_PASS = 2048


def _rows_at(x: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
    """``x`` [N, T, w] at positions ``read`` [N, P] of each sequence: [N, P, w]."""
    return x.gather(1, read.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class FrozenTextEncoder(nn.Module):
    """Text encoder that accepts token embeddings; parameters stay frozen (shared with the
    backbone, never copied)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        tower, tokenizer = backbone.text_parts()
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
        self._backbone = (backbone,)
        self.tokenizer = tokenizer
        self.context_length = backbone.context_length
        self.pool_type = pool_type(tower)
        self.eos_id = eos_id(tower)
        # Only open_clip's bidirectional TextTransformer may mask padding (use_pad_mask).
        self.pad_mask = bool(getattr(tower, "use_pad_mask", False))
        self.embed_dim = backbone.embed_dim
        self.causal = self._reads_nothing_after_the_pooled_token(tower)
        self._packings: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def _reads_nothing_after_the_pooled_token(self, tower: nn.Module) -> bool:
        """Whether each position sees only the positions before it (CLIP's causal mask) and
        the feature is read at the end-of-text token: then the positions after that token
        never reach the feature, and a start that several prompts share computes the same
        for all of them (`forward_shared`)."""
        mask = tower.attn_mask
        if self.pad_mask or self.pool_type not in ("argmax", "eos") or mask is None:
            return False
        return torch.equal(mask, torch.full_like(mask, float("-inf")).triu_(1))

    def pooled_positions(self, tokens: torch.Tensor) -> list[int] | None:
        """The position each row of ``tokens`` [P, L] is read at, where the encoder is
        `causal`; None otherwise."""
        read = self._read_positions(tokens) if self.causal else None
        return None if read is None else read.tolist()

    @property
    def tower(self) -> nn.Module:
        return self._tower[0]

    def _tower_on(self, device: torch.device) -> nn.Module:
        """The tower, moved to ``device`` first where it is elsewhere: a method moved to a
        device does not move the tower it does not own (resources loaded for the CPU, a
        trial on CUDA). The whole backbone moves, so that it stays on one device."""
        tower = self.tower
        if tower.positional_embedding.device != device:
            self._backbone[0].to(device)
        return tower

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

    def forward(
        self, embeddings: torch.Tensor, tokens: torch.Tensor, length: int | None = None
    ) -> torch.Tensor:
        """Raw text features [P, d] from token embeddings [P, L, w]; ``tokens`` [P, L] only
        locate the pooled position (and the padding, for towers that mask it). A `causal`
        encoder may be given the ``length`` of the positions that matter, one past the
        last pooled one (`pooled_positions`): the rest, padding, is not computed."""
        tower = self._tower_on(embeddings.device)
        tokens = tokens.to(embeddings.device)
        if length is not None and self.causal:
            embeddings, tokens = embeddings[..., :length, :], tokens[..., :length]
        cast_dtype = tower.transformer.get_cast_dtype()
        positions = tower.positional_embedding[: embeddings.shape[-2]]
        x = embeddings.to(cast_dtype) + positions.to(cast_dtype)
        attn_mask = tower.attn_mask
        if self.pad_mask:
            length = tokens.shape[1]
            padding = tower._build_additive_mask(tokens, length, x.dtype)
            attn_mask = padding if attn_mask is None else attn_mask[:length, :length] + padding
        if attn_mask is not None:  # [L, L], or [B * heads, L, L] with a padding mask
            attn_mask = attn_mask[..., : x.shape[-2], : x.shape[-2]]
        read = self._read_positions(tokens)
        if read is None:
            x = tower.ln_final(tower.transformer(x, attn_mask=attn_mask))
            from open_clip.transformer import text_global_pool  # loaded with the tower itself

            pooled = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
            return self._project(pooled)
        return self._project(self._transform_at(tower, x, attn_mask, read[:, None])[:, 0])

    def _read_positions(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The position each row of ``tokens`` [N, L] is read at, [N], as open_clip's
        ``text_global_pool`` reads it; None for a pool type that reads more than one."""
        if self.pool_type == "first":
            return torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
        if self.pool_type == "last":
            return torch.full((len(tokens),), tokens.shape[-1] - 1, device=tokens.device)
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos" and self.eos_id is not None:
            return (tokens == self.eos_id).int().argmax(dim=-1)
        return None

    @staticmethod
    def _transform_at(
        tower: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, read: torch.Tensor
    ) -> torch.Tensor:
        """The tower's transformer and final norm on ``x`` [N, T, w], read at positions
        ``read`` [N, P] of each sequence: [N, P, w]. The last block computes those
        positions only: a block's output at a position needs that position's query and
        every position's keys and values, and its output elsewhere reaches no feature, so
        in the last block the rest of the queries and the MLP would be work for nothing
        (most of that block's arithmetic where a few positions per sequence are read)."""
        transformer = tower.transformer
        blocks = list(transformer.resblocks)
        last = blocks[-1]
        plain = (
            is_plain_block(last)
            and getattr(transformer, "batch_first", False)
            and not getattr(transformer, "grad_checkpointing", False)
        )
        if not plain:
            x = tower.ln_final(transformer(x, attn_mask=mask))
            return _rows_at(x, read)
        for block in blocks[:-1]:
            x = block(x, attn_mask=mask)
        heads = last.attn.num_heads
        query_mask = None
        if mask is not None and mask.dim() == 2:  # [T, T], every sequence's
            query_mask = mask[read].repeat_interleave(heads, dim=0)
        elif mask is not None:  # [N * heads, T, T]
            by_sequence = mask.unflatten(0, (len(x), heads))
            rows = read[:, None, :, None].expand(-1, heads, -1, mask.shape[-1])
            query_mask = by_sequence.gather(2, rows).flatten(0, 1)
        normed = last.ln_1(x)
        picked = _rows_at(x, read)
        attended = last.attention(
            q_x=_rows_at(normed, read), k_x=normed, v_x=normed, attn_mask=query_mask
        )
        out = picked + last.ls_1(attended)
        out = out + last.ls_2(last.mlp(last.ln_2(out)))
        return tower.ln_final(out)

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        projection = self.tower.text_projection
        if projection is None:
            return pooled
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection

    def forward_shared(
        self, start: torch.Tensor, rest: torch.Tensor, pooled: Sequence[int]
    ) -> torch.Tensor:
        """Raw text features [..., K, d] of K prompts that all begin with the same tokens:
        ``start`` [..., S, w] the shared first S token embeddings, ``rest`` [K, R, w] (or
        [..., K, R, w]) each prompt's own next R, ``pooled`` each prompt's pooled position
        in the whole sequence (`pooled_positions`, at least S). Equal to `forward` on the
        concatenated prompts, for a `causal` encoder, with the shared positions computed
        once rather than once per prompt.

        The prompts are packed: one sequence holds the shared start and then several
        prompts' own positions, each at its own positional embedding; the attention mask
        lets a prompt's position see the start and its own earlier positions only, so it
        computes what it would in its own sequence. A packed sequence holds at most about
        ``w`` positions, where its attention costs a small share of its linear layers."""
        if not self.causal:
            raise ValueError("forward_shared needs a causal encoder read at end-of-text")
        tower = self._tower_on(start.device)
        cast_dtype = tower.transformer.get_cast_dtype()
        lead, (shared, width) = start.shape[:-2], start.shape[-2:]
        prompts, own = rest.shape[-3], rest.shape[-2]
        rows = -(-prompts // max(1, min(prompts, (width - shared) // max(own, 1))))
        per_row = -(-prompts // rows)
        # The last row is filled up with copies of the last prompt; their outputs are dropped.
        order = [min(k, prompts - 1) for k in range(rows * per_row)]
        rest = rest.expand(*lead, prompts, own, width)[..., order, :, :]
        rest = rest.reshape(*lead, rows, per_row * own, width)
        starts = start.unsqueeze(-3).expand(*lead, rows, shared, width)
        packed = torch.cat([starts, rest], dim=-2).flatten(0, -3)  # [N, S + per_row R, w]
        mask, positions, slots = self._packing(shared, own, per_row, pooled, order, rows)
        x = packed.to(cast_dtype) + tower.positional_embedding[positions].to(cast_dtype)
        slots = slots.expand(len(x) // rows, -1, -1).reshape(len(x), per_row)
        features = self._transform_at(tower, x, mask.to(x.dtype), slots)
        features = features.reshape(*lead, rows * per_row, -1)[..., :prompts, :]
        return self._project(features)

    def _packing(self, shared: int, own: int, per_row: int, pooled: Sequence[int],
                 order: Sequence[int], rows: int) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """For `forward_shared`'s packed sequences: the additive attention mask [T, T],
        each position's index into the positional embedding [T], and where each packed
        prompt is read, [rows, per_row]. Built once per layout: a training step asks again."""
        # The device too: a worker may move the backbone after a packing was built.
        key = (shared, own, per_row, rows, tuple(pooled), self.tower.positional_embedding.device)
        if key not in self._packings:
            self._packings[key] = self._new_packing(shared, own, per_row, pooled, order, rows)
        return self._packings[key]

    def _new_packing(self, shared: int, own: int, per_row: int, pooled: Sequence[int],
                     order: Sequence[int], rows: int) -> tuple[torch.Tensor, ...]:  # fmt: skip
        device = self.tower.positional_embedding.device
        length = shared + per_row * own
        index = torch.arange(length, device=device)
        segment = torch.where(index < shared, -1, (index - shared).div(own, rounding_mode="floor"))
        positions = torch.where(index < shared, index, shared + (index - shared) % own)
        visible = (index[None, :] <= index[:, None]) & (
            (segment[None, :] == -1) | (segment[None, :] == segment[:, None])
        )
        mask = torch.zeros(length, length, device=device).masked_fill(~visible, float("-inf"))
        slots = [pooled[order[k]] + (k % per_row) * own for k in range(len(order))]
        slots = torch.as_tensor(slots, device=device).view(rows, per_row)
        return mask, positions, slots

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
        # Where the encoder reads each prompt, as numbers (a population stacks buffers):
        # with a causal encoder nothing past the last of them is computed, and a context
        # shared by every class, placed before the class name, is computed once per pass
        # instead of once per class (`FrozenTextEncoder.forward_shared`).
        self.pooled = encoder.pooled_positions(ordered_tokens)
        self.length = None if self.pooled is None else max(self.pooled) + 1
        self.shared_start = start + n_ctx
        self.shares_start = (
            self.pooled is not None
            and not class_specific
            and class_position == "end"
            and min(self.pooled) >= self.shared_start
            and bool((embedded[:, :start] == embedded[:1, :start]).all())
        )

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

    def _shared_pass(self, context: torch.Tensor) -> torch.Tensor:
        """Text features [..., K, d] for shared contexts [..., M, w]: the start token and
        the context once, each class's name and end after them."""
        # The first class's start tokens (every class's); a population's members' buffers
        # come stacked [P, K, ...] and their contexts [P, M, w].
        prefix = self.prefix[..., 0, :, :].to(context.dtype)
        start = torch.cat([prefix.expand(*context.shape[:-2], *prefix.shape[-2:]), context],
                          dim=-2)  # fmt: skip
        rest = self.suffix[..., : self.length - self.shared_start, :].to(context.dtype)
        return self.encoder.forward_shared(start, rest, self.pooled)

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
            if self.shares_start:
                return self._shared_pass(self.context)
            return self.encoder(self.prompt_embeddings(ctx), self.tokens, self.length)
        if bias.dim() == 2:  # [B, w]: the same shift for every context slot
            bias = bias[:, None, :]
        if bias.dim() != 3 or bias.shape[1] not in (1, self.n_ctx):
            raise ValueError(
                f"bias must be [B, w] or [B, {self.n_ctx}, w], got {tuple(bias.shape)}"
            )
        if self.shares_start:
            contexts = self.context.unsqueeze(0) + bias  # [B, M, w]
            rows = max(1, MAX_PROMPTS_PER_PASS // self.n_classes)
            return torch.cat([self._shared_pass(contexts[first : first + rows])
                              for first in range(0, len(contexts), rows)])  # fmt: skip
        embeddings = self.prompt_embeddings(ctx.unsqueeze(0) + bias[:, None])  # [B, K, L, w]
        batch = embeddings.shape[0]
        flat = embeddings.flatten(0, 1)
        tokens = self.tokens.repeat(batch, 1)
        features = torch.cat(
            [
                self.encoder(
                    flat[start : start + MAX_PROMPTS_PER_PASS],
                    tokens[start : start + MAX_PROMPTS_PER_PASS],
                    self.length,
                )
                for start in range(0, len(flat), MAX_PROMPTS_PER_PASS)
            ]
        )
        return features.view(batch, self.n_classes, -1)
