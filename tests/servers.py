"""Real servers on 127.0.0.1 for the tests: an S3 API (moto in server mode) and an MLflow tracking server.

Each runs in its own process group (they fork workers), answers before the fixture yields, and is
killed with its group afterwards. No mocks inside the test process: clients talk HTTP to them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def kill_session(sid: int) -> None:
    """SIGKILL every process of a session (a process started with start_new_session=True and all it started,
    whatever their process groups)."""
    import psutil

    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


def kill_mentioning(text: str) -> None:
    """SIGKILL every process whose command line mentions `text` (a `ray start` head's daemons leave the session of the
    shell that started them: their command lines name the head's temp folder)."""
    import psutil

    for p in psutil.process_iter():
        try:
            if any(text in part for part in p.cmdline()):
                p.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, what: str, timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not answer {url} within {timeout_s} s")


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@contextmanager
def moto_server(log_dir: Path) -> Iterator[str]:
    """`python -m moto.server` on a free loopback port; yields its endpoint HOST:PORT."""
    port = free_port()
    log = open(log_dir / "moto.log", "w")  # noqa: SIM115 - open for the server's lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/", proc, "moto server")
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc)
        log.close()


def create_bucket(endpoint: str, name: str | None = None) -> str:
    """A new bucket on the S3 server (a fresh name unless given); returns its name."""
    import boto3

    name = name or f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=f"http://{endpoint}", **_boto_credentials()).create_bucket(Bucket=name)
    return name


def bucket_keys(endpoint: str, bucket: str) -> list[str]:
    """Every object key in the bucket."""
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://{endpoint}", **_boto_credentials())
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


def s3_uri(endpoint: str, bucket: str, prefix: str = "") -> str:
    """The storage URI of a prefix in a bucket of the test server, as a user writes it."""
    path = f"{bucket}/{prefix}".rstrip("/")
    return f"s3://{path}?endpoint_override={endpoint}&scheme=http"


@contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """`mlflow server` with a sqlite backend and its own artifact serving; yields its http:// URI."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "server.log", "w")  # noqa: SIM115
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{folder / 'server.db'}",
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, "mlflow server", timeout_s=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)
        log.close()


def local_s3_folders(*roots: Path) -> list[Path]:
    """Folders named like a URI scheme turned into a path (`s3:`), anywhere under the roots: there must be none."""
    found = []
    for root in roots:
        if root.is_dir():
            found += [p for p in root.rglob("*") if p.name in ("s3:", "gs:") and p.is_dir()]
    return found
