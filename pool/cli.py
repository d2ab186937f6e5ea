"""The ``workerpool`` command.

Service commands (``scheduler``, ``worker``, ``api``) live in their own packages and are loaded
by module name only when invoked, so ``pool`` never imports a service at import time and one
service's dependencies never load in another's process.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from pool import devnet as devnet_mod

DIR_OPTION = click.option(
    "--dir",
    "directory",
    default=".devnet",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the devnet keeps devnet.json, the chain state and anvil's log.",
)

# command name -> "module:attribute" of a click command, imported on first use.
LAZY_COMMANDS: dict[str, str] = {
    "scheduler": "scheduler.cli:command",
    "worker": "workers.cli:command",
    "order": "pool.order_cli:order",
    "orderbook": "pool.order_cli:orderbook",
    "api": "api.cli:command",
    "status": "pool.status_cli:command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            module_name, attr = LAZY_COMMANDS[cmd_name].split(":")
            command: click.Command = getattr(importlib.import_module(module_name), attr)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Run an iExec workerpool: scheduler, worker nodes, status API, orders, devnet."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command("settings")
@click.option("--markdown", is_flag=True, help="Print the settings reference (docs/settings.md).")
def settings_command(markdown: bool) -> None:
    """Show the settings read from the environment (secrets masked), or their reference."""
    from pool.settings import Settings, SettingsError, markdown_table

    if markdown:
        click.echo(SETTINGS_DOC_HEADER + markdown_table())
        return
    try:
        current = Settings.from_env()
    except SettingsError as exc:
        _fail(str(exc))
        return
    for name, value in current.public().items():
        click.echo(f"{name} = {value!r}")


SETTINGS_DOC_HEADER = """# Settings

Every service reads its settings from the environment. Names follow iexec-core and
iexec-worker where one exists; ours start with `WORKERPOOL_`. A missing or malformed value stops
start-up with a message naming the variable. This page is generated from `pool/settings.py`
(`workerpool settings --markdown > docs/settings.md`); a test keeps them in sync.

