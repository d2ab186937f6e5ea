"""Unit tests of what the worker does around an app run, without Docker.

workers.inputs: deal params, args splitting, downloads (from a real HTTP server on
127.0.0.1), the app environment. workers.results: computed.json, the result digest
(iexec's test vectors), logs files and the result zip, including apps that try to make
the worker read or write outside /iexec_out.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testing.runner import FakeRunner
from workers import results
from workers.inputs import (
    AddressPolicy,
    ArgsError,
    DataDownloadError,
    DealParams,
    app_env,
    download_dataset,
    download_inputs,
    input_file_name,
    parse_deal_params,
    split_args,
)
from workers.results import ComputedFile, ResultError
from workers.runner import AppImageError, AppRun, RunOutcome

MB = 1024 * 1024
# the test servers are on 127.0.0.1, which workers refuse unless allowed (devnets, tests)
LOCAL = AddressPolicy(allow_private=True)
TASK_ID = "0x" + "ab" * 32
DEAL_ID = "0x" + "cd" * 32
DATASET = "0x" + "Ef" * 20


# --- a real HTTP server ------------------------------------------------------------


class FileServer:
    """Serves ``files`` (path -> bytes) on 127.0.0.1; ``/drip`` sends a byte every 0.2 s."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                if self.path == "/drip":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    for _ in range(1000):
                        try:
                            self.wfile.write(b"x")
                            self.wfile.flush()
                        except OSError:
                            return
                        time.sleep(0.2)
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture
def http_files() -> Iterator[FileServer]:
    server = FileServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


# --- deal params ---------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, ""])
def test_empty_deal_params_give_defaults(raw: str | None) -> None:
    params = parse_deal_params(raw)
    assert params == DealParams(iexec_args="")
    assert split_args(params.iexec_args) == []


def test_json_deal_params_fill_the_fields() -> None:
    raw = json.dumps(
        {
            "iexec_args": "a 'b c'",
            "iexec_input_files": ["https://x.test/1", "https://x.test/2"],
            "iexec_result_storage_provider": "ipfs",
            "iexec_result_storage_proxy": "https://proxy.test",
            "iexec_result_encryption": False,
            "iexec_secrets": {"1": "my-secret"},
            "bulk_cid": "bafy",
        }
    )
    assert parse_deal_params(raw) == DealParams(
        iexec_args="a 'b c'",
        iexec_input_files=["https://x.test/1", "https://x.test/2"],
        iexec_result_storage_provider="ipfs",
        iexec_result_storage_proxy="https://proxy.test",
        iexec_result_encryption=False,
        iexec_secrets={"1": "my-secret"},
        bulk_cid="bafy",
    )


@pytest.mark.parametrize(
    "raw",
    [
        # iexec-commons-poco shouldReadNotCorrectJsonFile: an unknown key
        '{"wrong_field1":"wrong content","iexec_input_files":["http://file1"]}',
        # a key removed from DealParams (old SDKs)
        '{"iexec_args":"x","iexec_developer_logger":true}',
        "plain args here",
        '{"iexec_args": ',  # broken JSON
        "[1, 2]",
        "null",
        '{"iexec_input_files": "not-a-list"}',
    ],
)
def test_anything_but_a_known_json_object_is_all_args(raw: str) -> None:
    params = parse_deal_params(raw)
    assert params.iexec_args == raw
    assert params.iexec_input_files == []
    assert params.iexec_secrets == {}


def test_deal_params_coerce_scalars_and_ignore_trailing_text_like_jackson() -> None:
    assert parse_deal_params('{"iexec_args": 42}').iexec_args == "42"
    assert parse_deal_params('{"iexec_result_encryption": "true"}').iexec_result_encryption
    assert parse_deal_params('  {"iexec_args": "x"} trailing').iexec_args == "x"
    assert parse_deal_params(b'{"iexec_args": "from bytes"}').iexec_args == "from bytes"


