//! Data formats and ReadDataPackets, over gRPC on loopback: the reference's
//! `TopicBasedDataPacketWriteAndReadShould`, `DataFormatManagerShould` and
//! `DataFormatInfoServiceShould` scenarios (DATA-PLANE.md §7.2), and what Pitwall adds: an
//! unambiguous content key, one id for concurrent requests, ids stable across restarts, and
//! patterns checked before a read starts.

mod support;

use pitwall_proto::api::*;
use pitwall_proto::open_data::{
    DataFormatDefinitionPacket, DataFormatType, DoubleSample, DoubleSampleList, EventDataFormat,
    EventPacket, MarkerPacket, Packet, ParameterList, PeriodicDataPacket, RowDataPacket,
    SampleColumn, SampleDataFormat, SampleRow, SynchroDataPacket, data_format_definition_packet,
    event_data_format, sample_column, sample_data_format, sample_row,
};
use pitwall_server::config::{StoreConfig, StreamLayout};
use prost::Message;
use support::*;
use tokio::time::timeout;
use tonic::{Code, Streaming};

/// The record key readers filter on, with a leading space as in the reference's tests.
const KEY: &str = " data packets run";

struct Plane {
    server: TestServer,
    /// The test's own data source: on a broker, every test's data-plane topics are apart.
    data_source: String,
    writer: WriterClient,
    reader: ReaderClient,
    connections: ConnectionClient,
    formats: FormatClient,
}

