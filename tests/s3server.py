"""A real S3-protocol server for tests: moto's server mode on loopback, on a free port, in its own process.

    with S3Server() as s3:              # http://127.0.0.1:<port>, credentials "test"/"test"
        s3.make_bucket("runs")
        env = s3.env()                  # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for a CLI subprocess

`auth=True` starts it with moto's IAM checks on (`INITIAL_NO_AUTH_ACTION_COUNT`): the first actions (an
IAM user, its key, the bucket) are free, after which a request with unknown keys is refused, as AWS does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, auth: bool = False):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.auth = auth
        self.key, self.secret = "test", "test"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> S3Server:
        env = dict(os.environ)
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "4"  # create_user, create_access_key, put_user_policy, create_bucket
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2)  # noqa: S310 - loopback
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.3)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)

    def client(self, service: str = "s3"):
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
        )

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def make_user(self) -> None:
        """(auth=True) an IAM user whose keys the server accepts from now on."""
        iam = self.client("iam")
        iam.create_user(UserName="runner")
        k = iam.create_access_key(UserName="runner")["AccessKey"]
        policy = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'
        iam.put_user_policy(UserName="runner", PolicyName="all", PolicyDocument=policy)
        self.key, self.secret = k["AccessKeyId"], k["SecretAccessKey"]

    def env(self, **extra: str) -> dict[str, str]:
        """The standard variables a user sets for an S3-compatible store (nothing of this project's own)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            **extra,
        }

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """The objects under `prefix`, sorted (the empty "folder/" markers pyarrow leaves are not listed)."""
        s3 = self.client()
        out, token = [], None
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = s3.list_objects_v2(**kw)
            out += [
                o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")
            ]  # not pyarrow's dir markers
            if not page.get("IsTruncated"):
                return sorted(out)
            token = page["NextContinuationToken"]
