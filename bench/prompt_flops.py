"""Arithmetic of one prompt learner pass: the prompts as the learner runs them (the shared
start once, no padding; `trainables.text.FrozenTextEncoder.forward_shared`) against every
prompt's whole token sequence through the same encoder, counted by PyTorch's FLOP counter
(no timing), for the embedded model and a 77-token CLIP (random weights count alike).

    python bench/prompt_flops.py [--classes 6] [--n-ctx 4,16]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
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
    ctx = learner.context_vectors()
    return learner.encoder(learner.prompt_embeddings(ctx), learner.tokens)


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
