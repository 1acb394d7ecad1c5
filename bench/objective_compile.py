"""What `torch.compile` would give CRoFT's hand-written objective in a population: one
population step's call of `objective_gradients` (n_ctx 0, all four digits target domains,
K members, so 4K rows), captured from a real epoch, timed eager and compiled
(``dynamic=False``, one graph for this shape) on one thread, side by side, with the
compile time (cold the first time on a machine, then from inductor's on-disk cache).

    python bench/objective_compile.py [--members 16] [--calls 30]

Populations do not compile yet: a compile per shape (halving changes it) costs more than
a small search's training; these figures say what a long search would gain.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from population_speed import CASES, configs

import trainables.croft as croft
from croft_search.trial.population import run_population


def captured_call(members: int) -> tuple[tuple, dict[str, Any]]:
    """The arguments of the first `objective_gradients` call of a population's epoch."""
    calls: list[tuple[tuple, dict[str, Any]]] = []
    original = croft.objective_gradients

    def capture(*args: Any, **kwargs: Any) -> Any:
        # Copies: the population steps its generator stack in place after this call.
        calls.append((tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args),
                      kwargs))  # fmt: skip
        return original(*args, **kwargs)

    croft.objective_gradients = capture
    try:
        run_population(configs({**CASES["croft (n_ctx 0)"], "epochs": 1}, members, "all"))
    finally:
        croft.objective_gradients = original
    return calls[0]


def per_call_ms(function: Any, args: tuple, kwargs: dict[str, Any], calls: int) -> float:
    function(*args, **kwargs)
    started = time.process_time()
    for _ in range(calls):
        function(*args, **kwargs)
    return 1000 * (time.process_time() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    call_args, call_kwargs = captured_call(args.members)
    eager = croft.objective_gradients
    started = time.perf_counter()
    compiled = torch.compile(eager, dynamic=False)
    compiled(*call_args, **call_kwargs)
    compile_seconds = time.perf_counter() - started
    eager_ms = per_call_ms(eager, call_args, call_kwargs, args.calls)
    compiled_ms = per_call_ms(compiled, call_args, call_kwargs, args.calls)
    rows = call_args[2].features.shape[0]
    print(f"objective_gradients, {rows} rows ({args.members} members x 4 domains), one thread:")
    print(f"eager {eager_ms:.2f} ms a call, compiled {compiled_ms:.2f} ms "
          f"({eager_ms / compiled_ms:.2f}x); compiling took {compile_seconds:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
