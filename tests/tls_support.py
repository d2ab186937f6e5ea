"""A private CA and a server certificate made with openssl for a test (a Redis that speaks
TLS only): what an operator makes once for the pool's Redis (docs/deploy.md)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from conftest import require_service


def make_certs(folder: Path, names: str = "DNS:localhost,IP:127.0.0.1") -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) in ``folder``; the server certificate
    holds ``names`` (subjectAltName)."""
    if not shutil.which("openssl"):
        require_service("openssl", "not installed")
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    ca_subject = "/CN=workerpool test CA"
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj", ca_subject)
    openssl("req", *ec, "-keyout", "redis.key", "-out", "redis.csr", "-subj", "/CN=redis")
    (folder / "san.ext").write_text(f"subjectAltName={names}\n")
    sign = ("-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-extfile", "san.ext")
    openssl("x509", "-req", "-in", "redis.csr", *sign, "-out", "redis.crt", "-days", "1")
    return folder / "ca.crt", folder / "redis.crt", folder / "redis.key"
