"""The method registry. Every module in the `trainables` package that defines a method
registers it with `@register_method`; adding a method is adding one such file."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from croft_search.contract import RECIPES, RESERVED_KEYS
from croft_search.errors import ConfigError
from trainables.base import LOOP_HPARAMS, HParam, Method

_METHODS: dict[str, type[Method]] = {}
_discovered = False


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    name = cls.name
    if name in _METHODS and _METHODS[name] is not cls:
        raise ConfigError(f"method name {name!r} is registered twice")
    clash = sorted(set(cls.hparams) & set(RESERVED_KEYS))
    if clash:
        raise ConfigError(
            f"method {name} declares hyper-parameter(s) {', '.join(clash)}, names of trial "
            "settings or space keys (croft_search.contract.RESERVED_KEYS); rename them"
        )
    _METHODS[name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    import trainables

    # Every module: a method file registers its method on import, the others (base, text,
    # a method's helpers) register nothing, so no list of which is which can go stale.
    for module in pkgutil.iter_modules(trainables.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"trainables.{module.name}")
    _discovered = True


def method_names() -> list[str]:
    _discover()
    return sorted(_METHODS)


def get_method(name: str) -> type[Method]:
    _discover()
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}; known methods: {', '.join(method_names())}"
        ) from None


def hparam_specs(method: str) -> dict[str, HParam]:
    """Every hyper-parameter of ``method``: the loop's, overridden or extended by its own."""
    return {**LOOP_HPARAMS, **get_method(method).hparams}


def resolve_hparams(
    method: str, overrides: dict[str, Any] | None = None, recipe: str = "ours"
) -> dict[str, Any]:
    """Defaults of ``method`` updated with ``overrides``, each checked for name, type and
    range; an unknown key is an error (a typo must not silently fall back to a default).
    Under ``recipe="reference"`` the method's ``reference_recipe`` fills the keys
    ``overrides`` leaves unset (`croft_search.contract.RECIPES`)."""
    specs = hparam_specs(method)
    if recipe not in RECIPES:
        raise ConfigError(f"recipe={recipe!r} is not allowed; expected one of {', '.join(RECIPES)}")
    preset = get_method(method).reference_recipe if recipe == "reference" else {}
    overrides = {**preset, **(overrides or {})}
    unknown = sorted(set(overrides) - set(specs))
    if unknown:
        raise ConfigError(
            f"unknown hyper-parameter(s) {', '.join(unknown)} for method {method}; "
            f"known: {', '.join(sorted(specs))}"
        )
    resolved = {key: specs[key].coerce(key, value) for key, value in overrides.items()}
    hp = {key: resolved.get(key, spec.default) for key, spec in specs.items()}
    return get_method(method).resolve(hp, set(overrides))
