"""Shared setup of the Python interoperability tests: stubs generated from proto/ and
`pitwall serve` as a subprocess.

The binary is `$PITWALL_BIN` if set, else `<repo>/target/debug/pitwall` (built by
`cargo build --bin pitwall`).
"""

import importlib
import importlib.resources
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO_FILES = [
    "ma/streaming/api/v1/api.proto",
    "ma/streaming/open_data/v1/open_data.proto",
    "pitwall/v1/feed.proto",
]
READY_TIMEOUT_S = 30
STOP_TIMEOUT_S = 30
WAIT_S = 10  # for stream metadata and messages
RPC_TIMEOUT_S = 10
ERROR_KEY = "pitwall-error"
READY_POLL_S = 0.02  # the ready file is the signal; there is nothing to block on


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def stubs(tmp_path_factory):
    """Generates the Python stubs of every file in PROTO_FILES into a temp dir; returns it."""
    out = tmp_path_factory.mktemp("stubs")
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *PROTO_FILES,
        ]
    )
    assert rc == 0, f"grpc_tools.protoc failed with exit code {rc}"
    return out


def import_stubs(out, package):
    """(package_pb2, package_pb2_grpc) of generated stubs, e.g. package = "pitwall.v1.feed"."""
    sys.path.insert(0, str(out))
    try:
        return (
            importlib.import_module(f"{package}_pb2"),
            importlib.import_module(f"{package}_pb2_grpc"),
        )
    finally:
        sys.path.remove(str(out))


@pytest.fixture(scope="session")
def api(stubs):
    """(api_pb2, api_pb2_grpc) of ma.streaming.api.v1."""
    return import_stubs(stubs, "ma.streaming.api.v1.api")


@pytest.fixture(scope="session")
def feed_api(stubs):
    """(feed_pb2, feed_pb2_grpc) of pitwall.v1."""
    return import_stubs(stubs, "pitwall.v1.feed")


class Server:
    """`pitwall serve` as a subprocess, its stderr read by a background thread; ready once it
    has written its --ready-file."""

    def __init__(self, binary, data_dir, extra_args=()):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PITWALL_")}
        env["PITWALL_LOG"] = "info"
        self.ready_dir = tempfile.TemporaryDirectory(prefix="pitwall-ready-")
        self.ready_file = Path(self.ready_dir.name) / "ready.json"
        self.proc = subprocess.Popen(
            [
                str(binary),
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--data-dir",
                str(data_dir),
                "--ready-file",
                str(self.ready_file),
                *extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines = []
        self.grpc_port = None
        self.reader = threading.Thread(target=self._read_stderr, daemon=True)
        self.reader.start()

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def log(self):
        return "\n".join(self.lines[-50:])

    def wait_ready(self):
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                ready = json.loads(self.ready_file.read_text())
            except FileNotFoundError:
                ready = None
            if ready is not None:
                self.grpc_port = int(ready["grpc"].rsplit(":", 1)[1])
                return
            if self.proc.poll() is not None:
                why = f"exited with code {self.proc.returncode} before it was ready"
                break
            time.sleep(READY_POLL_S)
        else:
            self.proc.kill()
            self.proc.wait()
            why = f"did not write its ready file within {READY_TIMEOUT_S} s"
        self.reader.join(5)
        pytest.fail(f"pitwall {why}; stderr:\n{self.log()}")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"pitwall did not stop within {STOP_TIMEOUT_S} s of SIGTERM:\n{self.log()}")
        self.reader.join(5)
        return code


class Watch:
    """Consumes a server stream in a thread: `subscribed` is set once its initial metadata has
    arrived, and messages (or the error that ended the stream) go to a queue."""

    def __init__(self, call):
        self.call = call
        self.subscribed = threading.Event()
        self.messages = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.call.initial_metadata()
            self.subscribed.set()
            for message in self.call:
                self.messages.put(message)
        except grpc.RpcError as error:
            self.messages.put(error)

    def wait_subscribed(self):
        assert self.subscribed.wait(WAIT_S), "no initial metadata on the notification stream"

    def next(self):
        try:
            item = self.messages.get(timeout=WAIT_S)
        except queue.Empty:
            pytest.fail(f"no notification within {WAIT_S} s")
        if isinstance(item, grpc.RpcError):
            pytest.fail(f"notification stream ended: {item.code()} {item.details()}")
        return item

    def close(self):
        self.call.cancel()
        self.thread.join(5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`pitwall serve` with default settings (security off), shared by a test module."""
    srv = Server(pitwall_binary(), tmp_path_factory.mktemp("pitwall-data"))
    srv.wait_ready()
    yield srv
    code = srv.stop()
    assert code == 0, f"pitwall exited with {code} after SIGTERM; stderr:\n{srv.log()}"


def pitwall_binary():
    binary = Path(os.environ.get("PITWALL_BIN") or REPO / "target" / "debug" / "pitwall")
    if not binary.is_file():
        pytest.fail(f"{binary} does not exist; build it with `cargo build --bin pitwall`")
    return binary


