"""``workerpool devnet …`` and ``workerpool demo``: a local chain with the real PoCo
contracts, a requester that buys the pool's capacity, and the demo's follow-up."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from cli.errors import CommandError, Unreachable, refusals
from devnet import network
from devnet.network import DevnetError

DIR_OPTION = click.option(
    "--dir",
    "directory",
    default=".devnet",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the devnet keeps devnet.json, the chain state and anvil's log.",
)


@click.command("demo")
@DIR_OPTION
@click.option("--api", "api_url", default="http://127.0.0.1:18090", show_default=True)
@click.option("--volume", default=3, show_default=True, type=click.IntRange(1))
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait.")
def demo_command(directory: Path, api_url: str, volume: int, timeout: float) -> None:
    """Match a sample deal on the devnet and follow it to COMPLETED (see ops/demo)."""
    from devnet.demo import run_demo

    sys.exit(run_demo(directory, api_url.rstrip("/"), volume, timeout))


@click.group("devnet")
def devnet() -> None:
    """A local chain (anvil) with the real PoCo v6.1.0 contracts, for development and tests."""


@devnet.command("up")
@DIR_OPTION
@click.option("--port", default=8545, show_default=True, help="anvil port on 127.0.0.1.")
@click.option(
    "--native",
    is_flag=True,
    help="Deploy PoCo in native mode (stakes in the chain's coin, Bellecour-like) instead of "
    "token mode as on Arbitrum (stakes in an RLC ERC-20). A chain of the other mode in --dir "
    "is put aside and a new one deployed.",
)
@click.option(
    "--tee",
    type=click.Choice(network.TEE_FRAMEWORKS),
    default=None,
    help="Also start the TEE stand-ins of this framework (SIMULATION: an SMS and result proxy "
    "process, and the stage images; no enclave, no attestation).",
)
@click.option("--tee-port", default=network.TEE_PORT, show_default=True)
@click.option("--ipfs-api", default="http://127.0.0.1:5001", show_default=True)
@click.option("--ipfs-gateway", default="http://127.0.0.1:8080", show_default=True)
def devnet_up(
    directory: Path,
    port: int,
    native: bool,
    tee: str | None,
    tee_port: int,
    ipfs_api: str,
    ipfs_gateway: str,
) -> None:
    """Start anvil, deploy PoCo, create the pool and sample apps (idempotent)."""
    with refusals(DevnetError):
        info, seconds, deployed = network.up(directory, port, "native" if native else "token")
        stand_in = (
            network.start_tee(directory, tee, tee_port, ipfs_api, ipfs_gateway) if tee else None
        )
    what = "deployed PoCo and provisioned" if deployed else "resumed"
    click.echo(f"devnet up ({what}) in {seconds:.1f}s: {info['rpc_url']} chain {info['chain_id']}")
    click.echo(f"  mode       {info['mode']}")
    if info["mode"] == "token":
        click.echo(f"  RLC        {info['rlc']}")
    click.echo(f"  hub        {info['hub']}")
    click.echo(f"  workerpool {info['workerpool']}")
    for name, app in info["apps"].items():
        click.echo(f"  app {name:<10} {app['address']}  {app['image']}")
    click.echo(f"  wrote {directory / 'devnet.json'} (its keys are PUBLIC TEST KEYS)")
    if stand_in is not None:
        click.echo(
            f"  {stand_in['framework']} SIMULATION: SMS and result proxy {stand_in['sms_url']}, "
            f"stages {stand_in['pre_compute_image']}, {stand_in['post_compute_image']} "
            "(no enclave, no attestation; `workerpool devnet env` prints their settings)"
        )


@devnet.command("down")
@DIR_OPTION
def devnet_down(directory: Path) -> None:
    """Stop the anvil this directory started (its state is kept for the next `up`), and the
    TEE stand-ins."""
    if network.stop_tee(directory):
        click.echo("TEE stand-ins stopped")
    stopped = network.Devnet(directory).stop()
    click.echo("devnet stopped" if stopped else "devnet was not running")


@devnet.command("status")
@DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def devnet_status(directory: Path, as_json: bool) -> None:
    """Say whether the devnet runs, its head block and whether PoCo is deployed."""
    info: dict[str, Any] = network.status(directory)
    if as_json:
        click.echo(json.dumps(info))
        return
    if not info["configured"]:
        raise Unreachable(f"no devnet in {directory} (run: workerpool devnet up)")
    if not info.get("answers"):
        raise Unreachable(f"devnet stopped pid={info['pid']} {info['rpc_url']}")
    click.echo(f"devnet running pid={info['pid']} {info['rpc_url']}")
    click.echo(
        f"  head block {info['block']}, PoCo deployed: {info['poco_deployed']} "
        f"({info['mode']} mode)"
    )


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
    info = _load(directory)
    with refusals(DevnetError):
        lines = network.env_lines(info, worker, mnemonic)
    tee = network.tee_info(directory)
    if tee is not None:
        lines += network.tee_env_lines(tee)
    click.echo("\n".join(lines))


@devnet.command("tee-serve")
@DIR_OPTION
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=network.TEE_PORT, show_default=True)
@click.option("--ipfs-api", default="http://127.0.0.1:5001", show_default=True)
@click.option("--ipfs-gateway", default="http://127.0.0.1:8080", show_default=True)
def devnet_tee_serve(
    directory: Path, host: str, port: int, ipfs_api: str, ipfs_gateway: str
) -> None:
    """SIMULATION: serve the devnet's TEE stand-ins (SMS and result proxy) in the foreground.
    No enclave, no attestation; refused on any chain but the devnet's."""
    import waitress

    from devnet.tee import StandInRefused, TeeStandIn, create_app

    info = _load(directory)
    with refusals(StandInRefused):
        stand_in = TeeStandIn(info["rpc_url"], info["hub"], ipfs_api, ipfs_gateway_url=ipfs_gateway)
    click.echo(
        f"TEE stand-ins (SIMULATION, chain {stand_in.chain_id}) on http://{host}:{port}", err=True
    )
    waitress.serve(create_app(stand_in), host=host, port=port, threads=8, ident="tee-stand-in")


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
    from devnet.requester import deal_params, match_deal
    from poco.chain import ChainClient
    from poco.tags import encode_tag

    info = _load(directory)
    if app_name not in info["apps"]:
        raise CommandError(f"unknown app {app_name!r}; devnet apps: {', '.join(info['apps'])}")
    accounts = info["accounts"]
    client = ChainClient(info["rpc_url"], info["hub"])
    with refusals(ValueError):
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
    click.echo(f"deal {deal.dealid} (block {deal.receipt.block_number}, {volume} task(s))")
    for taskid in deal.taskids():
        click.echo(f"  task {taskid}")


def _load(directory: Path) -> dict[str, Any]:
    info = network.Devnet(directory).load()
    if info is None:
        raise CommandError(f"no devnet in {directory} (run: workerpool devnet up)")
    return info
