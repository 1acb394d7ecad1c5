"""Populations: K configurations of one method trained at once as one vectorised program.

Every member is built exactly as `run_trial` builds its trial (its own few-shot subset,
validation cut, initialisation and view draws, all from its own seed), then the members'
parameters are stacked into [K, ...] tensors (`torch.func.stack_module_state`) and each
training step is one call: the method's loss of every member by `functional_call` on
the stacks themselves where the method computes every member at once
(`Method.population_broadcasts`: CRoFT), else by
`torch.func.vmap` over one member's call; one backward for all of them (members share
no parameter, so the
gradient of the summed loss is each member's own), and one SGD update of the stacked
tensors with each member's learning rate, momentum and weight decay as a [K] tensor (a
matrix the method reads only in a row space, `Method.population_row_spaces`, steps there).
After training the members' weights go back into their modules, which `run_trial`'s own
evaluation scores, so member k's result is what ``run_trial(config_k)`` gives alone. A
member trained on several target domains (one split each, as `run_trial` trains them) is
one row per domain, and the domains' rows train as one program where they have one shape.

What may differ between members: the loop's ``lr``, ``momentum``, ``weight_decay``,
``warmup_lr`` and ``seed`` (`MEMBER_HPARAMS`), and the hyper-parameters a method reads as
tensors in its `Method.population_loss` (`Method.member_values`: CRoFT's lambda1, lambda2,
adapter ratios and generator learning rate, as long as none turns a term off). Everything
else (the method's other hyper-parameters, epochs, batch size, shots, the trial settings)
is one value per population (`population_key`): those change shapes or enter a method's
forward as Python numbers, which one vectorised program cannot hold per member.

Methods a population cannot train (`population_refusal` says why): CRoFT's reference and
custom implementations, which step optimisers inside the loss (its paper implementation
batches: its population loss runs the hand-written objective and its gradients under
vmap); DPLCLIP, whose domain means take `torch.unique` (a shape that depends on the
batch, which vmap cannot batch) and whose dropout draws from torch's global generator (a
vmapped draw is not the draw a member makes alone). The ``best_val`` checkpoint is not
written for populations yet.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from croft_search.errors import ConfigError
from croft_search.selection import objective
from croft_search.trial.evaluate import build_score, evaluate
from croft_search.trial.loop import TrainingDiverged, epoch_draws, learning_rate
from croft_search.trial.runner import (
    TrialResources,
    build_method,
    few_shot_train,
    few_shot_val,
    final_metrics,
    mean_rows,
    resources_for,
    score_for,
    split_config,
    target_domains,
    trial_result,
)
from trainables.base import Method, TrainData
from trainables.registry import get_method, resolve_hparams

# The hyper-parameters members of one population may set apart.
MEMBER_HPARAMS = ("lr", "momentum", "weight_decay", "warmup_lr", "seed")
# A member's result key: {rung: validation objective} at each rung it reached.
RUNG_OBJECTIVES = "rung_objectives"
# Rows of one training program at most, where a member's target domains join into fewer,
# larger programs: past this size a larger program gains little per row
# (bench/population_speed.py --target all --rows-per-program 1,64,128), and it only adds
# to a step's memory.
ROWS_PER_PROGRAM = 64


def population_key(config: Mapping[str, Any]) -> tuple:
    """Configs with equal keys can train as one population: everything but the
    `MEMBER_HPARAMS`, resolved (so a default and the same value written out agree)."""
    settings, overrides = split_config(config)
    method = get_method(settings["method"])
    hp = resolve_hparams(settings["method"], overrides, settings["recipe"])
    own = method.member_values(hp)
    shared = {k: v for k, v in hp.items() if k not in MEMBER_HPARAMS and k not in own}
    items = sorted((k, repr(v)) for k, v in {**settings, **shared}.items())
    return (*items, ("structure", repr(method.structure(hp))))


def population_refusal(config: Mapping[str, Any]) -> str | None:
    """Why configs like ``config`` cannot train as a population, or None."""
    settings, overrides = split_config(config)
    method = get_method(settings["method"])
    hp = resolve_hparams(settings["method"], overrides, settings["recipe"])
    if not method.batchable(hp):
        return f"method {method.name} with these hyper-parameters does not batch (see its file)"
    if settings["checkpoint"] != "last":
        return "the best_val checkpoint is not written for populations"
    return None


@dataclass
class _Member:
    settings: dict[str, Any]
    hp: dict[str, Any]
    score: str


@dataclass(frozen=True)
class Halving:
    """Successive halving inside a population: after ``rungs`` epochs each, the members
    still training keep the best 1 / ``reduction_factor`` of them (at least one) by their
    validation objective (mean over target domains, as a trial reports it); the others
    stop there, recorded with the validation metrics they reached.

    ``history``: the objectives earlier trials of the search reached at each rung. With
    one, a kept member must also reach ASHA's cutoff there, the top 1 / reduction_factor
    quantile of those (as Ray's ASHA computes it from the trials recorded before), so a
    small population's members are held to what the whole search has seen, not only to
    each other."""

    rungs: tuple[int, ...]
    reduction_factor: int
    history: dict[int, tuple[float, ...]] = field(default_factory=dict)

    def with_history(self, history: dict[int, tuple[float, ...]]) -> Halving:
        return replace(self, history=dict(history))

    def survivors(self, rung: int, objectives: dict[int, float]) -> list[int]:
        """The members (keys of ``objectives``, their values at ``rung``) that go on."""
        ranked = sorted(objectives, key=lambda k: -objectives[k])
        kept = ranked[: max(1, len(ranked) // self.reduction_factor)]
        earlier = self.history.get(rung, ())
        if earlier:
            cutoff = float(np.nanpercentile(earlier, 100 * (1 - 1 / self.reduction_factor)))
            kept = [k for k in kept if objectives[k] >= cutoff]
        return kept

    @classmethod
    def asha(cls, grace_period: int, reduction_factor: int, max_t: int) -> Halving:
        """The rungs ASHA would use: grace_period * reduction_factor^k below max_t."""
        rungs, rung = [], grace_period
        while rung < max_t:
            rungs.append(rung)
            rung *= reduction_factor
        return cls(tuple(rungs), reduction_factor)


def run_population(
    configs: Sequence[Mapping[str, Any]],
    resources: TrialResources | None = None,
    halving: Halving | None = None,
    rows_per_program: int = ROWS_PER_PROGRAM,
) -> list[dict[str, Any]]:
    """Train and evaluate the configs as one population; one `run_trial` result each, in
    order, or, for a member ``halving`` stopped, its validation metrics with ``status``
    "stopped"; each also with the objectives it reached at the rungs (`RUNG_OBJECTIVES`).
    The configs must share a `population_key` and pass `population_refusal`. A member's
    target domains train in programs of up to ``rows_per_program`` rows (or K, if more;
    1 trains each domain as a program of its own)."""
    if not configs:
        return []
    keys = {population_key(c) for c in configs}
    if len(keys) > 1:
        settings, overrides = split_config(configs[0])
        own = get_method(settings["method"]).member_values(
            resolve_hparams(settings["method"], overrides, settings["recipe"])
        )
        varying = ", ".join([*MEMBER_HPARAMS, *own])
        raise ConfigError(
            f"a population's members may differ only in {varying}"
            + (" (the method's own only where none turns zero)" if own else "")
        )
    refusal = population_refusal(configs[0])
    if refusal:
        raise ConfigError(f"cannot train as a population: {refusal}")
    members = []
    for config in configs:
        settings, overrides = split_config(config)
        hp = resolve_hparams(settings["method"], overrides, settings["recipe"])
        members.append(_Member(settings, hp, score_for(settings, get_method(settings["method"]))))
    first = members[0].settings
    targets = target_domains(first["dataset"], first["target_domain"])
    resources = resources or resources_for(first, targets)
    device = torch.device(first["device"])
    started = time.perf_counter()
    hps = [m.hp for m in members]
    runs = []
    for target in targets:
        splits = [few_shot_val(resources.splits[target], m.settings["val_shots"], m.hp["seed"])
                  for m in members]  # fmt: skip
        datas = [few_shot_train(split, m.hp["shots"], m.hp["seed"], m.settings["shots_per"])
                 for split, m in zip(splits, members, strict=True)]  # fmt: skip
        methods = [build_method(m.settings["method"], m.hp, resources, split, data, device)
                   for m, split, data in zip(members, splits, datas, strict=True)]  # fmt: skip
        runs.append((target, splits, datas, methods))
    stopped: dict[int, dict[str, Any]] = {}
    reached: list[dict[int, float]] = [{} for _ in members]
    rungs = () if halving is None else halving.rungs
    layout = _program_rows(runs, len(members), rows_per_program)
    programs = [population_epochs([runs[t][3][k] for t, k in rows],
                                  [runs[t][2][k] for t, k in rows],
                                  [hps[k] for _, k in rows], active, rungs)
                for rows, active in layout]  # fmt: skip
    live = list(range(len(members)))
    epochs_run = 0
    for epochs_run, _ in enumerate(_lockstep(programs), start=1):
        if halving is None or epochs_run not in halving.rungs:
            continue
        rows = {k: _validation(members[k], [(s[k], d[k], m[k]) for _, s, d, m in runs])
                for k in live}  # fmt: skip
        for k in live:
            reached[k][epochs_run] = rows[k]["objective"]
        kept = halving.survivors(epochs_run, {k: rows[k]["objective"] for k in live})
        for k in live:
            if k not in kept:
                stopped[k] = {**rows[k], "epochs_run": epochs_run, "status": "stopped"}
        live = [k for k in live if k in kept]
        for program_rows, active in layout:
            for row, (_, k) in enumerate(program_rows):
                active[row] = k in kept
    train_seconds = (time.perf_counter() - started) / len(members)
    results: list[dict[str, Any]] = []
    for k, member in enumerate(members):
        if k in stopped:
            # Its share of the program's time, as every member's: their sum is the
            # population's training time.
            results.append({**stopped[k], "train_seconds": train_seconds,
                            RUNG_OBJECTIVES: reached[k]})  # fmt: skip
            continue
        per_target = {
            target: final_metrics(methods[k], splits[k], datas[k], member.score,
                                  member.settings["eval_protocol"], member.hp["seed"])
            for target, splits, datas, methods in runs
        }  # fmt: skip
        result = trial_result(member.settings, member.score, per_target, epochs_run,
                              train_seconds, resources)  # fmt: skip
        results.append({**result, RUNG_OBJECTIVES: reached[k]})
    return results


def _validation(member: _Member, splits: Sequence[tuple]) -> dict[str, float]:
    """A member's validation metrics now, the mean over its target domains, and its
    objective: what a trial reports after an epoch."""
    rows = [evaluate(method, split, build_score(method, member.score, data), include_test=False)
            for split, data, method in splits]  # fmt: skip
    means = mean_rows(rows)
    means["objective"] = objective(means, "val", member.settings["objective_weight"])
    return means


def _lockstep(streams: list) -> Any:
    """Advance every program of a population one epoch at a time."""
    while True:
        rows = [next(stream, None) for stream in streams]
        if all(row is None for row in rows):
            return
        yield rows


def _program_rows(
    runs: Sequence[tuple], size: int, rows_per_program: int
) -> list[tuple[list[tuple[int, int]], torch.Tensor]]:
    """How the (target domain, member) pairs of ``runs`` train: as programs, each its
    rows and their `population_epochs` ``active`` flags. A member's target domains are
    trainings of one shape on different data, so they join one program where their
    training sets have one shape: a population of K members over four target domains
    then runs one program of 4K rows rather than four of K (the survivors of successive
    halving too), up to ``rows_per_program`` rows or K, whichever is more."""
    shapes: dict[tuple, list[tuple[int, int]]] = {}
    for t, (_, _, datas, _) in enumerate(runs):
        for k in range(size):
            shapes.setdefault(tuple(datas[k].views.shape), []).append((t, k))
    # Whole target domains per program: K rows each.
    per_program = max(1, max(size, rows_per_program) // size) * size
    programs = []
    for rows in shapes.values():
        for first in range(0, len(rows), per_program):
            chunk = rows[first : first + per_program]
            programs.append((chunk, torch.ones(len(chunk), dtype=torch.bool)))
    return programs


def train_population(
    methods: Sequence[Method], datas: Sequence[TrainData], hps: Sequence[dict[str, Any]]
) -> list[list[dict[str, float]]]:
    """Train ``methods`` (one method class, one shape) in place as one program, each on its
    own data with its own hyper-parameters. Returns each member's log, one row per epoch
    as `train_epochs` yields it (epoch, lr, the mean of each loss part)."""
    history: list[list[dict[str, float]]] = [[] for _ in methods]
    active = torch.ones(len(methods), dtype=torch.bool)
    for rows in population_epochs(methods, datas, hps, active):
        for log, row in zip(history, rows, strict=True):
            if row is not None:
                log.append(row)
    return history


def population_epochs(
    methods: Sequence[Method],
    datas: Sequence[TrainData],
    hps: Sequence[dict[str, Any]],
    active: torch.Tensor,
    read_after: Collection[int] | None = None,
) -> Iterator[list[dict[str, float] | None]]:
    """Train ``methods`` (one method class, one shape) in place as one program, each on its
    own data with its own hyper-parameters, yielding every member's log row after each
    epoch (as `train_epochs` yields it). The members' modules hold their weights of that
    moment after the epoch counts in ``read_after`` (every epoch when None) and after the
    last: writing K members back costs more than a small model's epoch. A member whose
    ``active`` entry the caller sets False after such an epoch leaves the program: its
    module keeps the weights it had then, its rows are None from then on, and later
    epochs cost only the members still training."""
    for method, hp in zip(methods, hps, strict=True):
        torch.manual_seed(hp["seed"])  # as train_epochs: setup may draw random numbers
        method.setup()
    hp0 = hps[0]
    optimised = {id(p) for p in methods[0].trainable_parameters()}
    names = [n for n, p in methods[0].named_parameters() if id(p) in optimised]
    if not names or hp0["epochs"] == 0 or len(datas[0]) == 0:
        for method in methods:
            method.eval()
        return
    params, buffers = stack_module_state(list(methods))
    like = params[names[0]].detach()
    broadcasts = methods[0].population_broadcasts()
    spaces = _row_spaces(methods, names, like) if broadcasts and hp0["optimizer"] == "sgd" else {}
    trained = {n: params[n] for n in names if n not in spaces}
    frozen = {n: p.detach() for n, p in params.items() if n not in names}
    device = like.device
    stepper = _StackedOptimizer(trained, hps, {n: (params[n], rows) for n, rows in spaces.items()})
    # The first member's module runs every member's step: functional_call swaps the
    # stacked tensors (or, under vmap, their slices) in for its own; a row-space
    # parameter is not among them (the loss reads its product from the values).
    step = _member_loss(methods[0])
    values = _stacked_values(methods, hps, like)
    if broadcasts:
        values = {key: value.view(-1, 1, 1) for key, value in values.items()}
    else:
        step = vmap(step, randomness="error")
    generators = [torch.Generator().manual_seed(hp["seed"]) for hp in hps]
    members = list(range(len(methods)))  # whom the stacks' rows hold, in order
    pool = _TrainingPool.of(methods, datas, device)
    n, n_views = datas[0].views.shape[:2]
    for epoch in range(hp0["epochs"]):
        if not all(bool(active[k]) for k in members):
            # Halving stopped some: the stacks keep the others' rows only.
            kept = [row for row, k in enumerate(members) if active[k]]
            members = [members[row] for row in kept]
            if not members:
                return
            index = torch.tensor(kept, device=device)
            trained = stepper.select(index)
            frozen, buffers, values = ({name: value[index] for name, value in stack.items()}
                                       for stack in (frozen, buffers, values))  # fmt: skip
        rates = [learning_rate(epoch, hps[k]) for k in members]
        stepper.set_lr(rates)
        methods[0].train()  # the module every member's step runs through
        totals: dict[str, torch.Tensor] = {}
        steps = 0
        draws = [epoch_draws(generators[k], n, n_views, epoch, hp0) for k in members]
        orders = torch.stack([order for order, _ in draws]).to(device)
        views = torch.stack([view for _, view in draws]).to(device)
        rows_of = torch.tensor(members, device=device)
        for start in range(0, orders.shape[1], hp0["batch_size"]):
            batch = slice(start, start + hp0["batch_size"])
            features, labels, domains = pool.batch(rows_of, orders[:, batch], views[:, batch])
            # vmap has no batching rule for the fused CPU attention kernel and would loop over
            # the members in a prompt learner's text encoder; the math kernel batches.
            with nullcontext() if broadcasts else sdpa_kernel([SDPBackend.MATH]):
                products = stepper.products()  # the row-space parameters as R W^T
                losses, parts, updates, grads = step(trained, frozen, buffers,
                                                     {**values, **products},
                                                     features, labels, domains)  # fmt: skip
            finite = torch.isfinite(losses.detach())
            if not bool(finite.all()):
                bad = int(torch.nonzero(~finite)[0])
                loss, member = float(losses[bad].detach()), members[bad]
                raise TrainingDiverged(f"member {member}: loss became {loss} in epoch {epoch}")
            by_autograd = [name for name in trained if name not in grads]
            if by_autograd:
                found = torch.autograd.grad(losses.sum(), [trained[n] for n in by_autograd])
                grads = {**grads, **dict(zip(by_autograd, found, strict=True))}
            missing = [name for name in spaces if name not in grads]
            if missing:
                raise RuntimeError(f"population_loss returned no gradient for the row-space "
                                   f"parameter(s) {', '.join(missing)}")  # fmt: skip
            stepper.step(grads)
            for name, value in updates.items():
                # State the step moves outside the optimiser (CRoFT's generator).
                (frozen if name in frozen else buffers)[name] = value.detach()
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value.detach().double()
            steps += 1
        if read_after is None or epoch + 1 in read_after or epoch + 1 == hp0["epochs"]:
            state = {**trained, **frozen, **buffers, **stepper.dense_row_spaces()}
            _write_back([methods[k] for k in members], state)
        if members[0] != 0:
            methods[0].eval()  # stopped: its module only ran the others' steps
        logs: list[dict[str, float] | None] = [None] * len(methods)
        for row, k in enumerate(members):
            means = {key: float(value[row]) / steps for key, value in totals.items()}
            logs[k] = {"epoch": epoch, "lr": rates[row], **means}
        yield logs


@dataclass
class _TrainingPool:
    """Every member's training set on the device in one tensor, so that a step gathers all
    members' batches in one indexing operation, not K (on a GPU, K kernel launches and
    index copies a step): ``views`` [U, V, d] the rows any member uses, once each where the
    members' subsets come from one source (`TrainData.rows`), ``at`` [K, n] where each
    member's rows are in it, ``targets`` and ``domains`` [K, n]."""

    views: torch.Tensor
    at: torch.Tensor
    targets: torch.Tensor
    domains: torch.Tensor

    @classmethod
    def of(cls, methods: Sequence[Method], datas: Sequence[TrainData],
           device: torch.device) -> _TrainingPool:  # fmt: skip
        if len({tuple(d.views.shape) for d in datas}) != 1:
            # Members share shots, dataset and target: their subsets differ in rows only.
            raise RuntimeError("a population's members need training sets of one shape")
        if all(d.source is not None and d.rows is not None for d in datas):
            views, at = cls._shared_rows(datas)
        else:
            views = torch.cat([d.views for d in datas])
            at = torch.arange(len(views)).view(len(datas), -1)
        every = torch.arange(len(datas[0]))
        targets = [m.targets(d.labels, every) for m, d in zip(methods, datas, strict=True)]
        return cls(
            views.to(device),
            at.to(device),
            torch.stack([target.to(device) for target in targets]),
            torch.stack([d.domains.to(device) for d in datas]),
        )

    @staticmethod
    def _shared_rows(datas: Sequence[TrainData]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows the members' subsets use, once each per source (members of one target
        domain share its split's rows; a program over several target domains holds each
        domain's), and where each member's rows are among them, [K, n]."""
        views, at = [], torch.empty(len(datas), len(datas[0]), dtype=torch.long)
        sources: dict[int, list[int]] = {}
        for k, data in enumerate(datas):
            sources.setdefault(id(data.source), []).append(k)
        offset = 0
        for ks in sources.values():
            rows = torch.stack([datas[k].rows for k in ks])
            used, where = torch.unique(rows, return_inverse=True)
            views.append(datas[ks[0]].source[used])
            at[ks] = where + offset
            offset += len(used)
        return torch.cat(views), at

    def batch(self, members: torch.Tensor, rows: torch.Tensor, views: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Features [K', B, d], targets and domains [K', B] of the members ``members``
        [K'] (rows of ``at``), each at its ``rows`` [K', B] and ``views`` [K', B]
        (`epoch_draws`)."""
        # index_select of flat rows is several times faster than indexing by three tensors.
        _, n_views, dim = self.views.shape
        members = members[:, None]
        flat = (self.at[members, rows] * n_views + views).flatten()
        features = self.views.view(-1, dim).index_select(0, flat).view(*rows.shape, dim)
        return features, self.targets[members, rows], self.domains[members, rows]


def _row_spaces(methods: Sequence[Method], names: Sequence[str], like: torch.Tensor
                ) -> dict[str, torch.Tensor]:  # fmt: skip
    """Each trained parameter the methods keep in a row space
    (`Method.population_row_spaces`), with the members' rows R stacked, [K, r, in]."""
    own = [method.population_row_spaces() for method in methods]
    return {name: torch.stack([rows[name] for rows in own]).to(like)
            for name in own[0] if name in names}  # fmt: skip


def _write_back(methods: Sequence[Method], state: Mapping[str, torch.Tensor]) -> None:
    """Row k of the stacked state into ``methods[k]``, set to evaluation."""
    with torch.no_grad():
        for k, method in enumerate(methods):
            own = dict(method.named_parameters()) | dict(method.named_buffers())
            for name, value in state.items():
                own[name].copy_(value[k])
            method.eval()


def _stacked_values(methods: Sequence[Method], hps: Sequence[dict[str, Any]],
                    like: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
    """Each `Method.member_values` key as a [K] tensor of the members' values, of the
    dtype and on the device of ``like``."""
    rows = [type(m).member_values(hp) for m, hp in zip(methods, hps, strict=True)]
    return {key: like.new_tensor([row[key] for row in rows]) for key in rows[0]}


def _member_loss(base: Method):
    """One member's `Method.population_loss` as a function of its parameters, buffers
    and member values, for `vmap`."""

    def loss(trained, frozen, buffers, values, features, labels, domains):  # noqa: ANN001, ANN202
        state = {f"method.{k}": v for k, v in {**trained, **frozen, **buffers}.items()}
        body = _Call(base, lambda: base.population_loss(values, features, labels, domains))
        return functional_call(body, state, ())

    return loss


class _Call(torch.nn.Module):
    """``functional_call`` substitutes state into a module's forward; this forwards to a
    closure over the method, whose tensors are then the substituted ones."""

    def __init__(self, method: Method, body: Any) -> None:
        super().__init__()
        self.method = method
        self.body = body

    def forward(self) -> Any:
        return self.body()


@dataclass
class _RowSpace:
    """A stacked trained matrix W [K, out, in] as SGD keeps it when every gradient is some
    [K, out, r] matrix times fixed rows R [K, r, in] (`Method.population_row_spaces`):
    W = c W0 + A R and its momentum buffer b W0 + M R, with c, b [K, 1, 1] and A, M
    [K, out, r], so a step costs [out, r] arithmetic where the dense one costs [out, in]
    (and the loss reads R W^T from an [r, r] product)."""

    start: torch.Tensor  # W0
    rows: torch.Tensor  # R
    start_product: torch.Tensor  # R W0^T, [K, r, out]
    gram: torch.Tensor  # R R^T, [K, r, r]
    scale: torch.Tensor  # c
    factor: torch.Tensor  # A
    momentum_scale: torch.Tensor | None = None  # b, after the first step
    momentum_factor: torch.Tensor | None = None  # M

    @classmethod
    def of(cls, start: torch.Tensor, rows: torch.Tensor) -> _RowSpace:
        start = start.detach()
        return cls(start, rows, rows @ start.mT, rows @ rows.mT,
                   start.new_ones(len(start), 1, 1),
                   start.new_zeros(*start.shape[:-1], rows.shape[-2]))  # fmt: skip

    def product(self) -> torch.Tensor:
        """R W^T = c R W0^T + (R R^T) A^T."""
        return torch.baddbmm(self.start_product * self.scale, self.gram, self.factor.mT)

    def dense(self) -> torch.Tensor:
        """W itself, c W0 + A R."""
        return torch.baddbmm(self.start * self.scale, self.factor, self.rows)

    def step(self, grad_product: torch.Tensor, lr: torch.Tensor, wd: torch.Tensor,
             momentum: torch.Tensor) -> None:  # fmt: skip
        """`_StackedOptimizer`'s SGD step from the loss's gradient with respect to R W^T,
        whose transpose times R is W's: d = g + wd W, b = m b + d (d at first), W -= lr b,
        on the scale and the factor apart."""
        scale_step = wd * self.scale
        factor_step = torch.addcmul(grad_product.mT, wd, self.factor)
        if self.momentum_scale is not None:
            scale_step = torch.addcmul(scale_step, momentum, self.momentum_scale)
            factor_step = torch.addcmul(factor_step, momentum, self.momentum_factor)
        self.momentum_scale, self.momentum_factor = scale_step, factor_step
        self.scale = torch.addcmul(self.scale, lr, scale_step, value=-1.0)
        self.factor = torch.addcmul(self.factor, lr, factor_step, value=-1.0)

    def select(self, index: torch.Tensor) -> _RowSpace:
        return _RowSpace(*(None if value is None else value[index]
                           for value in vars(self).values()))  # fmt: skip


class _StackedOptimizer:
    """The loop's optimiser (`croft_search.trial.loop.build_optimizer`) on stacked
    parameters, each member with its own learning rate, momentum and weight decay.

    SGD as torch.optim.SGD without dampening or Nesterov: d = g + wd p; the momentum buffer
    starts as d, then b = m b + d; p -= lr b (p -= lr d without momentum). AdamW as
    torch.optim.AdamW with its default betas and eps: p *= 1 - lr wd; the moments
    m, v are updated; p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)."""

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        hps: Sequence[dict[str, Any]],
        row_spaces: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        """``params``: the dense stacked parameters; ``row_spaces``: {name: (its stacked
        start, its rows R)} for those kept as `_RowSpace` (SGD only)."""
        self.params = params
        self.kind = hps[0]["optimizer"]
        self.row_spaces = {name: _RowSpace.of(start, rows)
                           for name, (start, rows) in (row_spaces or {}).items()}  # fmt: skip
        if self.row_spaces and self.kind != "sgd":
            raise ValueError("row-space parameters train by SGD only")
        # Dtype and device of the parameters: a [K] tensor on the CPU cannot scale CUDA ones.
        starts = [start for start, _ in (row_spaces or {}).values()]
        like = next(iter([*params.values(), *starts])).detach()
        self.momentum = like.new_tensor([hp["momentum"] for hp in hps])
        self.weight_decay = like.new_tensor([hp["weight_decay"] for hp in hps])
        self.lr = like.new_zeros(len(hps))
        self.state: dict[str, list[torch.Tensor]] = {}
        self.steps = 0

    def set_lr(self, rates: Sequence[float]) -> None:
        self.lr = self.lr.new_tensor(rates)

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keep the members at ``index`` (a tensor of rows): their parameters, per-member
        settings and optimiser state. Returns the new stacked parameters."""
        self.params = {name: param.detach()[index].requires_grad_(param.requires_grad)
                       for name, param in self.params.items()}  # fmt: skip
        self.momentum, self.weight_decay, self.lr = (
            values[index] for values in (self.momentum, self.weight_decay, self.lr)
        )
        self.state = {name: [buffer[index] for buffer in buffers]
                      for name, buffers in self.state.items()}  # fmt: skip
        self.row_spaces = {name: space.select(index) for name, space in self.row_spaces.items()}
        return self.params

    def products(self) -> dict[str, torch.Tensor]:
        """Each row-space parameter as the loss reads it, R W^T."""
        return {name: space.product() for name, space in self.row_spaces.items()}

    def dense_row_spaces(self) -> dict[str, torch.Tensor]:
        """Each row-space parameter as the dense W, for the members' modules."""
        return {name: space.dense() for name, space in self.row_spaces.items()}

    def step(self, grads: Mapping[str, torch.Tensor]) -> None:
        self.steps += 1
        with torch.no_grad():
            for name, param in self.params.items():
                shape = (-1,) + (1,) * (param.dim() - 1)
                lr, wd = self.lr.view(shape), self.weight_decay.view(shape)
                if self.kind == "adamw":
                    self._adamw(name, param, grads[name], lr, wd)
                else:
                    self._sgd(name, param, grads[name], lr, wd, self.momentum.view(shape))
            for name, space in self.row_spaces.items():
                space.step(grads[name], *(v.view(-1, 1, 1) for v in
                                          (self.lr, self.weight_decay, self.momentum)))  # fmt: skip

    def _sgd(self, name: str, param: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor,
             wd: torch.Tensor, momentum: torch.Tensor) -> None:  # fmt: skip
        # One fused pass each: on a population's [K, d, d] stacks every pass over memory
        # costs about what a [K, B, d] x [K, d, d] product does. A member without momentum
        # keeps b = 0 * b + d = d, which is torch's step without a buffer.
        d = torch.addcmul(grad, wd, param)
        if name in self.state:
            buffer = torch.addcmul(d, momentum, self.state[name][0], out=self.state[name][0])
        else:
            buffer = d
            self.state[name] = [buffer]
        param.addcmul_(lr, buffer, value=-1.0)

    def _adamw(self, name: str, param: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor,
               wd: torch.Tensor) -> None:  # fmt: skip
        beta1, beta2 = self.BETAS
        if name not in self.state:
            self.state[name] = [torch.zeros_like(param), torch.zeros_like(param)]
        first, second = self.state[name]
        param.mul_(1 - lr * wd)
        first.lerp_(grad, 1 - beta1)
        second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        correction1 = 1 - beta1**self.steps
        correction2 = (1 - beta2**self.steps) ** 0.5
        denominator = (second.sqrt() / correction2).add_(self.EPS)
        param.sub_((lr / correction1) * first / denominator)
