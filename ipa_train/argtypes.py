"""Command-line plumbing: one-line argparse errors and range-checked number types."""

from __future__ import annotations

import argparse
import math
import typing

from .errors import IPAKitError


def one_line(text: str) -> str:
    """A message as one printable line: newlines and control characters (terminal escapes) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text).strip())


class Parser(argparse.ArgumentParser):
    """argparse with the kit's error contract: one line on stderr, exit status 2 (no usage block)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {self.prog}: {one_line(message)} (see {self.prog} --help)\n")


def int_range(lo: int, hi: int) -> typing.Callable[[str], int]:
    """An argparse type: a whole number in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number from {lo} to {hi}, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected a whole number from {lo} to {hi}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def float_range(lo: float, hi: float) -> typing.Callable[[str], float]:
    """An argparse type: a finite number in [lo, hi] (NaN and infinity refused)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number from {lo:g} to {hi:g}, got {text!r}") from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected a finite number from {lo:g} to {hi:g}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


def check_range(flag: str, value: typing.Any, lo: float, hi: float) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value) or not lo <= value <= hi:
        raise IPAKitError(f"{flag} must be from {lo:g} to {hi:g}, got {value}")
