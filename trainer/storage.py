"""Every file a run reads or writes, by local path or filesystem URI: one layer over `pyarrow.fs`.

    data.train / data.test     Parquet, listed here and read row group by row group (trainer.data)
    train.out_dir              checkpoints (torch.distributed.checkpoint through `dcp_writer` /
                               `dcp_reader`), metrics.jsonl (`AppendLog`), config.yaml, logs
    train.plan, counts         small files (`read_bytes`, `write_bytes`)

A path is local unless it has a scheme: `s3://bucket/key`, `gs://…`, `hdfs://host/path`,
`file:///abs/path`. Endpoints and credentials come from the standard environment of each store
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` for an
S3-compatible server; `GOOGLE_APPLICATION_CREDENTIALS`; the Hadoop configuration), never from a
file of the project. S3 requests time out (`CONNECT_TIMEOUT_S`, `REQUEST_TIMEOUT_S`) and are
retried `ATTEMPTS` times; a store that still fails is a `StorageError`: one line naming the URI
and the cause, with that retry budget.

Object stores have no rename and no append: checkpoints are complete when their manifest exists
(written last, trainer.checkpoint), and `AppendLog` rewrites the whole object when it flushes.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.fs as pafs

from trainer.config import ConfigError

ATTEMPTS = 3
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 30.0
BUDGET = f"{ATTEMPTS} attempts, {CONNECT_TIMEOUT_S:g} s connect / {REQUEST_TIMEOUT_S:g} s request timeout"

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")


class StorageError(ConfigError):
    """A file or store that cannot be reached or read: one line naming the URI and the cause."""


def is_uri(path: str) -> bool:
    return _SCHEME.match(str(path)) is not None


def join(base: str, *parts: str) -> str:
    """`base`/`part`/…, for local paths and URIs alike."""
    if not is_uri(base):
        return os.path.join(base, *parts)
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def name(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def parent(path: str) -> str:
    if not is_uri(path):
        return os.path.dirname(os.path.abspath(path))
    return str(path).rstrip("/").rsplit("/", 1)[0]


def absolute(path: str) -> str:
    """A URI as it is; a local path made absolute (workers may start in another directory)."""
    return str(path) if is_uri(path) else os.path.abspath(path)


# ---------------------------------------------------------------------------------- filesystems

_FILESYSTEMS: dict[tuple, pafs.FileSystem] = {}
_ENV = (  # a filesystem is made again when these change (its client reads them when it is made)
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of `path` and the path inside it."""
    m = _SCHEME.match(str(path))
    if m is None:
        return _filesystem("local", ""), os.path.abspath(path)
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme == "file":
        return _filesystem("local", ""), "/" + rest.lstrip("/")
    if scheme in ("s3", "s3a"):
        return _filesystem("s3", ""), rest.rstrip("/")
    authority = rest.split("/", 1)[0]
    with _errors(path):
        fs = _filesystem(scheme, authority, uri=str(path))
    if scheme in ("hdfs", "viewfs"):  # the authority is the name node: paths start at its root
        return fs, "/" + rest.split("/", 1)[1].rstrip("/") if "/" in rest else "/"
    return fs, rest.rstrip("/")  # gs://bucket/key and the like: bucket/key, as pyarrow names it


def _filesystem(scheme: str, authority: str, uri: str = "") -> pafs.FileSystem:
    key = (scheme, authority, *(os.environ.get(k) for k in _ENV))
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        if scheme == "local":
            fs = pafs.LocalFileSystem()
        elif scheme == "s3":
            region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            where = {}
            if endpoint:  # an S3-compatible server (MinIO, Ceph, moto, …): the AWS SDK's variable
                scheme_, _, host = endpoint.partition("://")
                where = (
                    dict(endpoint_override=host.rstrip("/"), scheme=scheme_)
                    if host
                    else {"endpoint_override": endpoint}
                )
            fs = pafs.S3FileSystem(
                **where,
                region=region,
                connect_timeout=CONNECT_TIMEOUT_S,
                request_timeout=REQUEST_TIMEOUT_S,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=ATTEMPTS),
            )
        else:
            fs = pafs.FileSystem.from_uri(uri)[0]
        _FILESYSTEMS[key] = fs
    return fs


