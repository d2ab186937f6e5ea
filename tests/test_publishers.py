"""Result publishers: the iexec results link, the IPFS publisher on a real daemon, local files.

The IPFS tests run against the js-ipfs daemon that ops/test starts (offline, 127.0.0.1:5011,
fixture ``ipfs_api_url``). That the CIDs are the ones Kubo computes is checked two ways:
vectors computed by Kubo (go-ipfs) itself, and an independent Python re-implementation of
Kubo's default importer (256 KiB chunks, balanced DAG, dag-pb leaves, CIDv0) that must agree
with the daemon on a multi-chunk archive.
"""

from __future__ import annotations

import hashlib
import io
import re
import socket
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from poco.results import parse_result_link, result_link
from workers.publishers import (
    IPFS,
    LOCAL,
    IpfsPublisher,
    LocalPublisher,
    PublishError,
    ResultPublisher,
    make_publisher,
)

TASK_ID = "0x" + "ab" * 32
OTHER_TASK_ID = "0x" + "0123456789abcdef" * 4
CIDV0_RE = re.compile(r"Qm[1-9A-HJ-NP-Za-km-z]{44}")

# (bytes, CID computed by Kubo/go-ipfs with `ipfs add` defaults)
KUBO_VECTORS = [
    # ipfshttpclient's documented example, produced by a go-ipfs daemon
    (b"Mary had a little lamb", "QmZfF6C9j4VtoCsTp4KSrhYH47QMd3DNXVZBKaxJdhaPab"),
    # the empty file and `echo "hello world" | ipfs add`: the best-known CIDs there are
    (b"", "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"),
    (b"hello world\n", "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"),
]


# --- an independent model of Kubo's default `ipfs add` (for checking, not for use) ---------

_CHUNK = 256 * 1024  # Kubo's default chunker: size-262144
_MAX_LINKS = 174  # balanced layout: children per node
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # length-delimited protobuf field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _cidv0(block: bytes) -> tuple[str, bytes]:
    multihash = b"\x12\x20" + hashlib.sha256(block).digest()
    n, text = int.from_bytes(multihash, "big"), ""
    while n:
        n, rest = divmod(n, 58)
        text = _B58[rest] + text
    return text, multihash


def kubo_cid(data: bytes) -> str:
    """CIDv0 of ``data`` as Kubo's default importer builds it (files up to 174 chunks).

    UnixFS leaves are dag-pb nodes ``Data{Type: File, Data, filesize}``; a one-chunk file is
    its own root; otherwise the root links every leaf (Name "", Tsize = leaf block size)
    and carries ``Data{Type: File, filesize, blocksizes}``. dag-pb writes Links before Data.
    """
    chunks = [data[i : i + _CHUNK] for i in range(0, len(data), _CHUNK)] or [b""]
    assert len(chunks) <= _MAX_LINKS, "this model covers one level of links only"

    def leaf(chunk: bytes) -> bytes:
        unixfs = b"\x08\x02" + (_field(2, chunk) if chunk else b"") + b"\x18" + _varint(len(chunk))
        return _field(1, unixfs)

    if len(chunks) == 1:
        return _cidv0(leaf(chunks[0]))[0]
    links, sizes = b"", b""
    for chunk in chunks:
        block = leaf(chunk)
        multihash = _cidv0(block)[1]
        links += _field(2, _field(1, multihash) + _field(2, b"") + b"\x18" + _varint(len(block)))
        sizes += b"\x20" + _varint(len(chunk))
    root_unixfs = b"\x08\x02\x18" + _varint(len(data)) + sizes
    return _cidv0(links + _field(1, root_unixfs))[0]


def deterministic_bytes(size: int, seed: bytes = b"workerpool") -> bytes:
    """Incompressible, reproducible bytes (sha256 in counter mode)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def result_zip(payload: bytes = b"42\n") -> bytes:
    """A result archive as a worker packs it: iexec_out files with fixed timestamps."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in (
            ("computed.json", b'{"deterministic-output-path": "/iexec_out/result.txt"}'),
            ("result.txt", payload),
        ):
            archive.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), content)
    return buffer.getvalue()


