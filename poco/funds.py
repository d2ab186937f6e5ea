"""What an account holds, and whether it can pay for what it is about to do.

* :func:`balances`: the chain's coin (gas), RLC in the wallet, RLC deposited in PoCo (free
  stake) and locked, and the hub's allowance: what ``workerpool account show`` prints;
* :func:`gas_check`: iexec-worker's and iexec-core's rule for gas (``hasEnoughGas``): one
  transaction may cost up to :data:`GAS_LIMIT_CAP` gas at the price budget, so a wallet
  holding less than that cannot be trusted to send the next one; below
  :data:`LOW_GAS_TRANSACTIONS` of them it is running low.

Units: wei for the coin, nRLC (1e-9 RLC) for RLC and stakes, as PoCo counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

from poco.chain import ChainClient

GAS_LIMIT_CAP = 1_000_000  # iexec-commons-poco: the gas one transaction may take, at most
LOW_GAS_TRANSACTIONS = 10  # iexec-worker warns below this many transactions left
NRLC_PER_RLC = 10**9
WEI_PER_ETH = 10**18


@dataclass(frozen=True)
class Balances:
    address: str
    mode: str  # "token" or "native"
    wei: int  # the chain's coin: gas (and, in native mode, what deposit takes)
    wallet_nrlc: int  # token mode: RLC in the wallet; native mode: the coin, in nRLC
    stake: int  # deposited in PoCo and free
    locked: int  # deposited in PoCo and locked in deals or contributions
    allowance: int  # token mode: RLC the hub may take from the wallet


@dataclass(frozen=True)
class GasCheck:
    wei: int
    price: int  # wei per gas assumed for one transaction
    transactions: int  # transactions of GAS_LIMIT_CAP gas the balance pays for

    @property
    def transaction_cost(self) -> int:
        return GAS_LIMIT_CAP * self.price

    @property
    def empty(self) -> bool:
        return self.transactions < 1

    @property
    def low(self) -> bool:
        return self.transactions < LOW_GAS_TRANSACTIONS

    def describe(self, address: str) -> str:
        """One sentence for the logs and the API, the words of iexec-worker's checks."""
        have = f"{address} holds {format_eth(self.wei)} ETH for gas"
        cost = f"a transaction may cost {format_eth(self.transaction_cost)} ETH"
        if self.empty:
            return f"gas balance is empty: {have}, {cost}; please refill it"
        if self.low:
            return f"gas balance is very low: {have}, {self.transactions} transaction(s) left"
        return f"{have}, {self.transactions} transaction(s) at {format_gwei(self.price)} gwei"


def gas_price(client: ChainClient, budget_wei: int = 0) -> int:
    """The gas price a transaction is judged at: ``budget_wei`` when set, else what the node
    asks now (``maxFeePerGas``, or the legacy gas price)."""
    if budget_wei > 0:
        return budget_wei
    fees = client.fees()
    return int(fees.get("maxFeePerGas", fees.get("gasPrice", 0)))


def gas_check(client: ChainClient, address: str, budget_wei: int = 0) -> GasCheck:
    wei = client.native_balance(address)
    price = gas_price(client, budget_wei)
    return GasCheck(wei, price, wei // (GAS_LIMIT_CAP * price) if price else 1 << 62)


def balances(client: ChainClient, address: str) -> Balances:
    account = client.view_account(address)
    wei = client.native_balance(address)
    token = client.mode == "token"
    return Balances(
        address=address,
        mode=client.mode,
        wei=wei,
        wallet_nrlc=client.rlc_balance(address) if token else wei // 10**9,
        stake=account.stake,
        locked=account.locked,
        allowance=client.rlc_allowance(address) if token else 0,
    )


def format_rlc(nrlc: int) -> str:
    """nRLC as RLC with up to 9 decimals: 1500000000 -> '1.5'."""
    whole, frac = divmod(abs(nrlc), NRLC_PER_RLC)
    text = f"{whole}.{frac:09d}".rstrip("0").rstrip(".")
    return f"-{text}" if nrlc < 0 else text


def format_eth(wei: int) -> str:
    whole, frac = divmod(abs(wei), WEI_PER_ETH)
    text = f"{whole}.{frac:018d}".rstrip("0").rstrip(".")
    return f"-{text}" if wei < 0 else text


def format_gwei(wei: int) -> str:
    whole, frac = divmod(wei, 10**9)
    return f"{whole}.{frac:09d}".rstrip("0").rstrip(".")


UNITS = {"nrlc": 1, "rlc": NRLC_PER_RLC}


def parse_amount(amount: str, unit: str = "nRLC") -> int:
    """An amount as the iExec SDK's ``account deposit <amount> [unit]`` takes it, in nRLC:
    ``unit`` nRLC (the default, whole numbers) or RLC (up to 9 decimals); the unit may also
    follow the number (``1.5RLC``). Raises ValueError saying what is wrong."""
    text = amount.strip()
    for name in sorted(UNITS, key=len, reverse=True):
        if text.lower().endswith(name) and len(text) > len(name):
            text, unit = text[: -len(name)].strip(), name
            break
    scale = UNITS.get(unit.strip().lower())
    if scale is None:
        raise ValueError(f"unknown unit {unit!r}: nRLC or RLC")
    whole, dot, frac = text.partition(".")
    if not (whole or frac) or not (whole or "0").isdigit() or (dot and not frac.isdigit()):
        raise ValueError(f"{amount!r} is not an amount (digits, and one '.' for RLC)")
    if dot and scale == 1:
        raise ValueError(f"{amount!r}: nRLC are whole numbers (or give the unit RLC)")
    if len(frac) > 9:
        raise ValueError(f"{amount!r}: RLC has 9 decimals at most")
    value = int(whole or "0") * scale + (int(frac.ljust(9, "0")) if frac else 0)
    if value <= 0:
        raise ValueError(f"{amount!r}: the amount must be above 0")
    return value
