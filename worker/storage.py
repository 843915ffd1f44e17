"""Where images go: one small interface (put / get / exists / list), two backends.

Keys are relative ("RUN/images/JOB.png") and built from validated ids only, never from prompt text; each
backend places them under its root (a directory, or a bucket and prefix). A put is atomic: S3 objects appear
whole on one PUT (or one completed multipart upload), the local store writes a temp file and renames it.

StorageUnavailable means "try again later" (network down, 5xx, throttling after the client's own retries);
any other StorageError is permanent (missing bucket, access denied).
"""

from __future__ import annotations

import errno
import io
import os
import re
import secrets
from pathlib import Path
from typing import Protocol

from worker.config import StorageSettings, parse_storage_url

KEY_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*")
MULTIPART_THRESHOLD = 16 * 1024 * 1024


class StorageError(Exception):
    """A storage operation failed for a reason that retrying will not fix."""


class StorageUnavailable(StorageError):
    """The store did not answer (or answered 5xx) even after retries: retry the work later."""


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    # put unless the key exists, as one atomic step: False (nothing written) when it did
    def create(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool: ...

    def get(self, key: str) -> bytes: ...  # KeyError when absent

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[str]: ...  # keys under prefix, sorted

    def location(self, key: str) -> str: ...  # where a person finds it (URL or path)

    @property
    def identity(self) -> str: ...  # which store this is, whoever opens it: what a run's messages carry


def check_key(key: str) -> str:
    # segments may not start with "." either, which rules out "..", "." and the local store's temp files
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise ValueError(f"storage key {key!r} is not allowed; accepted: /-separated segments of "
                         "A-Z a-z 0-9 _ . - not starting with '.'")
    return key


def open_storage(settings: StorageSettings, local_dir: str | os.PathLike | None = None) -> Storage:
    """The store the settings name; `local_dir` replaces it by a local directory (`sdbatch run --out`)."""
    if local_dir is not None:
        return LocalStorage(local_dir)
    kind, place, prefix = parse_storage_url(settings.url)
    if kind == "file":
        return LocalStorage(place)
    return S3Storage(place, prefix, settings.endpoint_url)


class LocalStorage:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self.root / check_key(key)
        with _local_errors("put", path):
            temp = self._write_temp(path, data)
            try:
                os.replace(temp, path)
            finally:
                temp.unlink(missing_ok=True)

    def create(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        path = self.root / check_key(key)
        with _local_errors("create", path):
            temp = self._write_temp(path, data)
            try:
                os.link(temp, path)  # atomic, and refused when the name exists, unlike os.replace
                return True
            except FileExistsError:
                return False
            finally:
                temp.unlink(missing_ok=True)

    def _write_temp(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        # unique temp name in the same directory: concurrent writers of one key never share a temp file, and
        # os.replace within a filesystem is atomic, so a reader sees the old file or the new one, never half
        temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp

    def get(self, key: str) -> bytes:
        path = self.root / check_key(key)
        with _local_errors("get", path):
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        path = self.root / check_key(key)
        with _local_errors("check", path):
            return path.is_file()

    def list(self, prefix: str) -> list[str]:
        base = self.root / check_key(prefix.rstrip("/"))
        with _local_errors("list", base):
            if not base.is_dir():
                return []
            return sorted(path.relative_to(self.root).as_posix() for path in base.rglob("*")
                          if path.is_file() and not path.name.startswith("."))

    def location(self, key: str) -> str:
        return str(self.root / key)

    @property
    def identity(self) -> str:
        return f"file://{self.root.resolve()}"


class _local_errors:
    """OSError of the local store -> StorageError naming the path (a read-only folder, a file where a folder
    should be, ...), or StorageUnavailable for a full disk: freeing space fixes that, not a config change."""

    def __init__(self, action: str, path: Path):
        self.action, self.path = action, path

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if not isinstance(error, OSError):
            return False
        problem = error.strerror or str(error)
        where = f" ({error.filename})" if error.filename and str(error.filename) != str(self.path) else ""
        kind = StorageUnavailable if error.errno in (errno.ENOSPC, errno.EDQUOT) else StorageError
        raise kind(f"{self.action} {self.path}: {problem}{where}; accepted: a folder this process can read "
                   "and write") from None


class S3Storage:
    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, max_attempts: int = 8):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix, self.endpoint_url = bucket, prefix.strip("/"), endpoint_url
        # credentials: boto3's standard chain only (AWS_* variables, profiles, instance roles)
        session = boto3.session.Session()
        self.client = session.client(
            "s3", endpoint_url=endpoint_url, region_name=session.region_name or "us-east-1",
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          # "standard" retries connection errors, 5xx and throttling with exponential backoff
                          retries={"mode": "standard", "max_attempts": max_attempts},
                          connect_timeout=5, read_timeout=60))
        self.transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                                       multipart_chunksize=MULTIPART_THRESHOLD, use_threads=False)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        with _translated_errors(f"put {self.location(key)}"):
            if len(data) < MULTIPART_THRESHOLD:  # one request, without the transfer manager's set-up
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                       ContentType=content_type)
            else:
                self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key),
                                           ExtraArgs={"ContentType": content_type}, Config=self.transfer)

    def create(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        # one PUT whatever the size (S3 takes up to 5 GB in one): a conditional multipart upload is not
        # something every S3-compatible store implements
        try:
            with _translated_errors(f"create {self.location(key)}"):
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                       ContentType=content_type, IfNoneMatch="*")
            return True
        except _KeyExists:
            return False

    def get(self, key: str) -> bytes:
        with _translated_errors(f"get {self.location(key)}", missing_is_keyerror=key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            with _translated_errors(f"head {self.location(key)}", missing_is_keyerror=key):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except KeyError:
            return False

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix.rstrip("/")) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        with _translated_errors(f"list {self.location(prefix)}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                keys += [item["Key"][strip:] for item in page.get("Contents", [])]
        return sorted(keys)

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    @property
    def identity(self) -> str:
        # not the endpoint: one service is often reached under two names (in-cluster and port-forwarded)
        return f"s3://{self.bucket}/{self.prefix}"


class _KeyExists(Exception):
    """A conditional create found the key taken (412 Precondition Failed)."""


# Credentials the store refuses: a configuration error, not an outage to wait out
REFUSED_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                       "ExpiredToken", "AuthorizationHeaderMalformed")
CREDENTIALS_ACCEPTED = ("S3 credentials in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile, "
                        "AWS_PROFILE) that the store accepts")