/// A server with the topic layout, as the reference's data-packet tests.
async fn plane() -> Plane {
    let server = TestServer::start_with(|c| {
        c.stream_layout = StreamLayout::TopicBased;
    })
    .await;
    Plane::on(server).await
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn by_id(id: u64) -> SampleDataFormat {
    SampleDataFormat {
        format: Some(sample_data_format::Format::DataFormatIdentifier(id)),
    }
}

fn inline(parameters: &[&str]) -> SampleDataFormat {
    SampleDataFormat {
        format: Some(sample_data_format::Format::ParameterIdentifiers(
            ParameterList {
                parameter_identifiers: strings(parameters),
            },
        )),
    }
}

fn packet(kind: &str, content: Vec<u8>) -> Packet {
    Packet {
        r#type: kind.into(),
        session_key: KEY.into(),
        is_essential: false,
        content,
        id: 0,
    }
}

fn column(value: f64) -> SampleColumn {
    SampleColumn {
        list: Some(sample_column::List::DoubleSamples(DoubleSampleList {
            samples: vec![DoubleSample { value, status: 1 }],
        })),
    }
}

fn periodic(format: SampleDataFormat) -> Packet {
    packet(
        "PeriodicData",
        PeriodicDataPacket {
            data_format: Some(format),
            start_time: 1,
            interval: 1000,
            columns: vec![column(1.0)],
        }
        .encode_to_vec(),
    )
}

fn row(format: SampleDataFormat) -> Packet {
    packet(
        "RowData",
        RowDataPacket {
            data_format: Some(format),
            timestamps: vec![1],
            rows: vec![SampleRow {
                list: Some(sample_row::List::DoubleSamples(DoubleSampleList {
                    samples: vec![DoubleSample {
                        value: 2.0,
                        status: 1,
                    }],
                })),
            }],
        }
        .encode_to_vec(),
    )
}

fn synchro(format: SampleDataFormat) -> Packet {
    packet(
        "SynchroData",
        SynchroDataPacket {
            data_format: Some(format),
            start_time: 1,
            intervals: vec![10],
            columns: vec![column(3.0)],
        }
        .encode_to_vec(),
    )
}

fn event_by_id(id: u64) -> Packet {
    packet(
        "Event",
        EventPacket {
            data_format: Some(EventDataFormat {
                format: Some(event_data_format::Format::DataFormatIdentifier(id)),
            }),
            timestamp: 5,
            raw_values: vec![1.0, 2.0],
        }
        .encode_to_vec(),
    )
}

fn marker(label: &str) -> Packet {
    packet(
        "Marker",
        MarkerPacket {
            timestamp: 7,
            label: label.into(),
            ..Default::default()
        }
        .encode_to_vec(),
    )
}

/// A `DataFormatDefinition` packet as a client (or another server) writes one.
fn definition(id: u64, format: data_format_definition_packet::Format, essential: bool) -> Packet {
    let kind = match format {
        data_format_definition_packet::Format::ParameterIdentifiers(_) => DataFormatType::Parameter,
        data_format_definition_packet::Format::EventIdentifier(_) => DataFormatType::Event,
    };
    Packet {
        r#type: "DataFormatDefinition".into(),
        session_key: "a session of the writer".into(),
        is_essential: essential,
        content: DataFormatDefinitionPacket {
            identifier: id,
            r#type: kind as i32,
            format: Some(format),
        }
        .encode_to_vec(),
        id: 0,
    }
}

fn parameters_definition(id: u64, parameters: &[&str]) -> Packet {
    definition(
        id,
        data_format_definition_packet::Format::ParameterIdentifiers(ParameterList {
            parameter_identifiers: strings(parameters),
        }),
        true,
    )
}

fn event_definition(id: u64, event: &str) -> Packet {
    definition(
        id,
        data_format_definition_packet::Format::EventIdentifier(event.into()),
        true,
    )
}

/// A filter request on `connection`.
fn filter(
    connection: Connection,
    parameters: (&[&str], &[&str]),
    events: (&[&str], &[&str]),
    include_markers: bool,
) -> DataPacketRequest {
    DataPacketRequest {
        connection: Some(connection),
        include_parameters: strings(parameters.0),
        exclude_parameters: strings(parameters.1),
        include_events: strings(events.0),
        exclude_events: strings(events.1),
        include_markers,
    }
}

impl Plane {
    async fn on(server: TestServer) -> Plane {
        let (writer, reader, connections) = server.data_plane().await;
        let formats = server.data_formats().await;
        Plane {
            data_source: data_source_for("IntegrationDs", server.data_dir()),
            server,
            writer,
            reader,
            connections,
            formats,
        }
    }

    async fn restart(self) -> Plane {
        Plane::on(self.server.restart().await).await
    }

    async fn parameter_id(&mut self, parameters: &[&str]) -> u64 {
        self.formats
            .get_parameter_data_format_id(GetParameterDataFormatIdRequest {
                data_source: self.data_source.clone(),
                parameters: strings(parameters),
            })
            .await
            .unwrap()
            .into_inner()
            .data_format_identifier
    }

    async fn event_id(&mut self, event: &str) -> u64 {
        self.formats
            .get_event_data_format_id(GetEventDataFormatIdRequest {
                data_source: self.data_source.clone(),
                event: event.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .data_format_identifier
    }

    async fn parameters_of(&mut self, id: u64) -> Vec<String> {
        self.formats
            .get_parameters_list(GetParametersListRequest {
                data_source: self.data_source.clone(),
                data_format_identifier: id,
            })
            .await
            .unwrap()
            .into_inner()
            .parameters
    }

    async fn event_of(&mut self, id: u64) -> String {
        self.formats
            .get_event(GetEventRequest {
                data_source: self.data_source.clone(),
                data_format_identifier: id,
            })
            .await
            .unwrap()
            .into_inner()
            .event
    }

    /// Writes a packet on the main stream with record key `key`; answered once durable.
    async fn write_keyed(&mut self, key: &str, packet: &Packet) {
        self.writer
            .write_data_packet(WriteDataPacketRequest {
                detail: Some(DataPacketDetails::new(packet, &self.data_source, "", key)),
            })
            .await
            .unwrap();
    }

    async fn write(&mut self, packet: &Packet) {
        self.write_keyed(KEY, packet).await;
    }

    /// A connection to the main stream from its start, filtered by [`KEY`].
    async fn connection(&mut self) -> Connection {
        self.connections
            .new_connection(NewConnectionRequest {
                details: Some(ConnectionDetails {
                    data_source: self.data_source.clone(),
                    session_key: KEY.into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .connection
            .unwrap()
    }

    async fn read(&mut self, request: DataPacketRequest) -> Streaming<ReadDataPacketsResponse> {
        self.reader
            .read_data_packets(ReadDataPacketsRequest {
                request: Some(request),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// A read with the default filter (every parameter and event), markers as asked.
    async fn read_default(&mut self, include_markers: bool) -> Streaming<ReadDataPacketsResponse> {
        let connection = self.connection().await;
        self.read(filter(connection, (&[], &[]), (&[], &[]), include_markers))
            .await
    }

    /// Every packet of the data source's essentials, in order.
    async fn essentials(&mut self) -> Vec<Packet> {
        let connection = self
            .connections
            .new_connection(NewConnectionRequest {
                details: Some(ConnectionDetails {
                    data_source: self.data_source.clone(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .connection
            .unwrap();
        let mut stream = self
            .reader
            .read_essentials(ReadEssentialsRequest {
                connection: Some(connection),
            })
            .await
            .unwrap()
            .into_inner();
        let mut packets = Vec::new();
        while let Some(response) = timeout(PATIENCE, stream.message())
            .await
            .expect("ReadEssentials did not complete")
            .unwrap()
        {
            for item in response.response {
                packets.push(item.decode_packet().unwrap().unwrap());
            }
        }
        packets
    }
}

/// The next `count` packets of a read.
async fn receive(stream: &mut Streaming<ReadDataPacketsResponse>, count: usize) -> Vec<Packet> {
    let mut received = Vec::new();
    while received.len() < count {
        let response = timeout(PATIENCE, stream.message())
            .await
            .unwrap_or_else(|_| panic!("{} of {count} packets arrived in time", received.len()))
            .unwrap()
            .expect("the read ended");
        for item in response.response {
            assert_eq!(item.stream, "");
            received.push(item.decode_packet().unwrap().unwrap());
        }
    }
    received
}

/// Writes `withheld`, then a packet the read passes, and checks that the latter is the next
/// packet read: the read went past `withheld` without delivering it.
async fn assert_withheld(
    plane: &mut Plane,
    read: &mut Streaming<ReadDataPacketsResponse>,
    withheld: &Packet,
    passing: &Packet,
) {
    plane.write(withheld).await;
    plane.write(passing).await;
    assert_eq!(receive(read, 1).await, std::slice::from_ref(passing));
}

// TopicBasedDataPacketWriteAndReadShould

#[tokio::test]
async fn periodic_synchro_row_and_event_packets_pass_the_default_filter() {
    let mut plane = plane().await;
    let parameters = plane.parameter_id(&["Param1", "Param2"]).await;
    let event = plane.event_id("Event1").await;
    let mut read = plane.read_default(false).await;
    let sent = [
        periodic(by_id(parameters)),
        synchro(by_id(parameters)),
        row(by_id(parameters)),
        event_by_id(event),
        periodic(inline(&["InlineParam"])),
    ];
    for packet in &sent {
        plane.write(packet).await;
    }
    assert_eq!(receive(&mut read, sent.len()).await, sent);
}

#[tokio::test]
async fn a_marker_is_delivered_only_when_markers_are_included() {
    let mut plane = plane().await;
    let parameters = plane.parameter_id(&["Param1"]).await;
    let mut with_markers = plane.read_default(true).await;
    let mut without_markers = plane.read_default(false).await;
    let lap = marker("Lap 1");
    let after = periodic(by_id(parameters));
    plane.write(&lap).await;
    plane.write(&after).await;
    assert_eq!(receive(&mut with_markers, 2).await, [lap, after.clone()]);
    assert_eq!(receive(&mut without_markers, 1).await, [after]);
}

#[tokio::test]
async fn include_and_exclude_lists_filter_periodic_row_and_synchro_packets() {
    let mut plane = plane().await;
    let included = plane.parameter_id(&["vCar:Chassis"]).await;
    let excluded = plane.parameter_id(&["nEngine:Engine"]).await;
    let neither = plane.parameter_id(&["Other"]).await;
    let connection = plane.connection().await;
    let mut read = plane
        .read(filter(
            connection,
            (&["Chassis", "Engine"], &["^nEngine"]),
            (&[], &[]),
            false,
        ))
        .await;
    for make in [periodic, row, synchro] {
        assert_withheld(
            &mut plane,
            &mut read,
            &make(by_id(excluded)),
            &make(by_id(included)),
        )
        .await;
        assert_withheld(
            &mut plane,
            &mut read,
            &make(by_id(neither)),
            &make(by_id(included)),
        )
        .await;
        // Inline lists are filtered by the same rules.
        assert_withheld(
            &mut plane,
            &mut read,
            &make(inline(&["nEngine:Engine"])),
            &make(inline(&["vCar:Chassis"])),
        )
        .await;
    }
}

#[tokio::test]
async fn include_and_exclude_lists_filter_events() {
    let mut plane = plane().await;
    let lap = plane.event_id("Lap crossed").await;
    let pit_lap = plane.event_id("Pit Lap crossed").await;
    let flag = plane.event_id("Yellow flag").await;
    let connection = plane.connection().await;
    let mut read = plane
        .read(filter(connection, (&[], &[]), (&["Lap"], &["^Pit"]), false))
        .await;
    assert_withheld(
        &mut plane,
        &mut read,
        &event_by_id(pit_lap),
        &event_by_id(lap),
    )
    .await;
    assert_withheld(&mut plane, &mut read, &event_by_id(flag), &event_by_id(lap)).await;
}

#[tokio::test]
async fn a_packet_whose_only_parameter_is_in_both_lists_is_withheld() {
    let mut plane = plane().await;
    let both = plane.parameter_id(&["Both"]).await;
    let other = plane.parameter_id(&["Other"]).await;
    let connection = plane.connection().await;
    let mut read = plane
        .read(filter(
            connection,
            (&["Both", "Other"], &["Both"]),
            (&[], &[]),
            false,
        ))
        .await;
    assert_withheld(
        &mut plane,
        &mut read,
        &periodic(by_id(both)),
        &periodic(by_id(other)),
    )
    .await;
}

#[tokio::test]
async fn a_packet_with_an_included_and_an_excluded_parameter_is_delivered() {
    let mut plane = plane().await;
    let mixed = plane.parameter_id(&["Excluded", "Included"]).await;
    let connection = plane.connection().await;
    let mut read = plane
        .read(filter(
            connection,
            (&["Included"], &["Excluded"]),
            (&[], &[]),
            false,
        ))
        .await;
    let sent = periodic(by_id(mixed));
    plane.write(&sent).await;
    assert_eq!(receive(&mut read, 1).await, [sent]);
}

#[tokio::test]
async fn a_data_packet_of_another_session_key_is_not_delivered() {
    let mut plane = plane().await;
    let parameters = plane.parameter_id(&["Param1"]).await;
    let mut read = plane.read_default(false).await;
    plane
        .write_keyed("another key", &periodic(by_id(parameters)))
        .await;
    let mine = synchro(by_id(parameters));
    plane.write(&mine).await;
    assert_eq!(receive(&mut read, 1).await, [mine]);
}

#[tokio::test]
async fn a_thousand_data_packets_are_all_delivered_in_order() {
    let mut plane = plane().await;
    let parameters = plane.parameter_id(&["Param1", "Param2", "Param3"]).await;
    let mut read = plane.read_default(false).await;
    let sent: Vec<Packet> = (0..1000)
        .map(|i| {
            let mut packet = periodic(by_id(parameters));
            packet.id = i;
            packet
        })
        .collect();
    let requests: Vec<WriteDataPacketsRequest> = sent
        .chunks(7)
        .map(|chunk| WriteDataPacketsRequest {
            details: chunk
                .iter()
                .map(|p| DataPacketDetails::new(p, &plane.data_source, "", KEY))
                .collect(),
        })
        .collect();
    plane
        .writer
        .write_data_packets(futures::stream::iter(requests))
        .await
        .unwrap();
    assert_eq!(receive(&mut read, 1000).await, sent);
}

#[tokio::test]
async fn packets_that_are_not_data_are_not_delivered() {
    let mut plane = plane().await;
    let parameters = plane.parameter_id(&["Param1"]).await;
    let mut read = plane.read_default(true).await;
    let passing = periodic(by_id(parameters));
    for withheld in [
        packet("Configuration", b"opaque".to_vec()),
        packet("Error", Vec::new()),
        parameters_definition(123, &["Param9"]),
        // A sample packet whose content is not one.
        packet("PeriodicData", vec![0xff, 0xff, 0xff]),
    ] {
        assert_withheld(&mut plane, &mut read, &withheld, &passing).await;
    }
}

#[tokio::test]
async fn an_invalid_pattern_is_refused_before_the_read_starts() {
    let mut plane = plane().await;
    let connection = plane.connection().await;
    for request in [
        filter(connection, (&["ok", "(unclosed"], &[]), (&[], &[]), false),
        filter(connection, (&[], &[]), (&[], &["(?=look-ahead)"]), false),
    ] {
        let status = plane
            .reader
            .read_data_packets(ReadDataPacketsRequest {
                request: Some(request),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status
                .message()
                .contains("is not a valid regular expression"),
            "{status:?}"
        );
    }
    let missing = plane
        .reader
        .read_data_packets(ReadDataPacketsRequest { request: None })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn an_unknown_id_withholds_its_packets_until_a_definition_arrives() {
    let mut plane = plane().await;
    let known = plane.parameter_id(&["Known"]).await;
    let mut read = plane.read_default(false).await;
    let later = 7_000_000_000_000_000_000;
    // Not defined yet: withheld, and not remembered as unknown...
    assert_withheld(
        &mut plane,
        &mut read,
        &periodic(by_id(later)),
        &periodic(by_id(known)),
    )
    .await;
    // ...so once another writer stores its definition, its packets are delivered.
    plane.write(&parameters_definition(later, &["Late"])).await;
    let sent = periodic(by_id(later));
    plane.write(&sent).await;
    assert_eq!(receive(&mut read, 1).await, [sent]);
}

// DataFormatManagerShould and DataFormatInfoServiceShould

#[tokio::test]
async fn definitions_in_the_essentials_resolve_after_a_restart() {
    let mut plane = plane().await;
    let (parameters, event) = (638_000_000_000_000_001, 638_000_000_000_000_002);
    plane
        .write(&parameters_definition(
            parameters,
            &["Param1", "Param2", "Param3"],
        ))
        .await;
    plane.write(&event_definition(event, "event1")).await;
    let mut plane = plane.restart().await;
    assert_eq!(
        plane.parameter_id(&["Param1", "Param2", "Param3"]).await,
        parameters
    );
    assert_eq!(plane.event_id("event1").await, event);
    assert_eq!(
        plane.parameters_of(parameters).await,
        ["Param1", "Param2", "Param3"]
    );
    assert_eq!(plane.event_of(event).await, "event1");
}

#[tokio::test]
async fn a_definition_written_non_essential_is_not_in_the_essentials_and_binds_nothing() {
    let mut plane = plane().await;
    let id = 638_000_000_000_000_003;
    let mut packet = parameters_definition(id, &["Param1"]);
    packet.is_essential = false;
    plane.write(&packet).await;
    assert!(plane.parameters_of(id).await.is_empty());
    let mut plane = plane.restart().await;
    // Only the essentials are read, as the reference reads only its essentials topics.
    assert!(plane.parameters_of(id).await.is_empty());
    assert!(plane.essentials().await.is_empty());
}

#[tokio::test]
async fn a_new_event_or_parameter_list_gets_an_id_that_resolves_at_once() {
    let mut plane = plane().await;
    let event = plane.event_id("new event").await;
    let parameters = plane.parameter_id(&["new", "parameters"]).await;
    assert!(event > 0 && parameters > 0);
    assert_ne!(event, parameters);
    assert_eq!(plane.event_of(event).await, "new event");
    assert_eq!(plane.parameters_of(parameters).await, ["new", "parameters"]);
    // Asking again gives the same ids.
    assert_eq!(plane.event_id("new event").await, event);
    assert_eq!(plane.parameter_id(&["new", "parameters"]).await, parameters);
}

#[tokio::test]
async fn ids_have_the_magnitude_of_dotnet_ticks_and_grow() {
    let mut plane = plane().await;
    let first = plane.parameter_id(&["a"]).await;
    let second = plane.parameter_id(&["b"]).await;
    // 2020-01-01 and 2200-01-01 in .NET ticks.
    assert!(
        (637_134_336_000_000_000..693_937_152_000_000_000).contains(&first),
        "{first}"
    );
    assert!(second > first);
}

#[tokio::test]
async fn two_ids_for_one_content_both_resolve_and_the_first_is_the_answer() {
    let mut plane = plane().await;
    let (first, second) = (638_000_000_000_000_010, 638_000_000_000_000_005);
    plane
        .write(&parameters_definition(first, &["Param1", "Param2"]))
        .await;
    plane
        .write(&parameters_definition(second, &["Param1", "Param2"]))
        .await;
    for restarted in [false, true] {
        if restarted {
            plane = plane.restart().await;
        }
        assert_eq!(plane.parameter_id(&["Param1", "Param2"]).await, first);
        assert_eq!(plane.parameters_of(first).await, ["Param1", "Param2"]);
        assert_eq!(plane.parameters_of(second).await, ["Param1", "Param2"]);
    }
}

#[tokio::test]
async fn ids_are_stable_across_a_restart_and_new_ones_are_above_them() {
    let mut plane = plane().await;
    let parameters = plane.parameter_id(&["speed", "rpm"]).await;
    let event = plane.event_id("pit stop").await;
    // An id stored by another writer far above this server's clock.
    let far = 900_000_000_000_000_000;
    plane.write(&event_definition(far, "from the future")).await;
    let mut plane = plane.restart().await;
    assert_eq!(plane.parameter_id(&["speed", "rpm"]).await, parameters);
    assert_eq!(plane.event_id("pit stop").await, event);
    assert_eq!(plane.parameters_of(parameters).await, ["speed", "rpm"]);
    assert_eq!(plane.event_of(event).await, "pit stop");
    let new = plane.parameter_id(&["new after restart"]).await;
    assert!(new > far, "{new} is not above {far}");
}

#[tokio::test]
async fn a_parameter_holding_a_comma_and_its_split_get_different_ids() {
    let mut plane = plane().await;
    let joined = plane.parameter_id(&["a,b"]).await;
    let split = plane.parameter_id(&["a", "b"]).await;
    assert_ne!(joined, split);
    assert_eq!(plane.parameters_of(joined).await, ["a,b"]);
    assert_eq!(plane.parameters_of(split).await, ["a", "b"]);
    // Parameter lists and events are separate spaces.
    let event = plane.event_id("a,b").await;
    assert_ne!(event, joined);
    assert!(plane.parameters_of(event).await.is_empty());
}

#[tokio::test]
async fn concurrent_requests_for_one_new_content_get_one_id() {
    let plane = plane().await;
    let asks = (0..32).map(|_| {
        let mut formats = plane.formats.clone();
        let data_source = plane.data_source.clone();
        tokio::spawn(async move {
            formats
                .get_parameter_data_format_id(GetParameterDataFormatIdRequest {
                    data_source,
                    parameters: strings(&["raced", "list"]),
                })
                .await
                .unwrap()
                .into_inner()
                .data_format_identifier
        })
    });
    let ids: Vec<u64> = futures::future::join_all(asks)
        .await
        .into_iter()
        .map(|id| id.unwrap())
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    let mut plane = plane;
    let definitions = plane
        .essentials()
        .await
        .into_iter()
        .filter(|p| p.r#type == "DataFormatDefinition")
        .count();
    assert_eq!(definitions, 1);
}

#[tokio::test]
async fn a_new_format_is_stored_as_the_reference_stores_it() {
    let mut plane = plane().await;
    let id = plane.event_id("stored").await;
    let essentials = plane.essentials().await;
    assert_eq!(essentials.len(), 1);
    let stored = &essentials[0];
    assert_eq!(stored.r#type, "DataFormatDefinition");
    assert_eq!(stored.session_key, "");
    assert!(stored.is_essential);
    let content = DataFormatDefinitionPacket::decode(stored.content.as_slice()).unwrap();
    assert_eq!(content.identifier, id);
    assert_eq!(content.r#type, DataFormatType::Event as i32);
    assert_eq!(
        content.format,
        Some(data_format_definition_packet::Format::EventIdentifier(
            "stored".into()
        ))
    );
    // It is in the main stream too, with record key "": readers without a session key see it.
    let mut read = read_connection(
        &plane.server.grpc_url(),
        ConnectionDetails {
            data_source: plane.data_source.clone(),
            ..Default::default()
        },
    )
    .await;
    let response = timeout(PATIENCE, read.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        response.response[0].decode_packet().unwrap().unwrap(),
        *stored
    );
    let metrics = plane.server.metrics().await;
    assert!(
        metrics.contains(&format!(
            "stream_api_data_formats_total{{data_source=\"{}\"}} 1",
            plane.data_source
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn unknown_ids_and_data_sources_answer_empty() {
    let mut plane = plane().await;
    assert!(plane.parameters_of(42).await.is_empty());
    assert_eq!(plane.event_of(42).await, "");
    let id = plane.parameter_id(&["p"]).await;
    // Ids are scoped per data source and per kind.
    assert_eq!(plane.event_of(id).await, "");
    let elsewhere = plane
        .formats
        .get_parameters_list(GetParametersListRequest {
            data_source: format!("{}-elsewhere", plane.data_source),
            data_format_identifier: id,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(elsewhere.parameters.is_empty());
}

#[tokio::test]
async fn bad_format_requests_are_refused_and_store_nothing() {
    let mut plane = plane().await;
    let refused = [
        GetParameterDataFormatIdRequest {
            data_source: plane.data_source.clone(),
            parameters: Vec::new(),
        },
        GetParameterDataFormatIdRequest {
            data_source: String::new(),
            parameters: strings(&["p"]),
        },
        GetParameterDataFormatIdRequest {
            data_source: "a b".into(),
            parameters: strings(&["p"]),
        },
        GetParameterDataFormatIdRequest {
            data_source: plane.data_source.clone(),
            parameters: strings(&["p", ""]),
        },
        GetParameterDataFormatIdRequest {
            data_source: plane.data_source.clone(),
            parameters: strings(&["line\nbreak"]),
        },
        GetParameterDataFormatIdRequest {
            data_source: plane.data_source.clone(),
            parameters: vec!["p".repeat(1025)],
        },
    ];
    for request in refused {
        let status = plane
            .formats
            .get_parameter_data_format_id(request.clone())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{request:?}");
        assert!(!status.message().is_empty());
    }
    let empty_event = plane
        .formats
        .get_event_data_format_id(GetEventDataFormatIdRequest {
            data_source: plane.data_source.clone(),
            event: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(empty_event.code(), Code::InvalidArgument);
    assert!(plane.essentials().await.is_empty());
}

#[tokio::test]
async fn definitions_another_writer_adds_are_followed_without_a_restart() {
    let mut plane = plane().await;
    // A data source the server already follows, and one it has never seen.
    plane.parameter_id(&["followed"]).await;
    let id = 638_000_000_000_000_020;
    let new_data_source = format!("{}-new", plane.data_source);
    plane.write(&event_definition(id, "added live")).await;
    assert_eq!(plane.event_of(id).await, "added live");
    assert_eq!(plane.event_id("added live").await, id);
    plane
        .writer
        .write_data_packet(WriteDataPacketRequest {
            detail: Some(DataPacketDetails::new(
                &event_definition(id, "elsewhere"),
                &new_data_source,
                "",
                "",
            )),
        })
        .await
        .unwrap();
    let elsewhere = plane
        .formats
        .get_event(GetEventRequest {
            data_source: new_data_source.clone(),
            data_format_identifier: id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(elsewhere.event, "elsewhere");
}

#[tokio::test]
async fn formats_outlive_packet_retention_and_a_restart() {
    let server = TestServer::start_with(|c| {
        c.store = StoreConfig::Embedded;
        c.stream_layout = StreamLayout::TopicBased;
        c.packets.retention_bytes = Some(64 * 1024);
    })
    .await;
    let mut plane = Plane::on(server).await;
    let id = plane.parameter_id(&["kept", "for ever"]).await;
    // Essentials well beyond the budget: retention removes the oldest chunks, the
    // definition's among them.
    for i in 0..64 {
        let mut filler = packet("Configuration", vec![b'x'; 4096]);
        filler.is_essential = true;
        filler.id = i;
        plane.write(&filler).await;
    }
    // Retention runs by itself about once a second and says nothing: look until the
    // essentials were trimmed, with the definition carried to their end.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let essentials = plane.essentials().await;
        let carried = essentials
            .last()
            .is_some_and(|p| p.r#type == "DataFormatDefinition");
        if essentials.len() < 65 && carried {
            let definitions = essentials
                .iter()
                .filter(|p| p.r#type == "DataFormatDefinition")
                .count();
            assert_eq!(definitions, 1, "the definition is kept once");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention did not trim the essentials with the definition carried forward: {} \
             packets, the last of type {:?}",
            essentials.len(),
            essentials.last().map(|p| p.r#type.clone())
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let mut plane = plane.restart().await;
    assert_eq!(plane.parameters_of(id).await, ["kept", "for ever"]);
    assert_eq!(plane.parameter_id(&["kept", "for ever"]).await, id);
}

#[tokio::test]
async fn under_partitions_the_formats_of_every_data_source_survive_a_restart() {
    // The reference's partition layout routes only its first data source and loses the
    // definitions of every other one.
    let server = TestServer::start_with(|c| {
        c.stream_layout = StreamLayout::PartitionBased(vec![("AppGroup1Stream".into(), 1)]);
    })
    .await;
    let mut formats = server.data_formats().await;
    let mut ids = Vec::new();
    let names =
        ["FirstDs", "SecondDs", "ThirdDs"].map(|name| data_source_for(name, server.data_dir()));
    for data_source in &names {
        let id = formats
            .get_parameter_data_format_id(GetParameterDataFormatIdRequest {
                data_source: data_source.clone(),
                parameters: strings(&[data_source, "shared"]),
            })
            .await
            .unwrap()
            .into_inner()
            .data_format_identifier;
        ids.push((data_source, id));
    }
    let server = server.restart().await;
    let mut formats = server.data_formats().await;
    for (data_source, id) in ids {
        let parameters = formats
            .get_parameters_list(GetParametersListRequest {
                data_source: data_source.clone(),
                data_format_identifier: id,
            })
            .await
            .unwrap()
            .into_inner()
            .parameters;
        assert_eq!(parameters, [data_source.as_str(), "shared"]);
    }
}
