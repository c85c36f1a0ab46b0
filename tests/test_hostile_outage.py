"""Issue 25 item 3: storage calls ride out a short outage of the S3 server. A writer process holding a run
directory in the bucket (its lease, uploads, downloads, listings, deletes) has the server go away for 4 s in
the middle (connections refused, as a restarting server refuses them: a TCP relay in front of the session's
S3 server closes its port and opens it again; the objects stay) and ends as an uninterrupted run ends: exit 0,
every file in the bucket. An outage longer than ALLATT_STORAGE_RETRY_S is one line naming the bucket path.
No Ray."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from allatt_dist import remote
from allatt_dist.errors import EnvironmentFailure
from allatt_dist.rundir import RunDir, open_out

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 12
WRITER = textwrap.dedent(f"""
    import sys, time
    from allatt_dist.rundir import open_out
    run = open_out(sys.argv[1])
    with run.held():
        for n in range(1, {ROUNDS + 1}):
            run.write_text(run.root / f"f-{{n}}.txt", str(n) * 50_000)  # uploaded
            (run.root / f"f-{{n}}.txt").unlink()
            run.fetch(run.root / f"f-{{n}}.txt")  # listed and downloaded again
            assert (run.root / f"f-{{n}}.txt").read_text() == str(n) * 50_000
            run.write_text(run.root / "scratch.txt", "x")
            run.delete(run.root / "scratch.txt")  # deleted
            print("round", n, flush=True)
            time.sleep(0.3)
    print("done", flush=True)
    """)


class Relay:
    """A TCP relay on a fixed loopback port to `target`; `down()` closes the port and every connection
    (clients are refused, as by a stopped server), `up()` opens it again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.conns, self.listener = target, [], None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.up()

    def up(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        self.listener.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.conns = []

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            server = socket.create_connection(self.target)
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def relay(s3, monkeypatch, tmp_path):
    r = Relay(("127.0.0.1", s3.port))
    for k, v in s3.env(ALLATT_MIRROR_DIR=str(tmp_path / "m")).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{r.port}")
    remote._FS_CACHE.clear()
    yield r
    r.down()
    remote._FS_CACHE.clear()


def test_a_few_seconds_of_outage_mid_run_end_like_no_outage(relay, s3) -> None:
    uri = "s3://runs/hostile-outage/run"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, uri],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(3):
            assert writer.stdout.readline().startswith("round"), writer.stderr.read() if writer.poll() else ""
        relay.down()
        time.sleep(4)
        relay.up()
        out, err = writer.communicate(timeout=240)
    finally:
        writer.kill()
    assert writer.returncode == 0, err[-3000:]
    assert out.splitlines()[-1] == "done"
    keys = s3.keys("runs", "hostile-outage/run/")
    assert keys == sorted(f"hostile-outage/run/f-{n}.txt" for n in range(1, ROUNDS + 1)), keys  # lease released
    body = s3.client().get_object(Bucket="runs", Key=f"hostile-outage/run/f-{ROUNDS}.txt")["Body"].read()
    assert body == str(ROUNDS).encode() * 50_000


def test_an_outage_past_the_deadline_is_one_line_naming_the_bucket_path(relay, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("ALLATT_STORAGE_RETRY_S", "2")
    run = RunDir(tmp_path / "mirror", open_out("s3://runs/hostile-outage/late").remote)
    (run.root / "x.txt").parent.mkdir(parents=True)
    (run.root / "x.txt").write_text("x")
    relay.down()
    started = time.monotonic()
    with pytest.raises(EnvironmentFailure) as err:
        run.push(run.root / "x.txt")
    assert 1.5 <= time.monotonic() - started < 30
    msg = str(err.value)
    assert msg.startswith("s3://runs/hostile-outage/late/x.txt: upload failed for 2 s") and "\n" not in msg, msg