@contextmanager
def _errors(uri: str, doing: str = "") -> Iterator[None]:
    """OSError and Arrow errors of a store -> StorageError naming `uri` and the cause."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageError(f"{uri}: not found{doing}") from None
    except (OSError, pa.ArrowException) as e:
        raise StorageError(f"{uri}: {cause(e)}{doing}") from None


def cause(e: BaseException) -> str:
    """The cause of a store's error in a few words, and for a remote store the retry budget."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = re.sub(r"\s*\(Request ID: [^)]*\)", "", text)
    known = [
        ("NO_SUCH_BUCKET", "no such bucket"),
        ("NoSuchBucket", "no such bucket"),
        ("INVALID_ACCESS_KEY_ID", "credentials refused (AWS_ACCESS_KEY_ID)"),
        ("InvalidAccessKeyId", "credentials refused (AWS_ACCESS_KEY_ID)"),
        ("SIGNATURE_DOES_NOT_MATCH", "credentials refused (AWS_SECRET_ACCESS_KEY)"),
        ("ACCESS_DENIED", "access denied (the credentials AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or a policy)"),
        ("AccessDenied", "access denied (the credentials AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or a policy)"),
        ("NETWORK_CONNECTION", "endpoint unreachable"),
        ("Couldn't connect", "endpoint unreachable"),
        ("Could not connect", "endpoint unreachable"),
        ("Connection refused", "endpoint unreachable"),
        ("Failed to connect", "endpoint unreachable"),
    ]
    for marker, short in known:
        if marker in text:
            endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
            where = f", endpoint {endpoint}" if short == "endpoint unreachable" and endpoint else ""
            return f"{short}{where} (after {BUDGET})"
    return text[:300]


# ---------------------------------------------------------------------------------- files


def info(path: str) -> pafs.FileInfo:
    fs, p = resolve(path)
    with _errors(path):
        return fs.get_file_info(p)


def exists(path: str) -> bool:
    return info(path).type != pafs.FileType.NotFound


def is_file(path: str) -> bool:
    return info(path).type == pafs.FileType.File


def is_dir(path: str) -> bool:
    """A directory; on an object store, a prefix with objects under it."""
    return info(path).type == pafs.FileType.Directory


def list_dir(path: str) -> list[str]:
    """The paths of the entries directly under `path`, sorted; [] if it does not exist."""
    fs, p = resolve(path)
    with _errors(path):
        entries = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(join(path, e.base_name) for e in entries)


def files(spec: str) -> list[str]:
    """A file, a directory (every file directly in it) or a glob (on a URI: `*`, `?`, `[…]` in the
    last component only) -> the sorted files it names; [] if none."""
    if any(c in spec for c in "*?[") and not is_uri(spec):
        return sorted(p for p in glob.glob(spec) if os.path.isfile(p))
    if any(c in spec for c in "*?["):
        base, pattern = spec.rstrip("/").rsplit("/", 1) if "/" in spec else (".", spec)
        if any(c in base for c in "*?["):
            raise StorageError(f"{spec}: wildcards only in the last path component")
        return [p for p in list_dir(base) if fnmatch.fnmatchcase(name(p), pattern)]
    kind = info(spec).type
    if kind == pafs.FileType.NotFound and is_uri(spec):
        _check_bucket(spec)
    if kind == pafs.FileType.File:
        return [spec]
    if kind == pafs.FileType.Directory:
        fs, p = resolve(spec)
        with _errors(spec):
            entries = fs.get_file_info(pafs.FileSelector(p))
        return sorted(join(spec, e.base_name) for e in entries if e.type == pafs.FileType.File)
    return []


def _check_bucket(uri: str) -> None:
    """StorageError if the bucket (the URI's first component) of a missing path does not exist."""
    m = _SCHEME.match(uri)
    bucket = f"{m.group(1)}://{m.group(2).split('/', 1)[0]}"
    if bucket != uri.rstrip("/") and info(bucket).type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: no such bucket ({bucket})")


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with _errors(path):
        with fs.open_input_stream(p) as f:
            return f.read()


