"""How every ``workerpool`` command fails: one line on stderr, ``error: <what>``, and an exit
status that says what kind of failure it was.

| status | meaning |
|---|---|
| 0 | done |
| 1 | refused: bad settings or input, a failed preflight check, the chain said no |
| 2 | wrong usage of the command: an unknown option, a missing argument (click's own) |
| 3 | something the command reads does not answer (the status API, the devnet) |

Status 1 is :class:`CommandError`, 3 is :class:`Unreachable`. The errors the project raises
on purpose (:data:`REFUSALS`, through :func:`refusals`) become a :class:`CommandError`; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import click

from poco.errors import PocoError
from poco.orders import OrderError
from poco.tags import TagError
from pool.settings import SettingsError


class CommandError(click.ClickException):
    """The command was refused: exit status 1."""

    exit_code = 1

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=file is None, file=file)


class Unreachable(CommandError):
    """A service the command reads does not answer: exit status 3."""

    exit_code = 3


# the refusals every command may meet: a wrong setting, a protocol or chain error, a bad tag
REFUSALS: tuple[type[Exception], ...] = (SettingsError, PocoError, OrderError, TagError)


@contextmanager
def refusals(*more: type[Exception], prefix: str = "") -> Iterator[None]:
    """Turn :data:`REFUSALS` (and ``more``) raised inside into a :class:`CommandError`."""
    try:
        yield
    except (*REFUSALS, *more) as exc:
        raise CommandError(f"{prefix}{exc}") from exc