# --- args ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello world", ["hello", "world"]),
        ("  spaced   out  ", ["spaced", "out"]),
        ('"big world" 2', ["big world", "2"]),
        ("'single quoted' x", ["single quoted", "x"]),
        ("'say \"hi\"'", ['say "hi"']),
        ('"it\'s"', ["it's"]),
        ('a""b', ["ab"]),
        ("\"\" x ''", ["x"]),
        ("x='1 2'", ["x=1 2"]),
        ("tab\tand\nnewline", ["tab\tand\nnewline"]),
        ("back\\ slash", ["back\\", "slash"]),
        ("", []),
        (None, []),
    ],
)
def test_split_args_follows_maven_translate_commandline(
    text: str | None, expected: list[str]
) -> None:
    assert split_args(text) == expected


@pytest.mark.parametrize("text", ['"open', "it's", "a 'b c"])
def test_split_args_refuses_unbalanced_quotes(text: str) -> None:
    with pytest.raises(ArgsError, match="unbalanced"):
        split_args(text)


# --- downloads -----------------------------------------------------------------------


def test_input_file_name_is_sha256_of_the_url() -> None:
    url = "https://example.com/data/input.csv"
    assert input_file_name(url) == "0x" + hashlib.sha256(url.encode()).hexdigest()
    assert len(input_file_name(url)) == 66


def test_download_inputs_fetches_each_url_in_order(http_files: FileServer, tmp_path: Path) -> None:
    # Given two files served over HTTP, one URL given twice
    http_files.files = {"/a.txt": b"alpha\n", "/b.csv": b"1,2,3"}
    urls = [http_files.url("/a.txt"), http_files.url("/b.csv"), http_files.url("/a.txt")]

    # When they are downloaded
    names = download_inputs(urls, tmp_path / "in", max_bytes=MB, timeout=10, policy=LOCAL)

    # Then each is named by the sha256 of its URL, in order, with its content
    assert names == [input_file_name(u) for u in urls]
    assert (tmp_path / "in" / names[0]).read_bytes() == b"alpha\n"
    assert (tmp_path / "in" / names[1]).read_bytes() == b"1,2,3"
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == sorted(set(names))
    assert http_files.requests.count("/a.txt") == 1


def test_download_error_names_the_url(http_files: FileServer, tmp_path: Path) -> None:
    url = http_files.url("/missing")
    with pytest.raises(DataDownloadError, match="404") as caught:
        download_inputs([url], tmp_path, max_bytes=MB, timeout=10, policy=LOCAL)
    assert url in str(caught.value)
    assert caught.value.url == url
    assert list(tmp_path.iterdir()) == []


def test_download_over_the_size_limit_fails_and_leaves_nothing(
    http_files: FileServer, tmp_path: Path
) -> None:
    http_files.files = {"/big": b"z" * (300 * 1024)}
    with pytest.raises(DataDownloadError, match="larger than the limit of 100000 bytes"):
        download_inputs(
            [http_files.url("/big")], tmp_path, max_bytes=100_000, timeout=10, policy=LOCAL
        )
    assert list(tmp_path.iterdir()) == []


def test_download_of_a_dripping_server_stops_at_the_total_timeout(
    http_files: FileServer, tmp_path: Path
) -> None:
    started = time.monotonic()
    with pytest.raises(DataDownloadError, match="took longer than the time left"):
        download_inputs([http_files.url("/drip")], tmp_path, max_bytes=MB, timeout=1, policy=LOCAL)
    assert time.monotonic() - started < 5
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_is_a_download_error(tmp_path: Path) -> None:
    # a port nothing listens on (bound then closed)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DataDownloadError, match="ConnectionError"):
        download_inputs(
            [f"http://127.0.0.1:{port}/x"], tmp_path, max_bytes=MB, timeout=5, policy=LOCAL
        )


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/x", "/etc/passwd", "http://", ""]
)
def test_only_http_urls_are_downloaded(url: str, tmp_path: Path) -> None:
    def fetch(url: str, timeout: float) -> Iterator[bytes]:
        raise AssertionError("must not be called")

    with pytest.raises(DataDownloadError):
        download_inputs([url], tmp_path, max_bytes=MB, timeout=5, fetch=fetch)