"""


@main.command("standalone")
@click.option(
    "--results-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of the local result publisher served under /results (default: a temp dir).",
)
def standalone_command(results_dir: Path | None) -> None:
    """Scheduler + status API in one process (embedded mode: MONGO_URL=mongomock://)."""
    import tempfile

    from pool import standalone
    from pool.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        _fail(str(exc))
        return
    directory = results_dir or Path(
        settings.local_results_dir or Path(tempfile.gettempdir()) / "workerpool-results"
    )
    directory.mkdir(parents=True, exist_ok=True)
    standalone.run(settings, directory)


@main.command("demo")
@DIR_OPTION
@click.option("--api", "api_url", default="http://127.0.0.1:18090", show_default=True)
@click.option("--volume", default=3, show_default=True, type=click.IntRange(1))
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait.")
def demo_command(directory: Path, api_url: str, volume: int, timeout: float) -> None:
    """Match a sample deal on the devnet and follow it to COMPLETED (see ops/demo)."""
    from pool.demo import run_demo

    sys.exit(run_demo(directory, api_url.rstrip("/"), volume, timeout))


@main.group()
def devnet() -> None:
    """A local chain (anvil) with the real PoCo v6.1.0 contracts, for development and tests."""


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@devnet.command("up")
@DIR_OPTION
@click.option("--port", default=8545, show_default=True, help="anvil port on 127.0.0.1.")
def devnet_up(directory: Path, port: int) -> None:
    """Start anvil, deploy PoCo, create the pool and sample apps (idempotent)."""
    try:
        info, seconds, deployed = devnet_mod.up(directory, port)
    except devnet_mod.DevnetError as exc:
        _fail(str(exc))
        return
    what = "deployed PoCo and provisioned" if deployed else "resumed"
    click.echo(f"devnet up ({what}) in {seconds:.1f}s: {info['rpc_url']} chain {info['chain_id']}")
    click.echo(f"  hub        {info['hub']}")
    click.echo(f"  workerpool {info['workerpool']}")
    for name, app in info["apps"].items():
        click.echo(f"  app {name:<10} {app['address']}  {app['image']}")
    click.echo(f"  wrote {directory / 'devnet.json'} (its keys are PUBLIC TEST KEYS)")


@devnet.command("down")
@DIR_OPTION
def devnet_down(directory: Path) -> None:
    """Stop the anvil this directory started (its state is kept for the next `up`)."""
    stopped = devnet_mod.Devnet(directory).stop()
    click.echo("devnet stopped" if stopped else "devnet was not running")


@devnet.command("status")
@DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def devnet_status(directory: Path, as_json: bool) -> None:
    """Say whether the devnet runs, its head block and whether PoCo is deployed."""
    info: dict[str, Any] = devnet_mod.status(directory)
    if as_json:
        click.echo(json.dumps(info))
        return
    if not info["configured"]:
        click.echo(f"no devnet in {directory} (run: workerpool devnet up)")
        sys.exit(3)
    state = "running" if info.get("answers") else "stopped"
    click.echo(f"devnet {state} pid={info['pid']} {info['rpc_url']}")
    if info.get("answers"):
        click.echo(f"  head block {info['block']}, PoCo deployed: {info['poco_deployed']}")
    if not info.get("answers"):
        sys.exit(3)


@devnet.command("env")
@DIR_OPTION
@click.option("--worker", type=int, default=None, help="Add worker N's wallet (0-based).")
@click.option(
    "--mnemonic",
    is_flag=True,
    help="Add the worker mnemonic settings instead: scaled nodes lease distinct indexes.",
)
def devnet_env(directory: Path, worker: int | None, mnemonic: bool) -> None:
    """Print `export` lines pointing the services at the devnet: eval "$(workerpool devnet env)"."""
    info = devnet_mod.Devnet(directory).load()
    if info is None:
        _fail(f"no devnet in {directory} (run: workerpool devnet up)")
        return
    try:
        lines = devnet_mod.env_lines(info, worker, mnemonic)
    except devnet_mod.DevnetError as exc:
        _fail(str(exc))
        return
    click.echo("\n".join(lines))


@devnet.command("deal")
@DIR_OPTION
@click.option("--app", "app_name", default="echo", show_default=True, help="Sample app name.")
@click.option("--volume", default=1, show_default=True, type=click.IntRange(1))
@click.option("--trust", default=1, show_default=True, type=click.IntRange(0))
@click.option("--category", default=0, show_default=True, type=click.IntRange(0))
@click.option("--tag", default="standard", show_default=True, help="Tag names or bytes32.")
@click.option("--args", "app_args", default=None, help="iexec_args of the deal params.")
@click.option("--input-file", "input_files", multiple=True, help="iexec_input_files URL.")
@click.option("--price", default=0, show_default=True, help="Workerpool price in nRLC.")
def devnet_deal(
    directory: Path,
    app_name: str,
    volume: int,
    trust: int,
    category: int,
    tag: str,
    app_args: str | None,
    input_files: tuple[str, ...],
    price: int,
) -> None:
    """Buy the pool's capacity as the devnet requester: sign and match a deal."""
    from poco.chain import ChainClient
    from poco.errors import PocoError
    from poco.requester import deal_params, match_deal
    from poco.tags import encode_tag

    info = devnet_mod.Devnet(directory).load()
    if info is None:
        _fail(f"no devnet in {directory} (run: workerpool devnet up)")
        return
    if app_name not in info["apps"]:
        _fail(f"unknown app {app_name!r}; devnet apps: {', '.join(info['apps'])}")
    accounts = info["accounts"]
    client = ChainClient(info["rpc_url"], info["hub"])
    try:
        deal = match_deal(
            client,
            app=info["apps"][app_name]["address"],
            app_owner_key=accounts["app_provider"]["private_key"],
            workerpool=info["workerpool"],
            scheduler_key=accounts["scheduler"]["private_key"],
            requester_key=accounts["requester"]["private_key"],
            volume=volume,
            trust=trust,
            category=category,
            tag=encode_tag(tag),
            workerpoolprice=price,
            params=deal_params(app_args, list(input_files)),
        )
    except (PocoError, ValueError) as exc:
        _fail(str(exc))
        return
    click.echo(f"deal {deal.dealid} (block {deal.receipt.block_number}, {volume} task(s))")
    for taskid in deal.taskids():
        click.echo(f"  task {taskid}")


if __name__ == "__main__":
    main()
