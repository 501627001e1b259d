"""The command line's parser: jsonargparse's, with a parse error said in one line.

jsonargparse prints the whole usage (dozens of lines) before a parse error, and jsonargparse 4.41 (the newest
LitGPT 0.5 accepts) words a value outside a ``Literal`` of strings as "Cannot take a Union of no types." (it
builds ``Union[()]`` from the literal's non-string members). ``OneLineErrorParser`` prints ``error: <message>``
alone and exits 2, as the checks of ``litgpt_plop.commands.inputs`` do, and names the allowed values of a fixed-choice option.
"""

from __future__ import annotations

import re
import sys
import typing
from typing import Any, NoReturn

from jsonargparse import ArgumentParser
from jsonargparse._common import debug_mode_active

_KEY = re.compile(r'^Parser key "([^"]+)":\s*')


class OneLineErrorParser(ArgumentParser):
    """``jsonargparse.ArgumentParser`` whose parse errors are one line on stderr and exit status 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debug_mode_active():  # jsonargparse is trying alternatives, or debugging
            super().error(message, ex)
        command = self.prog.replace(" [options]", "")
        print(f"error: {self.clear_message(message)} (`{command} --help` lists the options)", file=sys.stderr)
        self.exit(2)

    def clear_message(self, message: str) -> str:
        """``--<key> must be one of ...`` for a fixed-choice option, ``--<key> expects <type>`` for a value no member
        of a ``Union`` takes (jsonargparse lists each member's failure on its own lines), else the message itself."""
        key = _KEY.match(message)
        if key:
            dest, typehint = key.group(1), self._typehint_of(key.group(1))
            got = option_value(dest, sys.argv[1:])
            given = f", got {got!r}" if got is not None else ""
            if choices := literal_choices(typehint):
                return f"--{dest} must be one of {', '.join(map(repr, choices))}{given}"
            if typehint is not None and "Does not validate against any of the Union subtypes" in message:
                return f"--{dest} expects {str(typehint).replace('typing.', '')}{given}"
        lines = [line.strip() for line in message.strip().splitlines()]
        return " ".join(lines) if len(lines) <= 4 else message.strip()

    def _typehint_of(self, dest: str) -> Any:
        for action in self._actions:
            if action.dest == dest:
                return getattr(action, "_typehint", None)
        return None


def literal_choices(typehint: Any) -> tuple[Any, ...] | None:
    """The values of a ``Literal`` (or an ``Optional`` of one), else None."""
    if typing.get_origin(typehint) is typing.Literal:
        return typing.get_args(typehint)
    if typing.get_origin(typehint) is typing.Union:
        literals = [arg for arg in typing.get_args(typehint) if typing.get_origin(arg) is typing.Literal]
        if len(literals) == 1:
            return typing.get_args(literals[0])
    return None


def option_value(dest: str, argv: list[str]) -> str | None:
    """The value given to ``--dest`` on the command line (the last one), if it was given there."""
    value = None
    for i, arg in enumerate(argv):
        if arg == f"--{dest}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"--{dest}="):
            value = arg.split("=", 1)[1]
    return value