def test_an_injected_fetch_is_used_and_bounded(tmp_path: Path) -> None:
    def fetch(url: str, timeout: float) -> Iterator[bytes]:
        yield b"one,"
        yield b"two"

    [name] = download_inputs(["https://x.test/f"], tmp_path, max_bytes=7, timeout=5, fetch=fetch)
    assert (tmp_path / name).read_bytes() == b"one,two"
    with pytest.raises(DataDownloadError, match="limit"):
        download_inputs(["https://x.test/g"], tmp_path, max_bytes=6, timeout=5, fetch=fetch)


def test_dataset_is_named_by_its_address_and_checked(
    http_files: FileServer, tmp_path: Path
) -> None:
    data = b"secret dataset\n"
    http_files.files = {"/ds.bin": data}
    checksum = "0x" + hashlib.sha256(data).hexdigest()

    name = download_dataset(
        http_files.url("/ds.bin"),
        checksum,
        tmp_path,
        DATASET,
        max_bytes=MB,
        timeout=10,
        policy=LOCAL,
    )

    assert name == DATASET.lower()
    assert (tmp_path / name).read_bytes() == data


def test_dataset_checksum_mismatch_is_refused(http_files: FileServer, tmp_path: Path) -> None:
    http_files.files = {"/ds.bin": b"tampered"}
    wrong = "0x" + hashlib.sha256(b"original").hexdigest()
    with pytest.raises(DataDownloadError, match="checksum mismatch"):
        download_dataset(
            http_files.url("/ds.bin"),
            wrong,
            tmp_path,
            DATASET,
            max_bytes=MB,
            timeout=10,
            policy=LOCAL,
        )
    assert list(tmp_path.iterdir()) == []


def test_dataset_with_zero_checksum_is_not_checked(http_files: FileServer, tmp_path: Path) -> None:
    http_files.files = {"/ds.bin": b"anything"}
    name = download_dataset(
        http_files.url("/ds.bin"),
        "0x" + "00" * 32,
        tmp_path,
        DATASET,
        max_bytes=MB,
        timeout=10,
        policy=LOCAL,
    )
    assert (tmp_path / name).read_bytes() == b"anything"


def test_ipfs_dataset_tries_each_gateway_in_turn(http_files: FileServer, tmp_path: Path) -> None:
    # Given a first gateway that does not have the CID and a second one that does
    data = b"from ipfs"
    cid = "/ipfs/QmTestCid"
    http_files.files = {"/good" + cid: data}
    gateways = [http_files.url("/bad"), http_files.url("/good")]

    name = download_dataset(
        cid,
        "0x" + hashlib.sha256(data).hexdigest(),
        tmp_path,
        DATASET,
        max_bytes=MB,
        timeout=10,
        ipfs_gateways=gateways,
        policy=LOCAL,
    )

    assert (tmp_path / name).read_bytes() == data
    assert http_files.requests == ["/bad" + cid, "/good" + cid]


def test_ipfs_dataset_fails_when_every_gateway_fails(
    http_files: FileServer, tmp_path: Path
) -> None:
    with pytest.raises(DataDownloadError, match="any IPFS gateway"):
        download_dataset(
            "/ipfs/QmNope",
            "",
            tmp_path,
            DATASET,
            max_bytes=MB,
            timeout=10,
            ipfs_gateways=[http_files.url("/g1"), http_files.url("/g2")],
            policy=LOCAL,
        )


# --- environment ---------------------------------------------------------------------


def test_app_env_without_inputs_or_dataset() -> None:
    env = app_env(deal_id=DEAL_ID, task_id=TASK_ID, task_index=3, bot_first=2, bot_size=5)
    assert env == {
        "IEXEC_DEAL_ID": DEAL_ID,
        "IEXEC_TASK_INDEX": "3",
        "IEXEC_TASK_ID": TASK_ID,
        "IEXEC_IN": "/iexec_in",
        "IEXEC_OUT": "/iexec_out",
        "IEXEC_DATASET_ADDRESS": "0x" + "0" * 40,
        "IEXEC_BOT_SIZE": "5",
        "IEXEC_BOT_FIRST_INDEX": "2",
        "IEXEC_BOT_TASK_INDEX": "3",
        "IEXEC_INPUT_FILES_NUMBER": "0",
    }


