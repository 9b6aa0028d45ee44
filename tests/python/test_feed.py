"""pitwall.v1.SessionFeed from a Python client generated from proto/pitwall/v1/feed.proto:
list across data sources, then watch from the listing's sequence without a gap; trees."""

import uuid

import grpc
import pytest

from conftest import RPC_TIMEOUT_S, Server, Watch, pitwall_binary


@pytest.fixture
def channel(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT_S)
    yield channel
    channel.close()


def create(api, channel, data_source, **fields):
    pb2, pb2_grpc = api
    stub = pb2_grpc.SessionManagementServiceStub(channel)
    response = stub.CreateSession(
        pb2.CreateSessionRequest(data_source=data_source, **fields), timeout=RPC_TIMEOUT_S
    )
    assert response.success
    return response.session_key


def test_list_then_watch_follows_on_without_a_gap(api, feed_api, channel):
    pb2, pb2_grpc = api
    feed_pb2, feed_pb2_grpc = feed_api
    feed = feed_pb2_grpc.SessionFeedStub(channel)
    run = uuid.uuid4().hex[:8]
    sources = [f"py-car-{run}", f"py-rig-{run}"]
    keys = [create(api, channel, source, identifier=f"FP{i}") for i, source in enumerate(sources)]

    listing = feed.ListSessions(
        feed_pb2.ListSessionsRequest(
            filter=feed_pb2.SessionFilter(
                data_sources=sources, state=feed_pb2.SESSION_STATE_LIVE, identifier_glob="FP*"
            ),
            page_size=1,
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert [s.session_key for s in listing.sessions] == keys[:1]
    assert listing.next_page_token
    second = feed.ListSessions(
        feed_pb2.ListSessionsRequest(
            filter=feed_pb2.SessionFilter(data_sources=sources),
            page_size=1,
            page_token=listing.next_page_token,
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert [s.session_key for s in second.sessions] == keys[1:]

    # A change made after the listing arrives when watching from its sequence.
    stub = pb2_grpc.SessionManagementServiceStub(channel)
    assert stub.UpdateSessionDetails(
        pb2.UpdateSessionDetailsRequest(session_key=keys[0], details={"lap": "7"}),
        timeout=RPC_TIMEOUT_S,
    ).success
    watch = Watch(feed.Watch(feed_pb2.WatchRequest(from_sequence=listing.sequence)))
    try:
        updated = None
        while updated is None:
            for event in watch.next().events:
                if event.session_key == keys[0] and event.kind == feed_pb2.UPDATED:
                    updated = event
        assert updated.sequence > listing.sequence
        assert updated.session.details["lap"] == "7"
        assert updated.data_source == sources[0]
    finally:
        watch.close()


def test_a_resume_from_forgotten_history_fails_with_failed_precondition(
    api, feed_api, tmp_path_factory
):
    feed_pb2, feed_pb2_grpc = feed_api
    srv = Server(
        pitwall_binary(), tmp_path_factory.mktemp("pitwall-small-feed"), ["--feed-max-events", "2"]
    )
    srv.wait_ready()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}")
        for _ in range(5):
            create(api, channel, "py-window")
        call = feed_pb2_grpc.SessionFeedStub(channel).Watch(feed_pb2.WatchRequest(from_sequence=1))
        with pytest.raises(grpc.RpcError) as error:
            next(call)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no longer kept" in error.value.details()
        channel.close()
    finally:
        assert srv.stop() == 0


def test_session_tree_names_children_and_parents(api, feed_api, channel):
    feed_pb2, feed_pb2_grpc = feed_api
    child = create(api, channel, "py-tree")
    parent = create(api, channel, "py-tree", associate_session_key=[child])
    tree = feed_pb2_grpc.SessionFeedStub(channel).GetSessionTree(
        feed_pb2.GetSessionTreeRequest(session_key=child), timeout=RPC_TIMEOUT_S
    )
    assert tree.root.session.session_key == child
    assert [p.session_key for p in tree.root.parents] == [parent]
    with pytest.raises(grpc.RpcError) as error:
        feed_pb2_grpc.SessionFeedStub(channel).GetSessionTree(
            feed_pb2.GetSessionTreeRequest(session_key="nobody"), timeout=RPC_TIMEOUT_S
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
