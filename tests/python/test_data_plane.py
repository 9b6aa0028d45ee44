"""The data plane from Python, the way the public usage samples use it: a writer creates a
session, defines its parameters, writes a configuration packet (essential) and periodic data,
and ends the session; a reader finds the session, opens a connection at the session's offsets
filtered by its key, and reads the packets back, decoding them with the generated messages."""

import queue
import threading
import time
import uuid

import grpc
import pytest

from conftest import RPC_TIMEOUT_S, WAIT_S, import_stubs


@pytest.fixture
def stubs_and_channel(server, stubs):
    api_pb2, api_grpc = import_stubs(stubs, "ma.streaming.api.v1.api")
    data_pb2, _ = import_stubs(stubs, "ma.streaming.open_data.v1.open_data")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT_S)
    yield api_pb2, api_grpc, data_pb2, channel
    channel.close()


def packet(data_pb2, message, kind, session_key, essential=False):
    return data_pb2.Packet(
        type=kind,
        session_key=session_key,
        is_essential=essential,
        content=message.SerializeToString(),
    )


def test_a_session_with_periodic_data_is_written_and_read_back_by_session(stubs_and_channel):
    api_pb2, api_grpc, data_pb2, channel = stubs_and_channel
    sessions = api_grpc.SessionManagementServiceStub(channel)
    writer = api_grpc.PacketWriterServiceStub(channel)
    formats = api_grpc.DataFormatManagerServiceStub(channel)
    connections = api_grpc.ConnectionManagerServiceStub(channel)
    reader = api_grpc.PacketReaderServiceStub(channel)
    source = f"py-dp-{uuid.uuid4().hex[:8]}"

    # The writer, as stream_writer_basic does it.
    created = sessions.CreateSession(
        api_pb2.CreateSessionRequest(data_source=source, identifier="Python writer"),
        timeout=RPC_TIMEOUT_S,
    )
    assert created.success
    key = created.session_key
    parameters = ["vCar:Chassis", "nEngine:Engine"]
    format_id = formats.GetParameterDataFormatId(
        api_pb2.GetParameterDataFormatIdRequest(data_source=source, parameters=parameters),
        timeout=RPC_TIMEOUT_S,
    ).data_format_identifier
    assert format_id > 0
    configuration = data_pb2.ConfigurationPacket(
        config_id="config-1",
        parameter_definitions=[
            data_pb2.ParameterDefinition(identifier=p, name=p.split(":")[0]) for p in parameters
        ],
    )

    def detail(pkt):
        return api_pb2.DataPacketDetails(message=pkt, data_source=source, session_key=key)

    writer.WriteDataPacket(
        api_pb2.WriteDataPacketRequest(
            detail=detail(packet(data_pb2, configuration, "Configuration", key, essential=True))
        ),
        timeout=RPC_TIMEOUT_S,
    )
    start = time.time_ns()
    periodic = []
    for i in range(20):
        data = data_pb2.PeriodicDataPacket(
            data_format=data_pb2.SampleDataFormat(data_format_identifier=format_id),
            start_time=start + i * 10_000_000,
            interval=1_000_000,
            columns=[
                data_pb2.SampleColumn(
                    double_samples=data_pb2.DoubleSampleList(
                        samples=[
                            data_pb2.DoubleSample(value=float(i * 10 + j), status=1)
                            for j in range(10)
                        ]
                    )
                )
                for _ in parameters
            ],
        )
        periodic.append(data)

    def requests():
        for data in periodic:
            yield api_pb2.WriteDataPacketsRequest(
                details=[detail(packet(data_pb2, data, "PeriodicData", key))]
            )

    writer.WriteDataPackets(requests(), timeout=RPC_TIMEOUT_S)
    assert sessions.EndSession(
        api_pb2.EndSessionRequest(session_key=key), timeout=RPC_TIMEOUT_S
    ).success

    # The reader, by session: its offsets, its key.
    info = sessions.GetSessionInfo(
        api_pb2.GetSessionInfoRequest(session_key=key), timeout=RPC_TIMEOUT_S
    )
    assert info.success and info.is_complete
    connection = connections.NewConnection(
        api_pb2.NewConnectionRequest(
            details=api_pb2.ConnectionDetails(
                data_source=source,
                session_key=key,
                main_offset=info.main_offset,
                essentials_offset=info.essentials_offset,
            )
        ),
        timeout=RPC_TIMEOUT_S,
    ).connection

    essentials = list(
        reader.ReadEssentials(api_pb2.ReadEssentialsRequest(connection=connection), timeout=WAIT_S)
    )
    assert [r.packet.type for m in essentials for r in m.response] == ["Configuration"]
    decoded = data_pb2.ConfigurationPacket()
    decoded.ParseFromString(essentials[0].response[0].packet.content)
    assert decoded == configuration

    call = reader.ReadPackets(api_pb2.ReadPacketsRequest(connection=connection))
    received = queue.Queue()

    def consume():
        try:
            for message in call:
                for item in message.response:
                    received.put(item)
        except grpc.RpcError:
            pass

    threading.Thread(target=consume, daemon=True).start()
    items = [received.get(timeout=WAIT_S) for _ in range(21)]
    call.cancel()
    assert [item.packet.type for item in items] == ["Configuration"] + ["PeriodicData"] * 20
    for item, sent in zip(items[1:], periodic):
        assert item.packet.session_key == key
        assert item.submit_time.seconds > 0
        data = data_pb2.PeriodicDataPacket()
        data.ParseFromString(item.packet.content)
        assert data == sent
    params = formats.GetParametersList(
        api_pb2.GetParametersListRequest(data_source=source, data_format_identifier=format_id),
        timeout=RPC_TIMEOUT_S,
    ).parameters
    assert list(params) == parameters
    assert connections.CloseConnection(
        api_pb2.CloseConnectionRequest(connection=connection), timeout=RPC_TIMEOUT_S
    ).success