def test_app_env_with_inputs_and_dataset_follows_iexec_order() -> None:
    names = [input_file_name("https://x.test/1"), input_file_name("https://x.test/2")]
    env = app_env(
        deal_id=DEAL_ID,
        task_id=TASK_ID,
        task_index=0,
        bot_first=0,
        bot_size=1,
        input_file_names=names,
        dataset_address=DATASET,
    )
    # the order of iexec-common IexecEnvUtilsTest.shouldGetComputeStageEnvList
    assert list(env) == [
        "IEXEC_DEAL_ID",
        "IEXEC_TASK_INDEX",
        "IEXEC_TASK_ID",
        "IEXEC_IN",
        "IEXEC_OUT",
        "IEXEC_DATASET_ADDRESS",
        "IEXEC_DATASET_FILENAME",
        "IEXEC_BOT_SIZE",
        "IEXEC_BOT_FIRST_INDEX",
        "IEXEC_BOT_TASK_INDEX",
        "IEXEC_INPUT_FILES_FOLDER",
        "IEXEC_INPUT_FILES_NUMBER",
        "IEXEC_INPUT_FILE_NAME_1",
        "IEXEC_INPUT_FILE_NAME_2",
    ]
    assert env["IEXEC_DATASET_FILENAME"] == env["IEXEC_DATASET_ADDRESS"] == DATASET.lower()
    assert env["IEXEC_INPUT_FILES_FOLDER"] == "/iexec_in"
    assert env["IEXEC_INPUT_FILES_NUMBER"] == "2"
    assert env["IEXEC_INPUT_FILE_NAME_2"] == names[1]


def test_app_env_zero_dataset_means_no_dataset() -> None:
    env = app_env(
        deal_id=DEAL_ID,
        task_id=TASK_ID,
        task_index=0,
        bot_first=0,
        bot_size=1,
        dataset_address="0x" + "0" * 40,
    )
    assert "IEXEC_DATASET_FILENAME" not in env


# --- digest: iexec's test vectors ----------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An empty host folder playing /iexec_out."""
    path = tmp_path / "iexec_out"
    path.mkdir()
    return path


def test_single_file_digest_is_its_sha256(out: Path) -> None:
    write(out / "result1.txt", "A result")
    digest = results.result_digest(
        out, ComputedFile(deterministic_output_path="/iexec_out/result1.txt"), False
    )
    assert digest.startswith("0xd885f429") and digest.endswith("cb27ac16")
    assert digest == "0x" + hashlib.sha256(b"A result").hexdigest()


def test_directory_digest_vector(out: Path) -> None:
    write(out / "result1.txt", "A result")
    write(out / "result2.txt", "Another result")
    digest = results.result_digest(out, ComputedFile(deterministic_output_path="/iexec_out"), False)
    assert digest == "0xcc77508549295dd5de5876a2f4f00d4c3c27a547c6403450e43ab4de191bf1bc"


def test_worker_test_directory_vector_includes_computed_json(out: Path) -> None:
    write(out / "computed.json", '{\n  "deterministic-output-path": "/iexec_out"\n}')
    write(out / "result1.txt", "A result")
    write(out / "result2.txt", "Another result")
    computed = results.read_computed(out)
    assert computed.deterministic_output_path == "/iexec_out"
    digest = results.result_digest(out, computed, has_callback=False)
    assert digest == "0xc6114778cc5c33db5fbbd4d0f9be116ed0232961045341714aba5a72d3ef7402"


def test_callback_digest_vector() -> None:
    computed = ComputedFile(callback_data="0x" + "00" * 31 + "01")
    digest = results.result_digest(Path("/nonexistent"), computed, has_callback=True)
    assert digest == "0xb10e2d527612073b26eecdfd717e6a320cf44b4afac2b0732d9fcbe2b7fa0cf6"


def test_empty_directory_digest_is_keccak_of_nothing(out: Path) -> None:
    digest = results.result_digest(
        out, ComputedFile(deterministic_output_path="/iexec_out/"), False
    )
    assert digest == "0xc5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"


