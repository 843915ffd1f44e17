"""LoRA, embedding and VAE files of a deployment (the config's `adapters:` section): what `enqueue` checks a
run against and what workers load. Torch-free: listing and downloading only.

Layout, in the local folder `adapters.dir` and under the store `adapters.url` alike:
    loras/NAME.safetensors | NAME.pt | NAME.ckpt        a LoRA, named NAME in `loras` and <lora:NAME:w> tags
    embeddings/NAME.pt | NAME.safetensors | NAME.bin    a textual-inversion embedding, the prompt word NAME
    vaes/NAME.safetensors | NAME.pt | NAME.ckpt         a standalone VAE, named NAME in a job's `vae`
A name the local folder has is taken from there; otherwise a worker downloads the stored file into
`adapters.cache` once: to a temp file, checked against the stored object's size (and, for a single-part S3
object, its MD5 ETag), then renamed into place next to a `.sha256` sidecar; a cached file is used only while
its SHA-256 equals the sidecar's, so a partial or corrupted download is fetched again, never loaded.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from worker.config import AdapterSettings, parse_storage_url

KINDS = {"loras": (".safetensors", ".pt", ".ckpt"), "embeddings": (".pt", ".safetensors", ".bin"),
         "vaes": (".safetensors", ".pt", ".ckpt")}


class AdapterError(ValueError):
    """An adapter that is not where the config says, or whose download does not check out."""


class Adapters:
    def __init__(self, settings: AdapterSettings, endpoint_url: str | None = None):
        self.settings = settings
        self.local = Path(settings.dir) if settings.dir else None
        self.store = None
        if settings.url:
            from worker.storage import LocalStorage, S3Storage

            kind, place, prefix = parse_storage_url(settings.url, "adapters.url")
            self.store = LocalStorage(place) if kind == "file" else S3Storage(place, prefix, endpoint_url)
            url_key = hashlib.sha256(f"{settings.url}|{endpoint_url}".encode()).hexdigest()[:16]
            self.cache = Path(settings.cache) / url_key
        self._listing: dict[str, dict[str, tuple[str, str]]] = {}

    def available(self, kind: str) -> dict[str, tuple[str, str]]:
        """{name: ("local", path) | ("store", key)} of one kind (a key of KINDS), listed once."""
        if kind not in self._listing:
            found: dict[str, tuple[str, str]] = {}
            if self.store is not None:
                for key in self.store.list(kind):
                    name, ext = os.path.splitext(key[len(kind) + 1:])
                    if "/" not in name and ext.lower() in KINDS[kind]:
                        found.setdefault(name, ("store", key))
            if self.local is not None and (self.local / kind).is_dir():
                for path in sorted((self.local / kind).iterdir()):
                    if path.is_file() and path.suffix.lower() in KINDS[kind]:
                        found[path.stem] = ("local", str(path))
            self._listing[kind] = dict(sorted(found.items()))
        return self._listing[kind]

    def where(self, kind: str) -> str:
        return " and ".join(f"{part.rstrip('/')}/{kind}" for part in (self.settings.dir, self.settings.url)
                            if part) or "any adapter location (the config has no adapters: section)"

    def path(self, kind: str, name: str) -> Path:
        """A local file of the adapter `name`: the local folder's, or the store's downloaded and checked."""
        listing = self.available(kind)
        if name not in listing:
            raise AdapterError(f"{kind[:-1]} {name!r} is not in {self.where(kind)}; "
                               f"accepted: {', '.join(listing) or 'none there'}")
        source, place = listing[name]
        if source == "local":
            return Path(place)
        return self._cached(place)

    def _cached(self, key: str) -> Path:
        path = self.cache / key
        sidecar = path.with_name(path.name + ".sha256")
        if path.is_file() and sidecar.is_file() and sha256_of(path) == sidecar.read_text().strip():
            return path
        data, expected_size, md5 = self._download(key)
        if len(data) != expected_size:
            raise AdapterError(f"{self.store.location(key)}: downloaded {len(data)} bytes of {expected_size}")
        if md5 is not None and hashlib.md5(data).hexdigest() != md5:
            raise AdapterError(f"{self.store.location(key)}: the download does not match the stored MD5")
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(data).hexdigest()
        for target, content in ((path, data), (sidecar, digest.encode())):
            temp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            try:
                temp.write_bytes(content)
                os.replace(temp, target)
            finally:
                temp.unlink(missing_ok=True)
        return path

    def _download(self, key: str) -> tuple[bytes, int, str | None]:
        """(bytes, the stored object's size, its MD5 when the store gives one)."""
        from worker.storage import S3Storage, _translated_errors

        if not isinstance(self.store, S3Storage):
            data = self.store.get(key)
            return data, (self.store.root / key).stat().st_size, None
        with _translated_errors(f"get {self.store.location(key)}", missing_is_keyerror=key):
            response = self.store.client.get_object(Bucket=self.store.bucket, Key=self.store._key(key))
            data = response["Body"].read()
        etag = response.get("ETag", "").strip('"')
        md5 = etag if len(etag) == 32 and "-" not in etag else None  # multipart ETags are no MD5
        return data, response["ContentLength"], md5


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def loras_named(prompt: str, loras) -> list[str]:
    """The LoRA names a line uses: its `loras` field's and its prompt's <lora:NAME:w> tags' (torch-free)."""
    from sdcore.prompts import extract_networks

    _, tags = extract_networks(prompt)
    return list(dict.fromkeys([*(name for name, _ in loras), *(tag.name for tag in tags if tag.is_lora)]))
