"""The data plane's records on Kafka, checked with a Kafka client independent of Pitwall's
(confluent-kafka) and the Python protobuf runtime: records produced in the reference's format
(key = session key, value = an open_data Packet, no headers) are read through ReadPackets and
ReadDataPackets, and packets written through Pitwall are consumed from the reference's topics
and decode as its readers expect. Runs when PITWALL_TEST_KAFKA names a broker (scripts/test
starts one)."""

import os
import uuid

import grpc
import pytest

from conftest import RPC_TIMEOUT_S, Server, import_stubs, pitwall_binary

BROKER = os.environ.get("PITWALL_TEST_KAFKA")
pytestmark = pytest.mark.skipif(not BROKER, reason="no PITWALL_TEST_KAFKA broker")

KEY = " reference run"


@pytest.fixture(scope="module")
def kafka_server(tmp_path_factory):
    srv = Server(
        pitwall_binary(),
        tmp_path_factory.mktemp("pitwall-data"),
        extra_args=[
            "--store", "kafka", "--broker", BROKER,
            "--kafka-topic", f"pitwall-py-{uuid.uuid4().hex[:12]}",
        ],
    )
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture
def plane(kafka_server, stubs):
    api_pb2, api_grpc = import_stubs(stubs, "ma.streaming.api.v1.api")
    data_pb2, _ = import_stubs(stubs, "ma.streaming.open_data.v1.open_data")
    channel = grpc.insecure_channel(f"127.0.0.1:{kafka_server.grpc_port}")
    grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT_S)
    yield api_pb2, api_grpc, data_pb2, channel
    channel.close()


def create_topic(topic, partitions=1):
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": BROKER})
    for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        future.result(RPC_TIMEOUT_S)


def produce(topic, partition, key, value):
    """Writes one record as the reference's writer does."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": BROKER})
    delivered = []
    producer.produce(topic, value=value, key=key.encode(), partition=partition,
                     on_delivery=lambda err, msg: delivered.append(err))
    assert producer.flush(RPC_TIMEOUT_S) == 0
    assert delivered == [None]


def consume(topic, partition, count):
    """Reads `count` records of a partition from its start, as the reference's readers do."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({
        "bootstrap.servers": BROKER,
        "group.id": f"interop-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
    })
    consumer.assign([TopicPartition(topic, partition, 0)])
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


def open_connection(api_pb2, api_grpc, channel, source, streams=()):
    connections = api_grpc.ConnectionManagerServiceStub(channel)
    return connections.NewConnection(
        api_pb2.NewConnectionRequest(details=api_pb2.ConnectionDetails(
            data_source=source, session_key=KEY, streams=list(streams),
            stream_offsets=[0] * len(streams))),
        timeout=RPC_TIMEOUT_S,
    ).connection


def first_packets(responses, count):
    packets = []
    for response in responses:
        for item in response.response:
            packets.append(item)
        if len(packets) >= count:
            return packets
    return packets


def test_records_a_plain_producer_writes_are_read_by_read_packets_and_read_data_packets(plane):
    api_pb2, api_grpc, data_pb2, channel = plane
    source = f"pyref{uuid.uuid4().hex[:8]}"
    # The reference's formats: a DataFormatDefinition in the essentials, key "".
    format_id = 638_000_000_000_000_123
    create_topic(f"{source}_essential")
    create_topic(source)
    definition = data_pb2.DataFormatDefinitionPacket(
        identifier=format_id,
        type=data_pb2.DATA_FORMAT_TYPE_PARAMETER,
        parameter_identifiers=data_pb2.ParameterList(parameter_identifiers=["vCar", "nEngine"]),
    )
    produce(f"{source}_essential", 0, "", data_pb2.Packet(
        type="DataFormatDefinition", is_essential=True,
        content=definition.SerializeToString()).SerializeToString())
    periodic = data_pb2.PeriodicDataPacket(
        data_format=data_pb2.SampleDataFormat(data_format_identifier=format_id),
        start_time=1, interval=1_000_000)
    sent = data_pb2.Packet(type="PeriodicData", session_key="inner key",
                           content=periodic.SerializeToString())
    produce(source, 0, KEY, sent.SerializeToString())
    produce(source, 0, "another run", sent.SerializeToString())

    formats = api_grpc.DataFormatManagerServiceStub(channel)
    listed = formats.GetParametersList(
        api_pb2.GetParametersListRequest(data_source=source, data_format_identifier=format_id),
        timeout=RPC_TIMEOUT_S)
    assert list(listed.parameters) == ["vCar", "nEngine"]

    reader = api_grpc.PacketReaderServiceStub(channel)
    connection = open_connection(api_pb2, api_grpc, channel, source)
    read = reader.ReadPackets(api_pb2.ReadPacketsRequest(connection=connection),
                              timeout=RPC_TIMEOUT_S)
    items = first_packets(read, 1)
    read.cancel()
    assert items[0].stream == ""
    assert items[0].packet == sent
    assert items[0].submit_time.seconds > 0

    data_read = reader.ReadDataPackets(
        api_pb2.ReadDataPacketsRequest(request=api_pb2.DataPacketRequest(
            connection=connection, include_parameters=["vCar"])),
        timeout=RPC_TIMEOUT_S)
    items = first_packets(data_read, 1)
    data_read.cancel()
    assert items[0].packet == sent


def test_packets_written_through_pitwall_are_the_reference_s_records(plane):
    api_pb2, api_grpc, data_pb2, channel = plane
    source = f"pyout{uuid.uuid4().hex[:8]}"
    writer = api_grpc.PacketWriterServiceStub(channel)
    marker = data_pb2.Packet(
        type="Marker", session_key="inner key", is_essential=True,
        content=data_pb2.MarkerPacket(label="lap").SerializeToString())
    plain = data_pb2.Packet(type="Event", session_key="inner key", content=b"\x08\x01")
    for stream, pkt in [("", marker), ("Laps", plain)]:
        writer.WriteDataPacket(api_pb2.WriteDataPacketRequest(detail=api_pb2.DataPacketDetails(
            message=pkt, data_source=source, stream=stream,
            session_key=KEY)), timeout=RPC_TIMEOUT_S)
    formats = api_grpc.DataFormatManagerServiceStub(channel)
    event_id = formats.GetEventDataFormatId(
        api_pb2.GetEventDataFormatIdRequest(data_source=source, event="pit stop"),
        timeout=RPC_TIMEOUT_S).data_format_identifier

    # The default layout is partition based without mappings: every stream in `{ds}`:0.
    main = consume(source, 0, 3)
    assert [m.key().decode() for m in main] == [KEY, KEY, ""]
    assert all(m.headers() is None for m in main)
    packets = [data_pb2.Packet.FromString(m.value()) for m in main]
    assert packets[:2] == [marker, plain]
    assert packets[2].type == "DataFormatDefinition"
    assert packets[2].is_essential
    assert packets[2].session_key == ""

    essentials = consume(f"{source}_essential", 0, 2)
    assert [m.key().decode() for m in essentials] == [KEY, ""]
    assert data_pb2.Packet.FromString(essentials[0].value()) == marker
    definition = data_pb2.DataFormatDefinitionPacket.FromString(
        data_pb2.Packet.FromString(essentials[1].value()).content)
    assert definition.identifier == event_id
    assert definition.type == data_pb2.DATA_FORMAT_TYPE_EVENT
    assert definition.event_identifier == "pit stop"
