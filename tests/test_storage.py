"""The two stores behind one interface: same behaviour for put/get/exists/list, atomic local writes, keys that
cannot leave their root, and S3 against a real SeaweedFS with enforced credentials."""

import os
import signal

import pytest

from worker.config import StorageSettings
from worker.storage import LocalStorage, S3Storage, StorageError, StorageUnavailable, open_storage

pytest_plugins = ["tests.fixtures_servers"]


@pytest.fixture
def local(tmp_path):
    return LocalStorage(tmp_path / "store")


@pytest.fixture
def s3(s3_server, s3_bucket, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return S3Storage(s3_bucket, "runs/nightly", s3_server.endpoint_url)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request):
    return request.getfixturevalue(request.param)


def test_put_then_get_returns_the_bytes(store):
    store.put("run-1/images/0000001-000.png", b"\x89PNG first")

    assert store.get("run-1/images/0000001-000.png") == b"\x89PNG first"
    assert store.exists("run-1/images/0000001-000.png")


def test_put_again_replaces_the_bytes(store):
    store.put("run-1/meta/0000001-000.json", b"{}")
    store.put("run-1/meta/0000001-000.json", b'{"again": true}')

    assert store.get("run-1/meta/0000001-000.json") == b'{"again": true}'


def test_a_missing_key_is_a_keyerror_and_does_not_exist(store):
    assert not store.exists("run-1/images/nope.png")
    with pytest.raises(KeyError):
        store.get("run-1/images/nope.png")


def test_list_returns_the_keys_under_a_prefix_sorted(store):
    for key in ("r/images/b.png", "r/images/a.png", "r/meta/a.json", "other/images/a.png"):
        store.put(key, b"x")

    assert store.list("r/images") == ["r/images/a.png", "r/images/b.png"]
    assert store.list("r") == ["r/images/a.png", "r/images/b.png", "r/meta/a.json"]
    assert store.list("empty") == []


@pytest.mark.parametrize("key", ["../x", "run/../../x", "/abs/x", "run//x", ".hidden", "run/.x.tmp", "a b",
                                 "run/images/\x00.png", ""])
def test_keys_that_could_escape_or_hide_are_refused(store, key):
    with pytest.raises(ValueError, match="storage key .* is not allowed"):
        store.put(key, b"x")


def test_local_put_leaves_no_temp_file_behind(local):
    local.put("run/images/a.png", b"x" * 1000)

    assert sorted(os.listdir(local.root / "run" / "images")) == ["a.png"]


def test_local_put_is_atomic_when_the_write_fails(local, monkeypatch):
    local.put("run/images/a.png", b"old complete image")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StorageUnavailable, match="No space left"):  # a full disk: the batch is retried later
        local.put("run/images/a.png", b"new image, never completed")

    assert local.get("run/images/a.png") == b"old complete image"
    assert sorted(os.listdir(local.root / "run" / "images")) == ["a.png"]


def test_open_storage_picks_the_backend_from_the_url(tmp_path, s3_server, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)

    assert isinstance(open_storage(StorageSettings(url=f"file://{tmp_path}")), LocalStorage)
    assert isinstance(open_storage(StorageSettings(url="s3://bucket/p", endpoint_url=s3_server.endpoint_url)),
                      S3Storage)
    assert isinstance(open_storage(StorageSettings(url="s3://bucket/p"), local_dir=tmp_path), LocalStorage)


@pytest.mark.integration
def test_s3_objects_land_under_the_prefix(s3, s3_server, s3_bucket):
    s3.put("run-1/images/0000001-000.png", b"png", "image/png")

    head = s3_server.client().head_object(Bucket=s3_bucket, Key="runs/nightly/run-1/images/0000001-000.png")
    assert head["ContentType"] == "image/png"
    assert s3.location("run-1/x.png") == f"s3://{s3_bucket}/runs/nightly/run-1/x.png"


@pytest.mark.integration
def test_s3_large_objects_go_up_in_parts_and_come_back_whole(s3):
    big = os.urandom(17 * 1024 * 1024)  # over the 16 MiB multipart threshold

    s3.put("run-1/big.bin", big)

    assert s3.get("run-1/big.bin") == big


@pytest.mark.integration
def test_s3_with_wrong_credentials_is_a_permanent_error(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    store = S3Storage(s3_bucket, "", s3_server.endpoint_url, max_attempts=1)

    with pytest.raises(StorageError) as refused:
        store.put("run/x.png", b"x")

    assert not isinstance(refused.value, StorageUnavailable)
    assert "SignatureDoesNotMatch" in str(refused.value)
    assert "wrong-secret" not in str(refused.value)


@pytest.mark.integration
def test_s3_down_is_unavailable_and_works_again_after_restart(s3, s3_server):
    s3_server.stop(signal.SIGKILL)
    quick = S3Storage(s3.bucket, s3.prefix, s3_server.endpoint_url, max_attempts=2)
    try:
        with pytest.raises(StorageUnavailable):
            quick.put("run-1/images/a.png", b"x")
    finally:
        s3_server.start()

    s3.put("run-1/images/a.png", b"after the outage")
    assert s3.get("run-1/images/a.png") == b"after the outage"
