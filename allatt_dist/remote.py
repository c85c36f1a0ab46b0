"""Object storage URIs: `s3://bucket/prefix`, `gs://...` -> the prefix, its pyarrow filesystem, and the
checks made before a command writes or reads there (one line each: storage.py is what uses them).

Endpoint and credentials come the standard way (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, instance roles); pyarrow ignores `AWS_ENDPOINT_URL`, so it is passed
on as `endpoint_override` (the URI's own `?endpoint_override=` wins) and travels with the `Remote` to the
workers. Credentials never do: every node has its own.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from allatt_dist.errors import UserError

SCHEMES = {"s3": "S3", "gs": "Google Cloud Storage", "gcs": "Google Cloud Storage"}
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_FS_CACHE: dict[tuple, object] = {}


def is_uri(text: str | os.PathLike) -> bool:
    """Whether `text` names object storage (any `scheme://`) rather than a local path."""
    return bool(_URI.match(str(text)))


@dataclass(frozen=True)
class Remote:
    """A prefix in object storage: `scheme://bucket/prefix` plus the filesystem's options (endpoint...)."""

    scheme: str  # s3 | gs | gcs
    path: str  # bucket/prefix, no trailing slash
    options: tuple[tuple[str, str], ...] = ()  # pyarrow URI options, the endpoint from the environment included

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.path}"

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    def key(self, rel: str = "") -> str:
        rel = rel.strip("/")
        return f"{self.path}/{rel}" if rel else self.path

    def filesystem(self):
        """The pyarrow filesystem (one per process and remote; credentials from the environment)."""
        cache_key = (self.scheme, self.bucket, self.options)
        if cache_key not in _FS_CACHE:
            _FS_CACHE[cache_key] = _make_filesystem(self)
        return _FS_CACHE[cache_key]

    def child(self, rel: str) -> Remote:
        return Remote(self.scheme, self.key(rel), self.options)


def _make_filesystem(remote: Remote):
    import pyarrow.fs as pafs

    opts = dict(remote.options)
    if remote.scheme == "s3":
        kwargs = {"endpoint_override": opts.get("endpoint_override"), "region": opts.get("region")}
        if opts.get("scheme"):
            kwargs["scheme"] = opts["scheme"]
        kwargs = {k: v for k, v in kwargs.items() if v}
        return pafs.S3FileSystem(
            **kwargs, connect_timeout=10, request_timeout=60, retry_strategy=pafs.AwsStandardS3RetryStrategy(3)
        )
    query = f"?{urlencode(opts)}" if opts else ""
    fs, _ = pafs.FileSystem.from_uri(f"{remote.scheme}://{remote.path}{query}")
    return fs


def parse_location(text: str, flag: str = "--out") -> Path | Remote:
    """What the user named: a local folder (as given) or a prefix in object storage; parsed here, once."""
    return parse_remote(text, flag) if is_uri(text) else Path(text)


def parse_remote(text: str, flag: str = "--out") -> Remote:
    """`scheme://bucket/prefix[?options]` -> Remote; one line for a scheme no filesystem here handles."""
    m = _URI.match(text)
    if not m:
        raise UserError(f"{flag} {text}: not a URI")
    scheme = m.group(1).lower()
    if scheme == "file":
        raise UserError(f"{flag} {text}: give a local path as a plain path, not file://")
    if scheme not in SCHEMES:
        allowed = ", ".join(f"{s}://" for s in SCHEMES)
        raise UserError(f"{flag} {text}: no filesystem for {scheme}:// here; give a local path or {allowed}")
    parts = urlsplit(text)
    path = f"{parts.netloc}{parts.path}".strip("/")
    if not parts.netloc:
        raise UserError(f"{flag} {text}: no bucket named; give {scheme}://BUCKET/PREFIX")
    opts = dict(parse_qsl(parts.query))
    if scheme == "s3" and "endpoint_override" not in opts and os.environ.get("AWS_ENDPOINT_URL"):
        endpoint = os.environ["AWS_ENDPOINT_URL"]  # what the AWS CLI and boto3 read; pyarrow does not
        opts["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            opts.setdefault("scheme", "http")
    if scheme == "s3" and opts.get("endpoint_override", "").startswith("http://"):
        opts.setdefault("scheme", "http")
    if scheme == "s3" and not opts.get("region"):
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            opts["region"] = region
    return Remote(scheme, path, tuple(sorted(opts.items())))


def _reason(e: BaseException) -> str:
    text = str(e)
    low = text.lower()
    if "no_such_bucket" in low or "nosuchbucket" in low or "bucket does not exist" in low:
        return "no such bucket"
    if "access_denied" in low or "accessdenied" in low or "forbidden" in low or "invalidaccesskeyid" in low:
        return "access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the instance role)"
    if "signaturedoesnotmatch" in low or "invalid_access_key" in low:
        return "access denied (the credentials are not valid there)"
    if "network_connection" in low or "could not connect" in low or "curl" in low or "timed out" in low:
        return "cannot connect (check AWS_ENDPOINT_URL / the network)"
    return (text.strip().splitlines() or [type(e).__name__])[0][:200]


def check_writable(remote: Remote, flag: str = "--out") -> None:
    """Before any work: the bucket exists and takes a write and a delete with these credentials (a probe
    object under the prefix, removed again). One line naming the URI and the reason otherwise."""
    import pyarrow.fs as pafs

    probe = remote.key(f".allatt-probe-{secrets.token_hex(4)}")
    try:
        fs = remote.filesystem()
        if remote.key() and fs.get_file_info(remote.key()).type == pafs.FileType.File:
            raise UserError(f"{flag} {remote.uri}: exists and is not a folder")  # as a local file is refused
        with fs.open_output_stream(probe) as f:
            f.write(b"probe\n")
        fs.delete_file(probe)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {remote.uri}: cannot write there: {_reason(e)}") from None


def check_readable(remote: Remote, what: str, flag: str) -> None:
    """`remote` holds something to read (a model directory, an experiment); one line otherwise."""
    import pyarrow.fs as pafs

    try:
        info = remote.filesystem().get_file_info(remote.key())
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {remote.uri}: cannot read there: {_reason(e)}") from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"{flag} {remote.uri}: no {what} there")
