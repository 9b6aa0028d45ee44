"""Interoperability tests: a Python gRPC client, with stubs generated from proto/, against a
running `pitwall serve` with security off (the default)."""

import time
import uuid

import grpc
import pytest

from conftest import ERROR_KEY, RPC_TIMEOUT_S, Watch


@pytest.fixture
def stub(server, api):
    _, pb2_grpc = api
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT_S)
    yield pb2_grpc.SessionManagementServiceStub(channel)
    channel.close()


# --- helpers ----------------------------------------------------------------------------------


def unique_source(name):
    return f"py-{name}-{uuid.uuid4().hex[:8]}"


def error_reasons(call):
    """Values of the `pitwall-error` key in a call's initial and trailing metadata."""
    metadata = list(call.initial_metadata() or ()) + list(call.trailing_metadata() or ())
    return [value for key, value in metadata if key == ERROR_KEY]


# --- tests ------------------------------------------------------------------------------------


def test_seed_scenario(stub, api):
    pb2, _ = api
    source = unique_source("seed")

    starts = Watch(
        stub.GetSessionStartNotification(
            pb2.GetSessionStartNotificationRequest(data_source=source), timeout=60
        )
    )
    stops = Watch(
        stub.GetSessionStopNotification(
            pb2.GetSessionStopNotificationRequest(data_source=source), timeout=60
        )
    )
    try:
        starts.wait_subscribed()
        stops.wait_subscribed()

        request = pb2.CreateSessionRequest(
            data_source=source,
            identifier="Silverstone FP1",
            details={"driver": "A", "track": "Silverstone"},
        )
        request.utc_offset.FromSeconds(3600)
        created = stub.CreateSession(request, timeout=RPC_TIMEOUT_S)
        assert created.success
        key = created.session_key
        assert str(uuid.UUID(key)) == key, f"session key {key!r} is not a lowercase UUID"

        new = created.new_session
        assert new.data_source == source
        assert dict(new.topic_partition_offsets) == {f"{source}:0": 0, f"{source}_essential:0": 0}
        assert new.utc_offset.ToSeconds() == 3600
        assert new.HasField("creation_time")
        assert abs(new.creation_time.ToSeconds() - time.time()) < 300
        assert new.HasField("session_info")
        assert new.session_info.type == "Session"
        assert new.session_info.version == 1
        assert new.session_info.identifier == "Silverstone FP1"
        assert dict(new.session_info.details) == {"driver": "A", "track": "Silverstone"}

        start = starts.next()
        assert (start.session_key, start.data_source) == (key, source)

        updated = stub.UpdateSessionDetails(
            pb2.UpdateSessionDetailsRequest(
                session_key=key, details={"driver": "B", "weather": "dry"}
            ),
            timeout=RPC_TIMEOUT_S,
        )
        assert updated.success

        info = stub.GetSessionInfo(
            pb2.GetSessionInfoRequest(session_key=key), timeout=RPC_TIMEOUT_S
        )
        assert info.success
        assert info.data_source == source
        assert dict(info.details) == {"driver": "B", "track": "Silverstone", "weather": "dry"}
        assert info.identifier == "Silverstone FP1"
        assert info.type == "Session"
        assert info.version == 1
        assert not info.is_complete
        assert info.main_offset == 0
        assert info.essentials_offset == 0
        assert info.utc_offset.ToSeconds() == 3600
        assert info.creation_time == new.creation_time
        assert not info.HasField("termination_time")

        current = stub.GetCurrentSessions(
            pb2.GetCurrentSessionsRequest(data_source=source), timeout=RPC_TIMEOUT_S
        )
        assert current.success
        assert list(current.session_keys) == [key]

        ended = stub.EndSession(
            pb2.EndSessionRequest(data_source=source, session_key=key), timeout=RPC_TIMEOUT_S
        )
        assert ended.success
        assert ended.end_session.data_source == source
        assert ended.end_session.HasField("termination_time")

        stop = stops.next()
        assert (stop.session_key, stop.data_source) == (key, source)

        info = stub.GetSessionInfo(
            pb2.GetSessionInfoRequest(session_key=key), timeout=RPC_TIMEOUT_S
        )
        assert info.success
        assert info.is_complete
        assert info.HasField("termination_time")
        assert info.termination_time == ended.end_session.termination_time
        assert dict(info.details) == {"driver": "B", "track": "Silverstone", "weather": "dry"}

        again = stub.EndSession(
            pb2.EndSessionRequest(data_source=source, session_key=key), timeout=RPC_TIMEOUT_S
        )
        assert again.success
        assert again.end_session == ended.end_session

        current = stub.GetCurrentSessions(
            pb2.GetCurrentSessionsRequest(data_source=source), timeout=RPC_TIMEOUT_S
        )
        assert list(current.session_keys) == [key], "completed sessions stay listed"
    finally:
        starts.close()
        stops.close()


def test_unknown_session_key_is_refused_with_a_reason(stub, api):
    pb2, _ = api
    key = str(uuid.uuid4())
    response, call = stub.GetSessionInfo.with_call(
        pb2.GetSessionInfoRequest(session_key=key), timeout=RPC_TIMEOUT_S
    )
    assert call.code() == grpc.StatusCode.OK
    assert not response.success
    reasons = error_reasons(call)
    assert reasons, f"no {ERROR_KEY!r} metadata on a refused GetSessionInfo"
    assert any(key in reason for reason in reasons), reasons


def test_invalid_data_source_is_refused_and_creates_nothing(stub, api):
    pb2, _ = api
    source = "bad source"
    response, call = stub.CreateSession.with_call(
        pb2.CreateSessionRequest(data_source=source), timeout=RPC_TIMEOUT_S
    )
    assert call.code() == grpc.StatusCode.OK
    assert not response.success
    assert response.session_key == ""
    reasons = error_reasons(call)
    assert reasons and all(reason.strip() for reason in reasons), reasons

    current = stub.GetCurrentSessions(
        pb2.GetCurrentSessionsRequest(data_source=source), timeout=RPC_TIMEOUT_S
    )
    assert list(current.session_keys) == []
