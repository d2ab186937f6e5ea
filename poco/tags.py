"""Tags: the bytes32 capability bitmap carried by orders and deals.

Bit positions follow the iExec SDK: bit 0 TEE, bit 1 Scone, bit 2 Gramine, bit 3 TDX,
bit 8 GPU. ``encode_tag("tee,scone")`` gives ``0x…03``.
"""

from __future__ import annotations

from collections.abc import Iterable

TAG_BITS: dict[str, int] = {
    "tee": 0,
    "scone": 1,
    "gramine": 2,
    "tdx": 3,
    "gpu": 8,
}

ZERO_TAG = "0x" + "00" * 32


class TagError(ValueError):
    """A tag that is not a known name list nor a bytes32 value."""


def tag_to_int(tag: str | bytes | int | Iterable[str]) -> int:
    """Parse a tag given as bytes32 (hex string or bytes), an int, or names ("tee,scone")."""
    if isinstance(tag, int):
        value = tag
    elif isinstance(tag, bytes | bytearray):
        if len(tag) != 32:
            raise TagError(f"tag must be 32 bytes, got {len(tag)}")
        value = int.from_bytes(tag, "big")
    elif isinstance(tag, str):
        text = tag.strip()
        if text.lower().startswith("0x"):
            digits = text[2:]
            if not digits or len(digits) > 64:
                raise TagError(f"tag {tag!r} is not a bytes32 hex value")
            try:
                value = int(digits, 16)
            except ValueError as exc:
                raise TagError(f"tag {tag!r} is not a bytes32 hex value") from exc
        elif text in ("", "standard", "none"):
            value = 0
        else:
            value = _names_to_int(part.strip() for part in text.split(","))
    else:
        value = _names_to_int(tag)
    if value < 0 or value >= 1 << 256:
        raise TagError(f"tag {tag!r} does not fit in bytes32")
    return value


def _names_to_int(names: Iterable[str]) -> int:
    value = 0
    for name in names:
        key = name.lower()
        if key not in TAG_BITS:
            raise TagError(f"unknown tag name {name!r}; known: {', '.join(TAG_BITS)}")
        value |= 1 << TAG_BITS[key]
    return value


def encode_tag(tag: str | bytes | int | Iterable[str]) -> str:
    """Return the tag as a 0x-prefixed 64-digit hex string."""
    return "0x" + tag_to_int(tag).to_bytes(32, "big").hex()


def tag_bytes(tag: str | bytes | int | Iterable[str]) -> bytes:
    return tag_to_int(tag).to_bytes(32, "big")


def decode_tag(tag: str | bytes | int) -> list[str]:
    """Names of the known bits set in ``tag`` (unknown bits are reported as ``bitN``)."""
    value = tag_to_int(tag)
    names = []
    by_bit = {bit: name for name, bit in TAG_BITS.items()}
    for bit in range(256):
        if value >> bit & 1:
            names.append(by_bit.get(bit, f"bit{bit}"))
    return names


def has_bits(tag: str | bytes | int, required: str | bytes | int) -> bool:
    """True when every bit of ``required`` is set in ``tag`` (how PoCo matches tags)."""
    need = tag_to_int(required)
    return tag_to_int(tag) & need == need


def is_tee(tag: str | bytes | int) -> bool:
    return bool(tag_to_int(tag) & 1)


# a TEE tag's low nibble names its framework (tee + one of scone, gramine, tdx), as the iExec
# worker and scheduler read it; any other TEE nibble names none
TEE_FRAMEWORK_BITS: dict[str, int] = {"scone": 0x3, "gramine": 0x5, "tdx": 0x9}


def tee_framework(tag: str | bytes | int) -> str | None:
    """The TEE framework a tag asks for (scone, gramine, tdx), or None (standard, or a TEE
    bit with no single framework)."""
    nibble = tag_to_int(tag) & 0xF
    for name, bits in TEE_FRAMEWORK_BITS.items():
        if nibble == bits:
            return name
    return None
