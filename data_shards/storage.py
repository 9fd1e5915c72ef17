"""Storage: one way to reach a dataset root, whether a local folder or any fsspec URL.

Paths stay `str` end to end: a `pathlib.Path` turns `s3://bucket/x` into `s3:/bucket/x`.

S3 goes through s3fs (webdataset has no native S3 handler, and shelling out to a CLI hides
errors and credentials in process tables). The endpoint comes from the environment
(`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`), as boto does, so the same code reaches AWS, a
MinIO cluster, or the local test server; credentials come from the usual boto chain and are
never logged. Retries use botocore's "standard" mode.

Atomic publication: a local file is written under a temporary name in the same folder and
renamed; an object store publishes an object only when its upload completes, so a reader never
sees half a file under the final name in either case.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

from .format import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ManifestError, parse_json, parse_manifest

__all__ = [
    "is_remote",
    "join",
    "get_fs",
    "storage_options",
    "open_file",
    "read_bytes",
    "exists",
    "publish_file",
    "write_bytes_atomic",
    "read_json",
    "read_manifest",
    "write_manifest",
    "remove",
    "redact",
]


# scheme://user:secret@host -> scheme://host; ?X-Amz-Signature=...&... (a signed URL) -> ?<redacted>
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@'\"]*@")
_QUERY_RE = re.compile(r"(?P<url>[A-Za-z][A-Za-z0-9+.\-]*://[^\s?#'\"]*)[?#][^\s'\"]*")


def redact(text: str) -> str:
    """`text` with the user info and the query string of every URL in it removed.

    Credentials ride in URLs as `user:password@` or as a signed query string; neither may reach
    a manifest, a report, a log line or an error message. The path is kept: it says where.
    """
    return _QUERY_RE.sub(r"\g<url>?<redacted>", _USERINFO_RE.sub(r"\g<scheme>", text))


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def join(root: str, *parts: str) -> str:
    if is_remote(root):
        return posixpath.join(root.rstrip("/"), *parts)
    return os.path.join(root, *parts)


def storage_options(url: str, anon: bool = False) -> dict[str, Any]:
    """Options for fsspec from the environment; empty for local paths.

    `anon`: S3 requests go unsigned (a public bucket such as OpenImages' own), so no credential
    is needed or sent; the retry settings and endpoint stay.
    """
    if url.startswith(("http://", "https://")):
        # aiohttp's default is a 5-minute total per request: a host that drops packets would
        # stall one image (and each retry of it) that long. CSL_HTTP_TIMEOUT_S bounds it.
        import aiohttp

        total = float(os.environ.get("CSL_HTTP_TIMEOUT_S", "60"))
        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=total, sock_connect=min(total, 10.0))}}
    if not url.startswith(("s3://", "s3a://")):
        return {}
    opts: dict[str, Any] = {
        "config_kwargs": {"retries": {"max_attempts": int(os.environ.get("CSL_S3_RETRIES", "8")), "mode": "standard"}},
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    if anon:
        opts["anon"] = True
    return opts


def get_fs(url: str, anon: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(url, **storage_options(url, anon))


def open_file(url: str, mode: str = "rb") -> IO[bytes]:
    fs, path = get_fs(url)
    return fs.open(path, mode)


def read_bytes(url: str, anon: bool = False) -> bytes:
    fs, path = get_fs(url, anon)
    return fs.cat_file(path)


def exists(url: str) -> bool:
    fs, path = get_fs(url)
    return fs.exists(path)


def remove(url: str) -> None:
    fs, path = get_fs(url)
    if fs.exists(path):
        fs.rm(path)


def publish_file(local_tmp: str, url: str) -> None:
    """Move a complete local file to its final place (a rename, or an upload then delete)."""
    if is_remote(url):
        fs, path = get_fs(url)
        fs.put_file(local_tmp, path)
        os.unlink(local_tmp)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
        os.replace(local_tmp, url)


def write_bytes_atomic(url: str, data: bytes) -> None:
    if is_remote(url):
        fs, path = get_fs(url)
        fs.pipe_file(path, data)
        return
    folder = os.path.dirname(os.path.abspath(url))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(url)}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, url)


def read_json(url: str, what: str) -> Any:
    """A small JSON file (a checkpoint's state, a run's snapshot) that may have been tampered
    with: size, encoding and nesting guarded, errors (ValueError) name the file."""
    return parse_json(read_bytes(url), redact(url), what, ValueError, MAX_MANIFEST_BYTES)


def read_manifest(root: str) -> Manifest:
    url = join(root, MANIFEST_NAME)
    try:
        data = read_bytes(url)
    except FileNotFoundError:
        raise ManifestError(
            f"{url}: not found (not a dataset root, or a conversion that did not finish)"
        ) from None
    return parse_manifest(data, where=url)


def write_manifest(root: str, manifest: Manifest) -> None:
    write_bytes_atomic(join(root, MANIFEST_NAME), manifest.to_json().encode())
