"""The adapter store on S3 or an S3-compatible server (SeaweedFS, MinIO, Ceph RGW).

Every write is one conditional PUT: `If-None-Match: *` creates a version file or a manifest only
if absent; `If-Match: <etag>` replaces or deletes a manifest only if no one changed it since it
was read. A version's files are written before any manifest names it. Credentials come from the
standard AWS sources (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, profiles, instance roles).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
import botocore.config
import botocore.exceptions

from adapters.store.protocol import (
    VERSION_FILES,
    ManifestConflict,
    ManifestEntry,
    StoredManifest,
    StoreError,
    version_files,
)

logger = logging.getLogger(__name__)

_PRECONDITION_FAILED = {"PreconditionFailed", "412"}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_CONNECT_TIMEOUT_SECONDS = 5
_READ_TIMEOUT_SECONDS = 60


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Store:
    """Versions and manifests under `s3://bucket/prefix`."""

    def __init__(self, client: Any, bucket: str, prefix: str, url: str) -> None:
        self._s3 = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = url

    @classmethod
    def from_url(cls, url: str, endpoint_url: str | None = None) -> S3Store:
        parsed = urlparse(url)
        if not parsed.netloc:
            raise ValueError("an S3 adapter store is s3://bucket or s3://bucket/prefix")
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            config=botocore.config.Config(
                connect_timeout=_CONNECT_TIMEOUT_SECONDS,
                read_timeout=_READ_TIMEOUT_SECONDS,
                retries={"max_attempts": 3, "mode": "standard"},
                s3={"addressing_style": "path"},  # S3-compatible servers rarely do virtual hosts
            ),
        )
        return cls(client, parsed.netloc, parsed.path, url)

    def _key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts] if self.prefix else parts)

    def _call(self, what: str, method: Any, **kwargs: Any) -> Any:
        """One S3 call; a failure other than a lost condition or a missing key is a StoreError."""
        try:
            return method(Bucket=self.bucket, **kwargs)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in _PRECONDITION_FAILED | _NOT_FOUND:
                raise
            logger.error("adapter store %s: %s failed: %s", self.url, what, exc)
            raise StoreError(f"the adapter store refused to {what}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            logger.error("adapter store %s: %s failed: %s", self.url, what, exc)
            raise StoreError(f"the adapter store could not {what}") from exc

    # Versions

    def has_version(self, digest: str) -> bool:
        listed = self._call(
            "list a version",
            self._s3.list_objects_v2,
            Prefix=self._key("versions", digest) + "/",
        )
        names = {item["Key"].rsplit("/", 1)[-1] for item in listed.get("Contents", [])}
        return "adapter_config.json" in names and bool(names & set(VERSION_FILES[1:]))

    def put_version(self, digest: str, folder: Path) -> None:
        # The config goes last: has_version() counts a version complete once it is there.
        files = sorted(version_files(folder), key=lambda path: path.name == "adapter_config.json")
        for path in files:
            try:
                with open(path, "rb") as body:
                    self._call(
                        "write a version",
                        self._s3.put_object,
                        Key=self._key("versions", digest, path.name),
                        Body=body,
                        IfNoneMatch="*",
                    )
            except botocore.exceptions.ClientError as exc:
                if _code(exc) not in _PRECONDITION_FAILED:
                    raise StoreError("the adapter store refused to write a version") from exc
                # Already there: content-addressed, so the same bytes another writer put.

    def fetch_version(self, digest: str, dest: Path) -> None:
        listed = self._call(
            "list a version", self._s3.list_objects_v2, Prefix=self._key("versions", digest) + "/"
        )
        names = [item["Key"].rsplit("/", 1)[-1] for item in listed.get("Contents", [])]
        wanted = [name for name in names if name in VERSION_FILES]
        if "adapter_config.json" not in wanted:
            raise StoreError(f"version {digest[:12]} is not in the adapter store")
        for name in wanted:
            try:
                self._call(
                    "read a version",
                    self._s3.download_file,
                    Key=self._key("versions", digest, name),
                    Filename=str(dest / name),
                )
            except botocore.exceptions.ClientError as exc:
                raise StoreError(f"version {digest[:12]} is incomplete in the store") from exc

    # Manifests

    def list_manifests(self) -> dict[str, str]:
        prefix = self._key("manifests") + "/"
        listed: dict[str, str] = {}
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._call("list adapters", self._s3.list_objects_v2, Prefix=prefix, **extra)
            for item in page.get("Contents", []):
                key = item["Key"][len(prefix) :]
                if key.endswith(".json") and "/" not in key:
                    listed[key[: -len(".json")]] = item["ETag"]
            if not page.get("IsTruncated"):
                return listed
            token = page["NextContinuationToken"]

    def read_manifest(self, name: str) -> ManifestEntry | None:
        try:
            got = self._call(
                "read an adapter manifest",
                self._s3.get_object,
                Key=self._key("manifests", f"{name}.json"),
            )
        except botocore.exceptions.ClientError:
            return None  # _call re-raises only a missing key or a lost condition here
        return ManifestEntry(StoredManifest.from_bytes(got["Body"].read()), got["ETag"])

    def create_manifest(self, manifest: StoredManifest) -> str:
        return self._put_manifest(manifest, IfNoneMatch="*")

    def replace_manifest(self, manifest: StoredManifest, token: str) -> str:
        return self._put_manifest(manifest, IfMatch=token)

    def _put_manifest(self, manifest: StoredManifest, **condition: str) -> str:
        try:
            put = self._call(
                "write an adapter manifest",
                self._s3.put_object,
                Key=self._key("manifests", f"{manifest.name}.json"),
                Body=manifest.to_bytes(),
                ContentType="application/json",
                **condition,
            )
        except botocore.exceptions.ClientError as exc:
            raise ManifestConflict(
                f"adapter `{manifest.name}` changed in the store meanwhile"
                if "IfMatch" in condition
                else f"adapter `{manifest.name}` exists in the store"
            ) from exc
        return str(put["ETag"])

    def delete_manifest(self, name: str, token: str) -> None:
        try:
            self._call(
                "delete an adapter manifest",
                self._s3.delete_object,
                Key=self._key("manifests", f"{name}.json"),
                IfMatch=token,
            )
        except botocore.exceptions.ClientError as exc:
            raise ManifestConflict(f"adapter `{name}` changed in the store meanwhile") from exc
