"""Arithmetic of one prompt learner pass: the prompts as the learner runs them (the shared
start once, no padding, the last block at the end-of-text tokens only;
`trainables.text.FrozenTextEncoder.forward_shared`) against every prompt's whole token
sequence as open_clip's encode_text runs it, counted by PyTorch's FLOP counter (no
timing), for the embedded model and a 77-token CLIP (random weights count alike).

    python bench/prompt_flops.py [--classes 6] [--n-ctx 4,16]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from open_clip.transformer import text_global_pool
from torch.utils.flop_counter import FlopCounterMode

from croft_search.backbones import load_backbone
from trainables.text import FrozenTextEncoder, PromptLearner

BACKBONES = {"tiny-digits": "default", "ViT-S-32-alt": None}
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def flops(run: object) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def whole_sequences(learner: PromptLearner) -> torch.Tensor:
    """Every prompt's whole token sequence as open_clip's encode_text runs it: every
    position through every block, then the pooled one projected."""
    encoder = learner.encoder
    tower = encoder.tower
    x = learner.prompt_embeddings(learner.context_vectors()) + tower.positional_embedding
    x = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask))
    pooled = text_global_pool(x, learner.tokens, encoder.pool_type, eos_token_id=encoder.eos_id)
    projection = tower.text_projection
    return projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--n-ctx", default="4,16", help="context lengths, each where it fits")
    args = parser.parse_args()
    names = [NAMES[k % len(NAMES)] for k in range(args.classes)]
    print("backbone       n_ctx  learner GFLOP  whole sequences GFLOP  ratio")
    for name, pretrained in BACKBONES.items():
        encoder = FrozenTextEncoder(load_backbone(name, pretrained))
        for n_ctx in (int(n) for n in args.n_ctx.split(",")):
            if n_ctx + 4 > encoder.context_length:
                continue
            learner = PromptLearner(encoder, names, n_ctx)
            packed = flops(learner)
            whole = flops(partial(whole_sequences, learner))
            print(
                f"{name:14s} {n_ctx:5d}  {packed / 1e9:13.3f}  {whole / 1e9:21.3f}  "
                f"{whole / packed:5.1f}x"
            )


if __name__ == "__main__":
    main()