def test_subdirectories_add_nothing_and_dotfiles_count(out: Path) -> None:
    write(out / "result1.txt", "A result")
    write(out / "result2.txt", "Another result")
    write(out / "zz" / "deep.txt", "not hashed")
    base = results.file_tree_sha256(out)
    assert base == "0xcc77508549295dd5de5876a2f4f00d4c3c27a547c6403450e43ab4de191bf1bc"
    write(out / ".hidden", "counted")
    assert results.file_tree_sha256(out) != base


def test_directory_children_sort_like_java_case_sensitive(out: Path) -> None:
    write(out / "a", "lower")
    write(out / "B", "upper")
    expected = results.keccak(  # "B" (0x42) sorts before "a" (0x61)
        hashlib.sha256(b"upper").digest() + hashlib.sha256(b"lower").digest()
    )
    assert results.file_tree_sha256(out) == "0x" + expected.hex()


@pytest.mark.parametrize(
    ("callback_data", "message"),
    [(None, "no callback-data"), ("", "empty callback-data"), ("0xzz", "not hexadecimal")],
)
def test_callback_deal_needs_hex_callback_data(callback_data: str | None, message: str) -> None:
    with pytest.raises(ResultError, match=message):
        results.result_digest(Path("/x"), ComputedFile(callback_data=callback_data), True)


def test_app_given_result_digest_is_ignored(out: Path) -> None:
    write(out / "r.txt", "A result")
    computed = ComputedFile(
        deterministic_output_path="/iexec_out/r.txt", result_digest="0x" + "11" * 32
    )
    assert (
        results.result_digest(out, computed, False)
        == "0x" + hashlib.sha256(b"A result").hexdigest()
    )


# --- digest: paths the app does not own -------------------------------------------------


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/iexec_out/../etc/passwd", "escapes /iexec_out"),
        ("/iexec_out/a/../../etc", "escapes /iexec_out"),
        ("/etc/passwd", "not under /iexec_out"),
        ("/iexec_outside", "not under /iexec_out"),
        ("result.txt", "absolute path"),
        ("", "no deterministic-output-path"),
        (None, "no deterministic-output-path"),
        ("/iexec_out/missing.txt", "does not exist"),
    ],
)
def test_deterministic_path_must_stay_in_iexec_out(
    out: Path, path: str | None, message: str
) -> None:
    write(out / "result.txt", "x")
    with pytest.raises(ResultError, match=message):
        results.result_digest(out, ComputedFile(deterministic_output_path=path), False)


def test_symlink_out_of_iexec_out_is_refused(out: Path, tmp_path: Path) -> None:
    secret = write(tmp_path / "host-secret", "root:x:0:0")
    (out / "link").symlink_to(secret)
    (out / "dirlink").symlink_to(tmp_path)
    for path in ("/iexec_out/link", "/iexec_out/dirlink/host-secret"):
        with pytest.raises(ResultError, match="escapes /iexec_out"):
            results.result_digest(out, ComputedFile(deterministic_output_path=path), False)
    # and as a child of a deterministic directory
    with pytest.raises(ResultError, match="escapes /iexec_out"):
        results.result_digest(out, ComputedFile(deterministic_output_path="/iexec_out"), False)


def test_symlink_inside_iexec_out_is_followed(out: Path) -> None:
    write(out / "real.txt", "A result")
    (out / "alias.txt").symlink_to("real.txt")
    digest = results.result_digest(
        out, ComputedFile(deterministic_output_path="/iexec_out/alias.txt"), False
    )
    assert digest == "0x" + hashlib.sha256(b"A result").hexdigest()


def test_a_fifo_never_blocks_the_digest(out: Path) -> None:
    os.mkfifo(out / "pipe")
    write(out / "result1.txt", "A result")
    with pytest.raises(ResultError, match="neither a file nor a directory"):
        results.result_digest(out, ComputedFile(deterministic_output_path="/iexec_out/pipe"), False)
    # in a directory it adds nothing, like any non-file
    only_result = results.keccak(hashlib.sha256(b"A result").digest())
    assert results.file_tree_sha256(out) == "0x" + only_result.hex()


# --- computed.json ---------------------------------------------------------------------