class _translated_errors:
    """botocore's exceptions -> KeyError (absent object), StorageUnavailable (transient), StorageError."""

    def __init__(self, action: str, missing_is_keyerror: str | None = None):
        self.action, self.missing = action, missing_is_keyerror

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        if error is None:
            return False
        if isinstance(error, NoCredentialsError | PartialCredentialsError):
            raise StorageError(f"{self.action}: no S3 credentials ({error}); accepted: "
                               f"{CREDENTIALS_ACCEPTED}") from None
        if isinstance(error, ClientError):
            code = error.response.get("Error", {}).get("Code", "")
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if self.missing is not None and (status == 404 or code in ("NoSuchKey", "404", "NotFound")):
                raise KeyError(self.missing) from None
            if status == 412 or code == "PreconditionFailed":
                raise _KeyExists() from None
            if code in REFUSED_CREDENTIALS or status == 403:
                raise StorageError(f"{self.action}: the store refused the credentials ({code or status}); "
                                   f"accepted: {CREDENTIALS_ACCEPTED}") from None
            transient = status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout")
            kind = StorageUnavailable if transient else StorageError
            raise kind(f"{self.action}: {code or status} ({error})") from None
        if isinstance(error, BotoCoreError):  # connection refused, timeouts, DNS: the store is unreachable
            raise StorageUnavailable(f"{self.action}: {error}") from None
        return False
