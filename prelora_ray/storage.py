"""One filesystem layer for every file the project writes or reads under a storage path (pyarrow.fs, as Ray's).

A `Location` is a file or folder on a local disk (a path, or `file://`), on S3 or an S3-compatible
store (`s3://bucket/prefix`, with `?endpoint_override=HOST:PORT&scheme=http` in the URI or
`AWS_ENDPOINT_URL` in the environment for MinIO and the like) or on Google Cloud Storage
(`gs://bucket/prefix`). It is plain data (a scheme, a path and the URI's query), so it pickles into Ray
tasks and trials; each process builds the pyarrow filesystem once per bucket, with the credentials of
its own environment. `resolve()` checks a storage path before Ray starts: an unsupported scheme,
missing credentials, a missing bucket or an unreachable store is a one-line error naming the key.

What a reader can rely on, per backend:
- Local disks and shared mounts (NFS): a file is written to a temporary file in the same folder and
  renamed over the target (`os.replace`), so a reader sees the old file or the new one, never half of
  one. A folder (a checkpoint of several files) is written under `.partial-<name>` and renamed when
  complete. A claim is an exclusive create (`O_EXCL`).
- Object stores (S3, GCS) have no rename. An object written in one request (every JSON record here:
  history, status, fork records) appears whole or not at all. A large file (a checkpoint) goes up in
  parts, and pyarrow completes an upload when its stream is closed, even after an error, so a failed
  upload can leave a truncated object: it is followed by a manifest `<name>.manifest.json` (size and
  sha256) written last, after the data is complete, and readers trust only a file whose manifest is
  present and whose size matches it. A rewrite deletes the old manifest first. A folder gets one
  `MANIFEST.json` (every file and its size) last; a folder without it is not complete. A claim is a
  write then a read-back: two trials that claim the same key in the same instant can both train it,
  which costs time and never changes a result (twins compute the same thing).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MANIFEST_SUFFIX = ".manifest.json"
FOLDER_MANIFEST = "MANIFEST.json"
PARTIAL_PREFIX = ".partial-"
REMOTE_SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs"}
SUPPORTED = (
    "a local path, file://PATH, s3://BUCKET/PREFIX "
    "(S3, MinIO: add ?endpoint_override=HOST:PORT&scheme=http or set AWS_ENDPOINT_URL) or gs://BUCKET/PREFIX"
)
CLAIM_SETTLE_S = 0.5  # object stores: how long a claim waits before reading back whose write won
_CHUNK = 8 << 20

_FILESYSTEMS: dict[tuple[str, str, str], Any] = {}  # (scheme, bucket, query) -> pyarrow filesystem, per process


@dataclass(frozen=True)
class Location:
    """A file or folder under a storage path: local (scheme "") or in a bucket (s3, gs)."""

    scheme: str
    path: str  # local: an absolute path; remote: "bucket/key" without a leading or trailing slash
    query: str = ""  # the remote URI's query (endpoint_override, scheme, region...), kept by every child

    # -- naming --------------------------------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        """On a local disk or a mount (pathlib and os work on it)."""
        return not self.scheme

    @property
    def local(self) -> Path:
        """The local path (only for a local location)."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not a local path")
        return Path(self.path)

    @property
    def uri(self) -> str:
        """How to name it to a user or another process: a local path, or scheme://bucket/key?query."""
        if self.is_local:
            return self.path
        return f"{self.scheme}://{self.path}" + (f"?{self.query}" if self.query else "")

    @property
    def name(self) -> str:
        """The last path component."""
        return posixpath.basename(self.path) if not self.is_local else Path(self.path).name

    @property
    def bucket(self) -> str:
        """The bucket of a remote location ("" for a local one)."""
        return self.path.split("/", 1)[0] if not self.is_local else ""

    def __truediv__(self, name: str) -> Location:
        """A child: `loc / "trunk" / "history.json"`."""
        name = str(name).strip("/")
        if not name or ".." in name.split("/"):
            raise ValueError(f"invalid path component {name!r} under {self.uri}")
        if self.is_local:
            return Location("", str(Path(self.path) / name))
        return Location(self.scheme, f"{self.path}/{name}", self.query)

    @property
    def parent(self) -> Location:
        """The folder holding it (a bucket has none above it)."""
        if self.is_local:
            return Location("", str(Path(self.path).parent))
        if "/" not in self.path:
            raise ValueError(f"{self.uri} is a bucket: it has no parent")
        return Location(self.scheme, self.path.rsplit("/", 1)[0], self.query)

    def __str__(self) -> str:
        return self.uri

    # -- the filesystem ------------------------------------------------------------------------------

    @property
    def fs(self) -> Any:
        """The pyarrow filesystem (one per bucket and query in this process)."""
        import pyarrow.fs as pafs

        if self.is_local:
            return pafs.LocalFileSystem()
        key = (self.scheme, self.bucket, self.query)
        if key not in _FILESYSTEMS:
            _FILESYSTEMS[key] = pafs.FileSystem.from_uri(
                f"{self.scheme}://{self.bucket}" + (f"?{self.query}" if self.query else "")
            )[0]
        return _FILESYSTEMS[key]

    def ray_storage(self) -> tuple[str, Any]:
        """`RunConfig(storage_path=..., storage_filesystem=...)` for Ray Train and Ray Tune: the same filesystem."""
        return (self.path, None) if self.is_local else (self.path, self.fs)

    def _info(self) -> Any:
        return self.fs.get_file_info(self.path)

    # -- queries -------------------------------------------------------------------------------------

    def exists(self) -> bool:
        """A file or folder is there (on an object store: an object, or a prefix holding some)."""
        if self.is_local:
            return self.local.exists()
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        """A folder (on an object store: a prefix holding objects)."""
        if self.is_local:
            return self.local.is_dir()
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def mtime_ns(self) -> int | None:
        """Last modification time in ns, or None when absent."""
        if self.is_local:
            try:
                return self.local.stat().st_mtime_ns
            except FileNotFoundError:
                return None
        import pyarrow.fs as pafs

        info = self._info()
        return None if info.type == pafs.FileType.NotFound or info.mtime_ns is None else int(info.mtime_ns)

    def children(self) -> list[Location]:
        """What the folder holds directly, sorted by name; temporary, partial and manifest entries left out."""
        if self.is_local:
            if not self.local.is_dir():
                return []
            names = sorted(p.name for p in self.local.iterdir())
        else:
            import pyarrow.fs as pafs

            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False, allow_not_found=True))
            names = sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)
        return [
            self / n
            for n in names
            if not n.startswith(".") and not n.endswith(MANIFEST_SUFFIX) and n != FOLDER_MANIFEST
        ]

    # -- small files: one request, whole or absent ---------------------------------------------------

    def read_bytes(self) -> bytes:
        """The whole file; FileNotFoundError when absent."""
        if self.is_local:
            return self.local.read_bytes()
        if not self.exists():
            raise FileNotFoundError(self.uri)
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        """The file as UTF-8 text."""
        return self.read_bytes().decode()

    def read_json(self) -> Any:
        """The file as JSON; FileNotFoundError when absent."""
        return json.loads(self.read_bytes())

    def write_bytes(self, data: bytes) -> None:
        """Replace the file whole: a reader sees the old or the new content (see the module docstring)."""
        if self.is_local:
            replace_local(self.local, lambda tmp: tmp.write_bytes(data))
            return
        with self.fs.open_output_stream(
            self.path
        ) as f:  # data is ready before the stream opens: nothing half-done to commit
            f.write(data)

    def write_text(self, text: str) -> None:
        """Replace the file with UTF-8 text."""
        self.write_bytes(text.encode())

    def write_json(self, data: Any) -> None:
        """Replace the file with JSON."""
        self.write_bytes(json.dumps(data).encode())

    def create_exclusive(self, data: bytes) -> bool:
        """Create the file only if absent: True if this call created it (see the module docstring for object stores)."""
        if self.is_local:
            self.local.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.local, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.exists():
            return False
        self.write_bytes(data)
        time.sleep(CLAIM_SETTLE_S)  # a rival that wrote at the same instant: the store keeps the last write
        try:
            return self.read_bytes() == data
        except FileNotFoundError:
            return False

    def delete(self) -> None:
        """Remove the file (and its manifest); nothing if absent."""
        if self.is_local:
            self.local.unlink(missing_ok=True)
            return
        for loc in (self._manifest(), self):
            if loc.exists():
                loc.fs.delete_file(loc.path)

    def delete_tree(self) -> None:
        """Remove the folder and everything under it; nothing if absent."""
        if self.is_local:
            shutil.rmtree(self.local, ignore_errors=True)
        elif self.exists():
            self.fs.delete_dir(self.path)

    # -- large files: data first, manifest last -------------------------------------------------------

    def _manifest(self) -> Location:
        return self.parent / (self.name + MANIFEST_SUFFIX)

    def put_file(self, source: str | Path) -> None:
        """Copy a local file here so that no reader ever takes a partial copy for the file."""
        source = Path(source)
        if self.is_local:
            replace_local(self.local, lambda tmp: shutil.copyfile(source, tmp))
            return
        manifest = self._manifest()
        if manifest.exists():
            self.fs.delete_file(manifest.path)  # the old manifest must never vouch for a new, half-written file
        digest, size = hashlib.sha256(), 0
        with open(source, "rb") as src, self.fs.open_output_stream(self.path) as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
        manifest.write_json({"size": size, "sha256": digest.hexdigest()})

    def committed(self) -> bool:
        """The file is whole: present (local), or named by its manifest with the manifest's size (object store)."""
        if self.is_local:
            return self.local.is_file()
        try:
            size = self._manifest().read_json()["size"]
        except (FileNotFoundError, ValueError, KeyError):
            return False
        info = self._info()
        return info.size == size

    @contextlib.contextmanager
    def fetched(self) -> Iterator[Path]:
        """A local path holding the file (itself when local; a verified download, removed after, when remote)."""
        if self.is_local:
            yield self.local
            return
        if not self.committed():
            raise FileNotFoundError(f"{self.uri}: no complete copy (its manifest is missing or names another size)")
        with tempfile.TemporaryDirectory(prefix="prelora-") as tmp:
            target = Path(tmp) / self.name
            with self.fs.open_input_stream(self.path) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
            yield target

    # -- folders: files first, MANIFEST.json last -----------------------------------------------------

    def put_folder(self, source: str | Path) -> None:
        """Copy a local folder here as one unit: readers see it only once it is complete (`folder_complete`)."""
        source = Path(source)
        files = sorted(p for p in source.rglob("*") if p.is_file())
        if self.is_local:
            partial = self.local.parent / f"{PARTIAL_PREFIX}{self.local.name}"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(source, partial)
            if self.local.exists():  # the same folder written again (a retried epoch): the new one replaces it
                shutil.rmtree(self.local)
            partial.rename(self.local)
            return
        manifest = self / FOLDER_MANIFEST
        if manifest.exists():
            self.fs.delete_file(manifest.path)
        for f in files:
            rel = f.relative_to(source).as_posix()
            with open(f, "rb") as src, self.fs.open_output_stream(f"{self.path}/{rel}") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        manifest.write_json({"files": {f.relative_to(source).as_posix(): f.stat().st_size for f in files}})

    def folder_complete(self) -> bool:
        """Every file of the folder is there.

        A renamed folder (local), or all that its MANIFEST.json lists (object store).
        """
        if self.is_local:
            return self.local.is_dir()
        try:
            wanted = (self / FOLDER_MANIFEST).read_json()["files"]
        except (FileNotFoundError, ValueError, KeyError):
            return False
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        have = {i.path[len(self.path) + 1 :]: i.size for i in infos if i.type == pafs.FileType.File}
        return all(have.get(name) == size for name, size in wanted.items())

    @contextlib.contextmanager
    def fetched_folder(self) -> Iterator[Path]:
        """A local folder holding the folder's files (itself when local; a download, removed after, when remote)."""
        if self.is_local:
            yield self.local
            return
        wanted = (self / FOLDER_MANIFEST).read_json()["files"]
        with tempfile.TemporaryDirectory(prefix="prelora-") as tmp:
            for rel in wanted:
                target = Path(tmp) / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(f"{self.path}/{rel}") as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
            yield Path(tmp)