def read_from(path: str, offset: int) -> bytes:
    """The bytes of a file from `offset` on (one range request on an object store)."""
    fs, p = resolve(path)
    with _errors(path):
        with fs.open_input_file(p) as f:
            f.seek(min(offset, f.size()))
            return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file (creating its directories). Local files are written to a temporary
    name, synced and renamed: a reader sees the old content or the new, never a part."""
    fs, p = resolve(path)
    with _errors(path, " (writing)"):
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        if isinstance(fs, pafs.LocalFileSystem):
            tmp = f"{p}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        else:
            with fs.open_output_stream(p) as f:
                f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def make_dirs(path: str) -> None:
    fs, p = resolve(path)
    with _errors(path, " (creating it)"):
        fs.create_dir(p, recursive=True)


def remove_tree(path: str) -> None:
    """Remove a directory (or prefix) and everything under it; nothing if it does not exist."""
    fs, p = resolve(path)
    with _errors(path, " (removing it)"):
        if fs.get_file_info(p).type != pafs.FileType.NotFound:
            fs.delete_dir(p)


def remove(path: str) -> None:
    fs, p = resolve(path)
    with _errors(path, " (removing it)"):
        fs.delete_file(p)


def open_input(path: str) -> pa.NativeFile:
    """A random-access file (Parquet reads its footer and row groups by range)."""
    fs, p = resolve(path)
    with _errors(path):
        return fs.open_input_file(p)


# ---------------------------------------------------------------------------------- checkpoints


def _fsspec_options(path: str) -> dict:
    """fsspec's S3 store (s3fs, through botocore) with the same timeouts and attempts as pyarrow's;
    it reads AWS_ENDPOINT_URL and the credentials from the environment itself."""
    if str(path).split("://", 1)[0].lower() not in ("s3", "s3a"):
        return {}
    config = {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": REQUEST_TIMEOUT_S}
    return {"config_kwargs": {**config, "retries": {"max_attempts": ATTEMPTS, "mode": "standard"}}}


def dcp_writer(path: str):
    """torch.distributed.checkpoint's writer for a checkpoint directory: its FileSystemWriter on a
    local path, its fsspec writer on a URI."""
    if not is_uri(path):
        from torch.distributed.checkpoint import FileSystemWriter

        return FileSystemWriter(path)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(path, **_fsspec_options(path))


def dcp_reader(path: str):
    if not is_uri(path):
        from torch.distributed.checkpoint import FileSystemReader

        return FileSystemReader(path)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(path, **_fsspec_options(path))


# ---------------------------------------------------------------------------------- logs


class AppendLog:
    """A text file that grows by lines (metrics.jsonl). A local file is appended to and flushed
    per line; on an object store (no append) the whole object is rewritten, at most every
    `every_s` seconds, at `sync()` and at `close()`."""

    def __init__(self, path: str, every_s: float = 5.0):
        self.path, self.every_s = path, every_s
        self.remote = is_uri(path)
        if self.remote:
            self.buf = io.StringIO()
            if exists(path):
                self.buf.write(read_text(path))
            self.written = time.monotonic()
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.f = open(path, "a")

    def write(self, text: str) -> None:
        if self.remote:
            self.buf.write(text)
            if time.monotonic() - self.written >= self.every_s:
                self.sync()
        else:
            self.f.write(text)
            self.f.flush()

    def sync(self) -> None:
        if self.remote:
            write_text(self.path, self.buf.getvalue())
            self.written = time.monotonic()

    def close(self) -> None:
        if self.remote:
            self.sync()
        else:
            self.f.close()

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sizes(directory: str, recursive: bool = False) -> dict[str, int]:
    """{path relative to `directory`: bytes} of the files under it, in one listing; {} if none."""
    fs, p = resolve(directory)
    with _errors(directory):
        entries = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=recursive))
    base = p.rstrip("/") + "/"
    return {e.path.removeprefix(base): e.size for e in entries if e.type == pafs.FileType.File}


def sha256(path: str) -> str:
    """The sha256 of a file, read as a stream."""
    import hashlib

    digest = hashlib.sha256()
    fs, p = resolve(path)
    with _errors(path):
        with fs.open_input_stream(p) as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()