def test_read_computed_reads_the_known_keys(out: Path) -> None:
    write(
        out / "computed.json",
        json.dumps(
            {
                "deterministic-output-path": "/iexec_out/result.txt",
                "callback-data": "0x01",
                "unknown": {"ignored": True},
            }
        ),
    )
    computed = results.read_computed(out)
    assert computed.deterministic_output_path == "/iexec_out/result.txt"
    assert computed.callback_data == "0x01"
    assert computed.to_dict() == {
        "deterministic-output-path": "/iexec_out/result.txt",
        "callback-data": "0x01",
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "wrote no /iexec_out/computed.json"),
        ("{not json", "not valid JSON"),
        ('["a"]', "JSON object"),
        ('{"deterministic-output-path": 5}', "must be a string"),
    ],
)
def test_bad_computed_json_is_a_result_error(out: Path, content: str | None, message: str) -> None:
    if content is not None:
        write(out / "computed.json", content)
    with pytest.raises(ResultError, match=message):
        results.read_computed(out)


def test_computed_json_symlink_to_the_host_is_refused(out: Path, tmp_path: Path) -> None:
    secret = write(tmp_path / "secret.json", '{"deterministic-output-path": "/iexec_out"}')
    (out / "computed.json").symlink_to(secret)
    with pytest.raises(ResultError, match="escapes /iexec_out"):
        results.read_computed(out)


def test_computed_json_fifo_does_not_hang(out: Path) -> None:
    os.mkfifo(out / "computed.json")
    with pytest.raises(ResultError, match="not a regular file"):
        results.read_computed(out)


# --- logs ------------------------------------------------------------------------------


def test_write_logs_writes_only_non_empty_logs(out: Path) -> None:
    written = results.write_logs(out, "hello\n", "")
    assert written == [out / "stdout.txt"]
    assert (out / "stdout.txt").read_text() == "hello\n"
    assert not (out / "stderr.txt").exists()


def test_write_logs_never_writes_through_a_planted_symlink(out: Path, tmp_path: Path) -> None:
    # Given an app that made stdout.txt a link to a host file
    victim = write(tmp_path / "victim", "precious")
    (out / "stdout.txt").symlink_to(victim)

    results.write_logs(out, "app output\n", "err\n")

    # Then the host file is untouched and stdout.txt is a plain file
    assert victim.read_text() == "precious"
    assert not (out / "stdout.txt").is_symlink()
    assert (out / "stdout.txt").read_text() == "app output\n"
    assert (out / "stderr.txt").read_text() == "err\n"


# --- zip -------------------------------------------------------------------------------


def zip_entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_package_zips_files_relative_to_iexec_out(out: Path, tmp_path: Path) -> None:
    write(out / "computed.json", '{"deterministic-output-path": "/iexec_out/result.txt"}')
    write(out / "result.txt", "the result")
    write(out / "sub" / "a.txt", "nested")
    (out / "empty-dir").mkdir()

    zip_path = results.package(out, tmp_path / "result.zip", max_bytes=MB)

    assert zip_path == tmp_path / "result.zip"
    assert zip_entries(zip_path) == {
        "computed.json": b'{"deterministic-output-path": "/iexec_out/result.txt"}',
        "result.txt": b"the result",
        "sub/a.txt": b"nested",
    }
    assert not (tmp_path / "result.zip.part").exists()


def test_package_is_reproducible(out: Path, tmp_path: Path) -> None:
    write(out / "b.txt", "b")
    write(out / "a.txt", "a")
    first = results.package(out, tmp_path / "1.zip", max_bytes=MB).read_bytes()
    os.utime(out / "a.txt", (1, 1))
    second = results.package(out, tmp_path / "2.zip", max_bytes=MB).read_bytes()
    assert first == second


def test_package_does_not_follow_symlinks(out: Path, tmp_path: Path) -> None:
    # Given an app output with links to a host file and to a host directory
    secret = write(tmp_path / "host" / "passwd", "root:x:0:0:root")
    write(out / "result.txt", "r")
    (out / "passwd").symlink_to(secret)
    (out / "hostdir").symlink_to(secret.parent)
    os.mkfifo(out / "fifo")

    entries = zip_entries(results.package(out, tmp_path / "r.zip", max_bytes=MB))

    # Then the links are empty entries, nothing of the host is inside, the FIFO is skipped
    assert entries == {"result.txt": b"r", "passwd": b"", "hostdir": b""}
    for name in entries:
        assert not name.startswith("/") and ".." not in name.split("/")


