"""User-facing errors: one actionable line each, a non-zero exit and no traceback."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar


class CroftError(Exception):
    """An error caused by the user's input or environment, explained in one line."""

    exit_code = 2


class DataError(CroftError):
    """A dataset, split file or image is missing or malformed."""


class ConfigError(CroftError):
    """An unknown name, bad value or invalid option."""


class BackboneError(CroftError):
    """A backbone cannot be loaded (unknown name, missing weights, no network)."""


F = TypeVar("F", bound=Callable[..., object])


def exit_on_user_error(main: F) -> F:
    """Wrap a CLI entry point so a CroftError prints `error: ...` and exits non-zero."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except CroftError as err:
            message = " ".join(str(err).split())
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors (a missing flag, a value outside its choices) in the
    same one-line form as every other user error, instead of the usage block first."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)
