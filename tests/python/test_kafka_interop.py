"""Interoperability on Kafka, checked with tools independent of Pitwall's: records Pitwall writes
to the session topic are read with another Kafka client (confluent-kafka) and decoded with the
Python protobuf runtime as the reference's packets. Runs when PITWALL_TEST_KAFKA names a broker
(scripts/test starts one)."""

import importlib
import os
import uuid

import pytest

from conftest import RPC_TIMEOUT_S, Server, pitwall_binary

BROKER = os.environ.get("PITWALL_TEST_KAFKA")
pytestmark = pytest.mark.skipif(not BROKER, reason="no PITWALL_TEST_KAFKA broker")


@pytest.fixture(scope="module")
def kafka_server(tmp_path_factory):
    topic = f"pitwall-py-{uuid.uuid4().hex[:12]}"
    srv = Server(
        pitwall_binary(),
        tmp_path_factory.mktemp("pitwall-data"),
        extra_args=["--store", "kafka", "--broker", BROKER, "--kafka-topic", topic],
    )
    srv.wait_ready()
    srv.topic = topic
    yield srv
    assert srv.stop() == 0, srv.log()


def read_topic(topic, count):
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({
        "bootstrap.servers": BROKER,
        "group.id": f"interop-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    })
    consumer.assign([TopicPartition(topic, 0, 0)])
    messages = []
    try:
        for _ in range(200):  # 200 polls of at most 0.1 s
            message = consumer.poll(0.1)
            if message is None or message.error():
                continue
            messages.append(message)
            if len(messages) == count:
                break
    finally:
        consumer.close()
    return messages


def test_records_pitwall_writes_are_reference_packets(api, kafka_server):
    import grpc

    pb2, pb2_grpc = api
    open_data = importlib.import_module("ma.streaming.open_data.v1.open_data_pb2")
    channel = grpc.insecure_channel(f"127.0.0.1:{kafka_server.grpc_port}")
    stub = pb2_grpc.SessionManagementServiceStub(channel)
    created = stub.CreateSession(
        pb2.CreateSessionRequest(data_source="PY", identifier="run", details={"a": "1"}),
        timeout=RPC_TIMEOUT_S)
    key = created.session_key
    assert stub.UpdateSessionDetails(
        pb2.UpdateSessionDetailsRequest(session_key=key, details={"a": "1", "b": "2"}),
        timeout=RPC_TIMEOUT_S).success
    assert stub.AddAssociateSession(
        pb2.AddAssociateSessionRequest(session_key=key, associate_session_key="parent"),
        timeout=RPC_TIMEOUT_S).success
    ended = stub.EndSession(pb2.EndSessionRequest(session_key=key), timeout=RPC_TIMEOUT_S)
    channel.close()

    messages = read_topic(kafka_server.topic, 4)
    assert len(messages) == 4, f"read {len(messages)} records from {kafka_server.topic}"
    packets = []
    for message in messages:
        assert message.key().decode() == key
        packet = open_data.Packet.FromString(message.value())
        assert packet.session_key == key
        assert not packet.is_essential
        assert packet.id == 0
        packets.append(packet)
    assert [p.type for p in packets] == ["NewSession", "SessionInfo", "SessionInfo", "EndOfSession"]

    new_session = open_data.NewSessionPacket.FromString(packets[0].content)
    assert new_session.data_source == "PY"
    assert new_session.HasField("session_info")
    assert new_session.session_info.data_source == "PY"
    assert new_session.session_info.identifier == "run"
    assert dict(new_session.session_info.details) == {"a": "1"}
    assert new_session.session_info.type == "Session"
    assert new_session.session_info.version == 1
    assert "PY:0" in new_session.topic_partition_offsets
    assert "PY_essential:0" in new_session.topic_partition_offsets

    details = open_data.SessionInfoPacket.FromString(packets[1].content)
    assert dict(details.details) == {"b": "2"}, "only the changed detail is written"
    associates = open_data.SessionInfoPacket.FromString(packets[2].content)
    assert list(associates.associate_session_keys) == ["parent"]

    end = open_data.EndOfSessionPacket.FromString(packets[3].content)
    assert end.data_source == "PY"
    assert end.termination_time == ended.end_session.termination_time