def test_package_refuses_an_output_over_the_limit(out: Path, tmp_path: Path) -> None:
    write(out / "a.bin", "x" * 600)
    write(out / "sub" / "b.bin", "y" * 600)
    with pytest.raises(ResultError, match="over the limit of 1000 bytes"):
        results.package(out, tmp_path / "r.zip", max_bytes=1000)
    assert not (tmp_path / "r.zip").exists()


def test_package_refuses_too_long_file_names_like_iexec(out: Path, tmp_path: Path) -> None:
    write(out / ("n" * 32), "x")
    with pytest.raises(ResultError, match="longer than 31"):
        results.package(out, tmp_path / "r.zip", max_bytes=MB)
    assert results.package(out, tmp_path / "r.zip", max_bytes=MB, max_name_length=None).exists()


def test_package_refuses_a_zip_inside_the_output(out: Path) -> None:
    with pytest.raises(ValueError, match="must not be inside"):
        results.package(out, out / "r.zip", max_bytes=MB)


# --- the fake runner and outcomes ----------------------------------------------------------


def make_run(tmp_path: Path, **overrides: object) -> AppRun:
    fields: dict[str, object] = {
        "task_id": TASK_ID,
        "deal_id": DEAL_ID,
        "task_index": 0,
        "bot_first": 0,
        "bot_size": 1,
        "image": "workerpool-apps/echo:1",
        "args": ["a", "b"],
        "input_dir": tmp_path / "in",
        "output_dir": tmp_path / "out",
        "env": {},
        "timeout": 60.0,
        "memory_bytes": 64 * MB,
        "nano_cpus": 0,
        "output_limit_bytes": MB,
    }
    fields.update(overrides)
    return AppRun(**fields)  # type: ignore[arg-type]


def test_fake_runner_default_app_output_goes_through_the_result_steps(tmp_path: Path) -> None:
    runner = FakeRunner()
    run = make_run(tmp_path)

    outcome = runner.run(run)

    assert outcome.ok and runner.runs == [run]
    computed = results.read_computed(run.output_dir)
    digest = results.result_digest(run.output_dir, computed, has_callback=False)
    assert digest == results.sha256_file(run.output_dir / "result.txt")


def test_fake_runner_custom_behaviour_and_missing_image(tmp_path: Path) -> None:
    runner = FakeRunner(
        lambda run: RunOutcome(exit_code=3, stderr="boom\n", log_tail="boom\n"),
        missing_images=("gone:1",),
    )
    assert runner.run(make_run(tmp_path)).reason() == "app exited with code 3"
    with pytest.raises(AppImageError, match=r"gone:1"):
        runner.ensure_image("gone:1")
    assert runner.images == ["gone:1"]


def test_default_container_name_and_validation(tmp_path: Path) -> None:
    assert make_run(tmp_path).name == f"wp-{TASK_ID[:18]}"
    with pytest.raises(ValueError, match="container name"):
        make_run(tmp_path, name="bad name/with slash")
    with pytest.raises(ValueError, match="timeout"):
        make_run(tmp_path, timeout=0)


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        (RunOutcome(exit_code=0), "app exited with code 0"),
        (RunOutcome(exit_code=3), "app exited with code 3"),
        (
            RunOutcome(exit_code=137, timed_out=True, time_limit=300.0),
            "app ran past its time limit of 300 s and was stopped",
        ),
        (
            RunOutcome(exit_code=137, output_too_large=True, output_limit=100 * MB),
            "app output exceeded the limit of 100 MB and was stopped",
        ),
        (
            RunOutcome(exit_code=137, oom_killed=True, memory_limit=512 * MB),
            "app killed: out of memory (limit 512 MB)",
        ),
        (RunOutcome(exit_code=None, error="no such entrypoint"), "app container could not run"),
        (RunOutcome(exit_code=137, aborted=True), "app was stopped on request"),
    ],
)
def test_outcome_reason(outcome: RunOutcome, reason: str) -> None:
    assert outcome.reason().startswith(reason)
    assert outcome.ok is (reason == "app exited with code 0")