def replace_local(path: Path, write: Any) -> None:
    """Write through a temp file in the same folder, then rename: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- parsing and the pre-flight check -----------------------------------------------------------------


def location(value: str | Path | Location, *, key: str = "storage path") -> Location:
    """A Location from a path or URI (no network). Relative local paths are made absolute against the working directory.

    Raises:
        ValueError: one line naming `key`, for an unsupported scheme or a URI without a bucket.
    """
    if isinstance(value, Location):
        return value
    text = str(value)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if not scheme or (len(scheme) == 1 and os.name == "nt"):  # a plain path (or a Windows drive letter)
        return Location("", str(Path(text).expanduser().resolve()))
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{key}={text!r} is invalid: file:// URIs name a local path (file:///abs/path)")
        return Location("", str(Path(parts.path).resolve()))
    if scheme not in REMOTE_SCHEMES:
        raise ValueError(f"{key}={text!r} is invalid: unsupported scheme {scheme!r}; use {SUPPORTED}")
    if not parts.netloc:
        raise ValueError(f"{key}={text!r} is invalid: no bucket; use {scheme}://BUCKET/PREFIX")
    path = "/".join(p for p in f"{parts.netloc}/{parts.path}".split("/") if p)
    return Location(REMOTE_SCHEMES[scheme], path, parts.query)


def resolve(value: str | Path | Location, key: str) -> Location:
    """`location()` plus a check that the storage is usable (before Ray starts); errors are one line naming `key`.

    Remote: the URI's options are valid, credentials are there, the bucket exists and takes a write (a probe
    object is written and deleted). Local: only that the path is not a file.
    """
    loc = location(value, key=key)
    if loc.is_local:
        if loc.local.is_file():
            raise ValueError(f"{key}={loc.uri!r} is invalid: it is a file; give a folder")
        return loc
    _check_credentials(loc, key)
    probe = loc / f".prelora-probe-{uuid.uuid4().hex}"
    try:
        fs = _probe_filesystem(loc)
        with fs.open_output_stream(probe.path) as f:
            f.write(b"ok")
        fs.delete_file(probe.path)
    except Exception as exc:  # pyarrow's OSError / ValueError carry the store's own code in their text
        raise ValueError(f"{key}={loc.uri!r}: {_explain(loc, exc)}") from None
    return loc


def _probe_filesystem(loc: Location) -> Any:
    """The location's filesystem, for GCS with a bounded retry time.

    pyarrow's default keeps retrying for 15 minutes.
    """
    import pyarrow.fs as pafs

    if loc.scheme == "gs" and "retry_limit_seconds" not in loc.query:
        query = "&".join(q for q in (loc.query, "retry_limit_seconds=15") if q)
        return pafs.FileSystem.from_uri(f"gs://{loc.bucket}?{query}")[0]
    try:
        return loc.fs
    except Exception as exc:  # a bad query parameter, a region that cannot be resolved
        raise ValueError(_first_line(exc)) from None


AWS_CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def _aws_credentials_found() -> bool:
    """Credentials in the environment or the shared files (an EC2 instance role is not visible from here)."""
    if any(os.environ.get(k) for k in AWS_CREDENTIAL_ENV):
        return True
    files = (
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
        os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"),
    )
    return any(Path(f).expanduser().is_file() for f in files)


def _check_credentials(loc: Location, key: str) -> None:
    if loc.scheme != "s3":
        return  # GCS: the probe's OAuth2 error says it
    if os.environ.get("AWS_ACCESS_KEY_ID") and not os.environ.get("AWS_SECRET_ACCESS_KEY"):
        raise ValueError(f"{key}={loc.uri!r}: AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not")
    custom_endpoint = (
        "endpoint_override=" in loc.query or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    )
    if (
        custom_endpoint and not _aws_credentials_found()
    ):  # an S3-compatible store (MinIO...) has no instance role to fall back on
        raise ValueError(
            f"{key}={loc.uri!r}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        )


def _explain(loc: Location, exc: BaseException) -> str:
    """The store's error as one actionable line."""
    text = str(exc)
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text or ("NOT_FOUND" in text and loc.scheme == "gs"):
        return f"bucket {loc.bucket!r} does not exist; create it first"
    if "OAuth2 access token" in text or ("credentials" in text.lower() and loc.scheme == "gs"):
        return (
            "no GCS credentials: set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, "
            "or run on a VM with a service account"
        )
    if any(
        code in text
        for code in (
            "ACCESS_DENIED",
            "AccessDenied",
            "INVALID_ACCESS_KEY",
            "SIGNATURE_DOES_NOT_MATCH",
            "PERMISSION_DENIED",
            "403",
        )
    ):
        hint = (
            ""
            if loc.scheme != "s3" or _aws_credentials_found()
            else " (no credentials in the environment or ~/.aws: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
        return f"access denied to bucket {loc.bucket!r}: check the credentials and the bucket's policy{hint}"
    if any(
        code in text
        for code in ("NETWORK_CONNECTION", "curlCode", "UNAVAILABLE", "Could not connect", "Could not resolve")
    ):
        return (
            f"the store is not reachable ({_first_line(exc)}); "
            "check endpoint_override / AWS_ENDPOINT_URL and the network"
        )
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]