def closed_port() -> int:
    """A local TCP port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(("data", "cid"), KUBO_VECTORS)
def test_the_cid_model_reproduces_kubo_vectors(data: bytes, cid: str) -> None:
    assert kubo_cid(data) == cid


# --- the results link ----------------------------------------------------------------------


def test_result_link_is_byte_identical_to_iexec() -> None:
    # iexec: String.format("{ \"storage\": \"%s\", \"location\": \"%s\" }", storage, location)
    link = result_link("ipfs", "/ipfs/QmZfF6C9j4VtoCsTp4KSrhYH47QMd3DNXVZBKaxJdhaPab")
    assert link == (
        '{ "storage": "ipfs", "location": "/ipfs/QmZfF6C9j4VtoCsTp4KSrhYH47QMd3DNXVZBKaxJdhaPab" }'
    )


def test_parse_result_link_accepts_any_json_spacing_and_bytes() -> None:
    location = "/ipfs/QmZfF6C9j4VtoCsTp4KSrhYH47QMd3DNXVZBKaxJdhaPab"
    assert parse_result_link(result_link("ipfs", location)) == ("ipfs", location)
    compact = b'{"location":"/ipfs/QmTest","storage":"ipfs","extra":1}'
    assert parse_result_link(compact) == ("ipfs", "/ipfs/QmTest")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"storage": "ipfs"}',
        b'{"storage": 1, "location": "x"}',
        b"\xff\xfe",
    ],
)
def test_parse_result_link_refuses_what_is_not_a_link(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_result_link(data)


@pytest.mark.parametrize("location", ['/ipfs/a"b', "/ipfs/a\\b", "/ipfs/a\nb", ""])
def test_result_link_refuses_values_that_would_break_the_json(location: str) -> None:
    with pytest.raises(ValueError):
        result_link("ipfs", location)


# --- IPFS on a real daemon -----------------------------------------------------------------


@pytest.fixture
def ipfs(ipfs_api_url: str) -> Iterator[IpfsPublisher]:
    publisher = IpfsPublisher(ipfs_api_url, timeout=10)
    yield publisher
    publisher.close()


def test_ipfs_publish_fetch_pin_roundtrip(ipfs: IpfsPublisher) -> None:
    # Given a result archive
    data = result_zip(b"roundtrip %d\n" % time.time_ns())
    # When a worker publishes it
    location = ipfs.publish(TASK_ID, data)
    # Then the location is /ipfs/<CIDv0>, the bytes come back, and the CID is pinned
    assert location.startswith("/ipfs/")
    cid = location.removeprefix("/ipfs/")
    assert CIDV0_RE.fullmatch(cid), location
    assert ipfs.fetch(location) == data
    assert ipfs.is_pinned(location)
    # and it is the CID Kubo computes for the same bytes (only-hash, and the model)
    assert ipfs.cid_of(data) == cid
    assert kubo_cid(data) == cid
    # and the link that goes on chain is iexec's
    assert parse_result_link(result_link(ipfs.storage, location)) == (IPFS, location)


def test_ipfs_publishing_again_gives_the_same_location(ipfs: IpfsPublisher) -> None:
    data = result_zip(b"idempotent\n")
    assert ipfs.publish(TASK_ID, data) == ipfs.publish(OTHER_TASK_ID, data)


@pytest.mark.parametrize(("data", "cid"), KUBO_VECTORS)
def test_ipfs_daemon_computes_kubo_cids(ipfs: IpfsPublisher, data: bytes, cid: str) -> None:
    assert ipfs.publish(TASK_ID, data) == f"/ipfs/{cid}"


def test_ipfs_multi_chunk_archive_matches_kubo_layout(ipfs: IpfsPublisher) -> None:
    # Given an archive larger than one 256 KiB chunk (3 leaves: 256 KiB, 256 KiB, rest)
    data = result_zip(deterministic_bytes(600_000))
    assert len(data) > 2 * 256 * 1024
    # When it is published, Then the root CID is the balanced-DAG one, and it reads back whole
    location = ipfs.publish(TASK_ID, data)
    assert location == f"/ipfs/{kubo_cid(data)}"
    assert ipfs.fetch(location) == data


def test_ipfs_fetch_of_a_cid_the_node_does_not_hold_ends_retryable(ipfs_api_url: str) -> None:
    # Given a CID nobody added (an offline node would otherwise wait forever for it)
    absent = f"/ipfs/{kubo_cid(deterministic_bytes(100, seed=b'absent %d' % time.time_ns()))}"
    publisher = IpfsPublisher(ipfs_api_url, timeout=3)
    # When it is fetched, Then the daemon gives up within the timeout: retryable
    started = time.monotonic()
    with pytest.raises(PublishError) as caught:
        publisher.fetch(absent)
    assert caught.value.retryable
    assert time.monotonic() - started < 6
    assert not publisher.is_pinned(absent)


def test_ipfs_ping_and_version(ipfs: IpfsPublisher) -> None:
    ipfs.ping()
    assert ipfs.version()
    assert ipfs.peer_id()


def test_ipfs_unreachable_daemon_is_a_clear_retryable_error() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    publisher = IpfsPublisher(url, timeout=5)
    with pytest.raises(PublishError) as caught:
        publisher.publish(TASK_ID, b"data")
    assert caught.value.retryable
    message = str(caught.value)
    assert "unreachable" in message and url in message and "refused" in message, message
    with pytest.raises(PublishError) as pinged:
        publisher.ping()
    assert pinged.value.retryable


@pytest.mark.parametrize(
    "location", ["QmZfF6C9j4VtoCsTp4KSrhYH47QMd3DNXVZBKaxJdhaPab", "/ipns/x", "/ipfs/../etc"]
)
def test_ipfs_refuses_a_location_that_is_not_ipfs_without_asking(location: str) -> None:
    publisher = IpfsPublisher(f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(PublishError) as caught:
        publisher.fetch(location)
    assert not caught.value.retryable


def test_ipfs_daemon_4xx_is_permanent(ipfs_api_url: str) -> None:
    # an API prefix that does not exist: the daemon answers 404
    publisher = IpfsPublisher(f"{ipfs_api_url}/nowhere", timeout=5)
    with pytest.raises(PublishError) as caught:
        publisher.ping()
    assert not caught.value.retryable
    assert "HTTP 404" in str(caught.value)


# --- local files ----------------------------------------------------------------------------


def test_local_publish_fetch_roundtrip(tmp_path: Path) -> None:
    # Given the embedded-mode publisher behind the API at http://127.0.0.1:18090
    publisher = LocalPublisher(tmp_path / "results", "http://127.0.0.1:18090/")
    data = result_zip()
    # When a result is published
    location = publisher.publish(TASK_ID.upper().replace("0X", "0x"), data)
    # Then the location is an absolute URL of the API's /results route
    assert location == f"http://127.0.0.1:18090/results/{TASK_ID}.zip"
    assert parse_result_link(result_link(publisher.storage, location)) == (LOCAL, location)
    # and the file is there, whole, with nothing temporary left beside it
    assert (tmp_path / "results" / f"{TASK_ID}.zip").read_bytes() == data
    assert [p.name for p in (tmp_path / "results").iterdir()] == [f"{TASK_ID}.zip"]
    assert publisher.fetch(location) == data
    assert publisher.fetch(f"/results/{TASK_ID}.zip") == data
    # and publishing again replaces it
    publisher.publish(TASK_ID, b"second")
    assert publisher.fetch(location) == b"second"
    publisher.ping()


@pytest.mark.parametrize(
    "task_id",
    [
        "../../etc/passwd",
        "0x" + "ab" * 31 + "/..",
        "0x" + "ab" * 32 + "/../x",
        "ab" * 32,
        "0x" + "zz" * 32,
        "",
    ],
)
def test_local_refuses_task_ids_that_are_not_task_ids(tmp_path: Path, task_id: str) -> None:
    publisher = LocalPublisher(tmp_path / "results", "http://127.0.0.1:18090")
    with pytest.raises(PublishError) as caught:
        publisher.publish(task_id, b"data")
    assert not caught.value.retryable
    assert not any(tmp_path.rglob("*.zip")) and not (tmp_path / "etc").exists()


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1:18090/results/../../etc/passwd",
        f"http://elsewhere:18090/results/{TASK_ID}.zip",
        f"/results/{TASK_ID}.zip/..",
        "/etc/passwd",
    ],
)
def test_local_fetch_refuses_foreign_locations(tmp_path: Path, location: str) -> None:
    publisher = LocalPublisher(tmp_path, "http://127.0.0.1:18090")
    publisher.publish(TASK_ID, b"data")
    with pytest.raises(PublishError):
        publisher.fetch(location)


def test_local_fetch_of_a_missing_result_is_permanent(tmp_path: Path) -> None:
    publisher = LocalPublisher(tmp_path, "http://127.0.0.1:18090")
    with pytest.raises(PublishError) as caught:
        publisher.fetch(f"/results/{TASK_ID}.zip")
    assert not caught.value.retryable


# --- factory -------------------------------------------------------------------------------


def test_make_publisher_builds_each_kind(tmp_path: Path) -> None:
    def make(kind: str, local_dir: Path | str = tmp_path) -> ResultPublisher:
        return make_publisher(
            kind,
            ipfs_api_url="http://127.0.0.1:5001",
            local_dir=local_dir,
            base_url="http://127.0.0.1:18090",
        )

    ipfs, local = make("ipfs"), make(" LOCAL ")
    assert isinstance(ipfs, IpfsPublisher) and isinstance(local, LocalPublisher)
    assert isinstance(ipfs, ResultPublisher) and isinstance(local, ResultPublisher)
    assert (ipfs.storage, local.storage) == (IPFS, LOCAL)
    with pytest.raises(ValueError, match="unknown result storage"):
        make("s3")
    with pytest.raises(ValueError, match="needs a folder"):
        make("local", local_dir="")
