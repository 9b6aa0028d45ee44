"""The Python client generated from proto/ against a server with TLS and bearer tokens, set up
with the same `openssl` commands as the README's "Securing Pitwall"."""

import subprocess

import grpc
import pytest

from conftest import RPC_TIMEOUT_S, Server, pitwall_binary

TOKENS = "# role token\nread py-reader\nwrite py-writer\n"


def make_certificates(directory):
    """A CA, and a server certificate for localhost and 127.0.0.1 signed by it."""

    def run(*args):
        subprocess.run(args, cwd=directory, check=True, capture_output=True)

    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-days", "365", "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=Pitwall CA")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (directory / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "365", "-out", "server.pem", "-extfile", "server.ext")


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    make_certificates(directory)
    (directory / "tokens").write_text(TOKENS)
    srv = Server(
        pitwall_binary(),
        tmp_path_factory.mktemp("pitwall-data"),
        extra_args=[
            "--tls-cert", str(directory / "server.pem"),
            "--tls-key", str(directory / "server.key"),
            "--auth-tokens", str(directory / "tokens"),
        ],
    )
    srv.wait_ready()
    srv.ca = (directory / "ca.pem").read_bytes()
    yield srv
    assert srv.stop() == 0, srv.log()


def secure_stub(api, server, root_certificates):
    _, pb2_grpc = api
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    channel = grpc.secure_channel(
        f"127.0.0.1:{server.grpc_port}",
        credentials,
        options=[("grpc.ssl_target_name_override", "localhost")],
    )
    return channel, pb2_grpc.SessionManagementServiceStub(channel)


def test_a_client_with_the_ca_and_a_token_runs_the_seed_scenario(api, secure_server):
    pb2, _ = api
    channel, stub = secure_stub(api, secure_server, secure_server.ca)
    writer = [("authorization", "Bearer py-writer")]
    created = stub.CreateSession(
        pb2.CreateSessionRequest(data_source="py-secure", details={"driver": "X"}),
        metadata=writer, timeout=RPC_TIMEOUT_S)
    assert created.success
    key = created.session_key
    assert stub.UpdateSessionDetails(
        pb2.UpdateSessionDetailsRequest(session_key=key, details={"lap": "3"}),
        metadata=writer, timeout=RPC_TIMEOUT_S).success
    reader = [("authorization", "Bearer py-reader")]
    info = stub.GetSessionInfo(pb2.GetSessionInfoRequest(session_key=key),
                               metadata=reader, timeout=RPC_TIMEOUT_S)
    assert dict(info.details) == {"driver": "X", "lap": "3"}
    assert key in stub.GetCurrentSessions(
        pb2.GetCurrentSessionsRequest(data_source="py-secure"),
        metadata=reader, timeout=RPC_TIMEOUT_S).session_keys
    assert stub.EndSession(pb2.EndSessionRequest(session_key=key),
                           metadata=writer, timeout=RPC_TIMEOUT_S).success
    channel.close()


def test_missing_and_insufficient_tokens_are_refused_with_the_role_needed(api, secure_server):
    pb2, _ = api
    channel, stub = secure_stub(api, secure_server, secure_server.ca)
    request = pb2.CreateSessionRequest(data_source="py-secure")
    with pytest.raises(grpc.RpcError) as missing:
        stub.CreateSession(request, timeout=RPC_TIMEOUT_S)
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as reader:
        stub.CreateSession(request, metadata=[("authorization", "Bearer py-reader")],
                           timeout=RPC_TIMEOUT_S)
    assert reader.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'write'" in reader.value.details()
    channel.close()


def test_a_client_without_the_ca_cannot_connect(api, secure_server, tmp_path):
    make_certificates(tmp_path)  # another CA
    pb2, _ = api
    channel, stub = secure_stub(api, secure_server, (tmp_path / "ca.pem").read_bytes())
    with pytest.raises(grpc.RpcError) as failed:
        stub.GetCurrentSessions(pb2.GetCurrentSessionsRequest(data_source="py-secure"),
                                metadata=[("authorization", "Bearer py-reader")],
                                timeout=RPC_TIMEOUT_S)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
