"""The ``workerpool`` command: the group, its logging, and every subcommand.

Each subcommand lives in its own module of this package and imports the service it starts
inside its function, so one service's dependencies never load in another's process (the
scheduler never imports the Docker SDK, a worker node never imports Flask). Failures follow
one convention (:mod:`cli.errors`).
"""

from __future__ import annotations

import logging

import click

from cli.account import account, register_pool
from cli.api import command as api_command
from cli.devnet import demo_command, devnet
from cli.errors import refusals
from cli.orders import order, orderbook
from cli.scheduler import command as scheduler_command
from cli.standalone import command as standalone_command
from cli.status import command as status_command
from cli.worker import command as worker_command


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Run an iExec workerpool: scheduler, worker nodes, status API, orders, accounts, devnet."""
    from pool.redact import RedactFilter

    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # URLs in log lines: scheme, host, port only
        handler.addFilter(RedactFilter())


@main.command("settings")
@click.option("--markdown", is_flag=True, help="Print the settings reference (docs/settings.md).")
def settings_command(markdown: bool) -> None:
    """Show the settings read from the environment (secrets masked), or their reference."""
    from pool.settings import Settings, markdown_table

    if markdown:
        click.echo(SETTINGS_DOC_HEADER + markdown_table())
        return
    with refusals():
        current = Settings.from_env()
    for name, value in current.public().items():
        click.echo(f"{name} = {value!r}")


SETTINGS_DOC_HEADER = """# Settings

Every service reads its settings from the environment. Names follow iexec-core and
iexec-worker where one exists; ours start with `WORKERPOOL_`. A missing or malformed value stops
start-up with a message naming the variable. This page is generated from `pool/settings.py`
(`workerpool settings --markdown > docs/settings.md`); a test keeps them in sync.

"""

for _command in (
    scheduler_command,
    worker_command,
    api_command,
    standalone_command,
    status_command,
    order,
    orderbook,
    devnet,
    demo_command,
    account,
    register_pool,
):
    main.add_command(_command)


if __name__ == "__main__":
    main()
