//! What `ReadDataPackets` keeps: the packet types it reads, and the include/exclude patterns
//! on parameter and event identifiers.
//!
//! - `PeriodicData`, `RowData`, `SynchroData`: kept when **any** of their parameters passes the
//!   parameter filter; the parameters come inline or from the data format id.
//! - `Event`: kept when its event passes the event filter.
//! - `Marker`: kept exactly when the request includes markers.
//! - Every other type, and any packet whose content does not decode, is dropped.
//!
//! One identifier passes a filter when no exclude pattern matches it and an include pattern
//! does. No include pattern means every identifier; no exclude pattern excludes only the empty
//! identifier (the reference's `.*` and `^$`). Patterns match anywhere in the identifier
//! (unanchored) and are case-sensitive. They are Rust regular expressions: matching takes time
//! linear in the identifier, so no pattern can stall a reader, and a pattern that does not
//! compile is refused before the read starts (the reference drops every packet instead).

use std::collections::HashMap;
use std::sync::Arc;

use pitwall_proto::api::DataPacketRequest;
use pitwall_proto::open_data::{EventDataFormat, SampleDataFormat};
use pitwall_proto::open_data::{event_data_format, sample_data_format};
use prost::Message;
use regex::{Regex, RegexSet};

use crate::data_format::{FormatContent, FormatKind};
use crate::rejection::{Rejection, quote};

/// Decisions one filter remembers, and bytes of inline identifiers their keys may hold, at
/// most: enough for every format of a session, small enough that a reader's memory stays flat
/// whatever formats its packets carry.
const MAX_DECISIONS: usize = 4096;
const MAX_DECISION_BYTES: usize = 4 * 1024 * 1024;

/// Include and exclude patterns over one kind of identifier.
#[derive(Debug, Clone)]
pub struct IdentifierFilter {
    /// `None`: every identifier is included.
    include: Option<RegexSet>,
    /// `None`: only the empty identifier is excluded.
    exclude: Option<RegexSet>,
}

impl IdentifierFilter {
    /// The filter of `include` and `exclude` patterns; `fields` names them in a refusal
    /// (`("include_parameters", "exclude_parameters")`).
    pub fn new(
        include: &[String],
        exclude: &[String],
        fields: (&str, &str),
    ) -> Result<IdentifierFilter, Rejection> {
        Ok(IdentifierFilter {
            include: compile(fields.0, include)?,
            exclude: compile(fields.1, exclude)?,
        })
    }

    /// Whether `identifier` passes: excluded wins over included.
    pub fn passes(&self, identifier: &str) -> bool {
        let excluded = match &self.exclude {
            Some(set) => set.is_match(identifier),
            None => identifier.is_empty(),
        };
        if excluded {
            return false;
        }
        match &self.include {
            Some(set) => set.is_match(identifier),
            None => true,
        }
    }
}

/// The patterns as one set; each is compiled alone first, so that a refusal names the one at
/// fault.
fn compile(field: &str, patterns: &[String]) -> Result<Option<RegexSet>, Rejection> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let refuse = |index: usize, pattern: &str, error: regex::Error| {
        Rejection::invalid(format!(
            "{field}[{index}] {} is not a valid regular expression: {}; patterns use Rust regex \
             syntax (no look-around or back-references)",
            quote(pattern),
            regex_problem(&error)
        ))
    };
    for (index, pattern) in patterns.iter().enumerate() {
        Regex::new(pattern).map_err(|e| refuse(index, pattern, e))?;
    }
    RegexSet::new(patterns).map(Some).map_err(|e| {
        Rejection::invalid(format!(
            "{field}: the {} patterns together are too large to match ({}); use fewer or \
             simpler patterns",
            patterns.len(),
            regex_problem(&e)
        ))
    })
}

/// The reason a pattern was refused, on one line (the crate's syntax errors draw the pattern
/// over several lines; the pattern is quoted separately).
fn regex_problem(error: &regex::Error) -> String {
    match error {
        regex::Error::Syntax(text) => text
            .lines()
            .rev()
            .find_map(|line| line.strip_prefix("error: "))
            .unwrap_or("syntax error")
            .to_owned(),
        other => other.to_string().replace('\n', " "),
    }
}

/// Looks data format ids up in the formats of the reader's data source.
pub trait FormatLookup {
    /// What `id` stands for among the formats of `kind`; `None` when it is not known (yet).
    fn lookup(&self, kind: FormatKind, id: u64) -> Option<Arc<FormatContent>>;
}

/// What becomes of one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Not a type ReadDataPackets reads.
    NotData,
    /// Its identifiers do not pass the filters (or it is a marker and markers are not read).
    Filtered,
    /// Its data format id is not known; not remembered, so a format that arrives later works.
    UnknownFormat(u64),
    /// Its content, or the data format in it, does not decode.
    Undecodable,
}

/// The data format of a packet, as the decision cache knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum FormatRef {
    ParameterId(u64),
    Parameters(Vec<String>),
    EventId(u64),
    Event(String),
}

impl FormatRef {
    /// Bytes of identifiers the key holds.
    fn bytes(&self) -> usize {
        match self {
            FormatRef::ParameterId(_) | FormatRef::EventId(_) => 0,
            FormatRef::Parameters(list) => list.iter().map(String::len).sum(),
            FormatRef::Event(event) => event.len(),
        }
    }
}

/// The first field of the three sample packets.
#[derive(Clone, PartialEq, Message)]
struct SampleHolder {
    #[prost(message, optional, tag = "1")]
    data_format: Option<SampleDataFormat>,
}

/// The first field of an event packet.
#[derive(Clone, PartialEq, Message)]
struct EventHolder {
    #[prost(message, optional, tag = "1")]
    data_format: Option<EventDataFormat>,
}

/// The filter of one `ReadDataPackets` call, with the decisions it made per data format.
#[derive(Debug)]
pub struct DataPacketFilter {
    parameters: IdentifierFilter,
    events: IdentifierFilter,
    include_markers: bool,
    decisions: HashMap<FormatRef, bool>,
    decision_bytes: usize,
}

impl DataPacketFilter {
    /// The request's filter; a pattern that does not compile is refused, naming it.
    pub fn new(request: &DataPacketRequest) -> Result<DataPacketFilter, Rejection> {
        Ok(DataPacketFilter {
            parameters: IdentifierFilter::new(
                &request.include_parameters,
                &request.exclude_parameters,
                ("include_parameters", "exclude_parameters"),
            )?,
            events: IdentifierFilter::new(
                &request.include_events,
                &request.exclude_events,
                ("include_events", "exclude_events"),
            )?,
            include_markers: request.include_markers,
            decisions: HashMap::new(),
            decision_bytes: 0,
        })
    }

    /// What becomes of a packet of `packet_type` with `content` (the `Packet`'s fields).
    pub fn decide(
        &mut self,
        packet_type: &str,
        content: &[u8],
        formats: &dyn FormatLookup,
    ) -> Verdict {
        let format = match packet_type {
            "PeriodicData" | "RowData" | "SynchroData" => {
                let Ok(holder) = SampleHolder::decode(content) else {
                    return Verdict::Undecodable;
                };
                match holder.data_format.and_then(|f| f.format) {
                    Some(sample_data_format::Format::DataFormatIdentifier(id)) => {
                        FormatRef::ParameterId(id)
                    }
                    Some(sample_data_format::Format::ParameterIdentifiers(list)) => {
                        FormatRef::Parameters(list.parameter_identifiers)
                    }
                    None => return Verdict::Undecodable,
                }
            }
            "Event" => {
                let Ok(holder) = EventHolder::decode(content) else {
                    return Verdict::Undecodable;
                };
                match holder.data_format.and_then(|f| f.format) {
                    Some(event_data_format::Format::DataFormatIdentifier(id)) => {
                        FormatRef::EventId(id)
                    }
                    Some(event_data_format::Format::EventIdentifier(event)) => {
                        FormatRef::Event(event)
                    }
                    None => return Verdict::Undecodable,
                }
            }
            "Marker" => {
                return if self.include_markers {
                    Verdict::Keep
                } else {
                    Verdict::Filtered
                };
            }
            _ => return Verdict::NotData,
        };
        let keep = match self.decisions.get(&format) {
            Some(keep) => *keep,
            None => {
                let keep = match &format {
                    FormatRef::Parameters(list) => self.any_parameter_passes(list),
                    FormatRef::Event(event) => self.events.passes(event),
                    FormatRef::ParameterId(id) => {
                        match formats.lookup(FormatKind::Parameters, *id).as_deref() {
                            Some(FormatContent::Parameters(list)) => {
                                self.any_parameter_passes(list)
                            }
                            _ => return Verdict::UnknownFormat(*id),
                        }
                    }
                    FormatRef::EventId(id) => {
                        match formats.lookup(FormatKind::Event, *id).as_deref() {
                            Some(FormatContent::Event(event)) => self.events.passes(event),
                            _ => return Verdict::UnknownFormat(*id),
                        }
                    }
                };
                self.remember(format, keep);
                keep
            }
        };
        if keep {
            Verdict::Keep
        } else {
            Verdict::Filtered
        }
    }

    fn any_parameter_passes(&self, parameters: &[String]) -> bool {
        parameters.iter().any(|p| self.parameters.passes(p))
    }

    /// Keeps a decision; a full cache starts again empty, so it holds the formats in use now.
    fn remember(&mut self, format: FormatRef, keep: bool) {
        let bytes = format.bytes();
        if bytes > MAX_DECISION_BYTES {
            return;
        }
        if self.decisions.len() >= MAX_DECISIONS || self.decision_bytes + bytes > MAX_DECISION_BYTES
        {
            self.decisions.clear();
            self.decision_bytes = 0;
        }
        self.decision_bytes += bytes;
        self.decisions.insert(format, keep);
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use pitwall_proto::open_data::{
        EventPacket, MarkerPacket, ParameterList, PeriodicDataPacket, RowDataPacket,
        SynchroDataPacket,
    };

    use super::*;

    fn patterns(list: &[&str]) -> Vec<String> {
        list.iter().map(|p| p.to_string()).collect()
    }

    fn filter(include: &[&str], exclude: &[&str]) -> IdentifierFilter {
        IdentifierFilter::new(
            &patterns(include),
            &patterns(exclude),
            ("include", "exclude"),
        )
        .unwrap()
    }

    // The reference's IdentifierFilterShould.
    #[test]
    fn the_default_include_matches_any_identifier() {
        assert!(filter(&[], &[]).passes("Parameter 9"));
    }

    #[test]
    fn the_default_exclude_excludes_only_the_empty_identifier() {
        assert!(filter(&[], &[]).passes("Parameter 9"));
        assert!(!filter(&[], &[]).passes(""));
    }

    #[test]
    fn an_include_pattern_includes_what_it_matches() {
        let include = filter(&["Param.+"], &[]);
        assert!(include.passes("Parameter 9"));
        assert!(!include.passes("Speed"));
    }

    #[test]
    fn an_exclude_pattern_excludes_what_it_matches() {
        let exclude = filter(&[], &["Param.+"]);
        assert!(!exclude.passes("Parameter 9"));
        assert!(exclude.passes("Speed"));
    }

    #[test]
    fn exclude_wins_over_include() {
        assert!(!filter(&["Param.+"], &["Param.+"]).passes("Parameter 9"));
    }

    #[test]
    fn patterns_match_anywhere_and_are_case_sensitive() {
        let include = filter(&["speed"], &[]);
        assert!(include.passes("vCar:speed:Chassis"));
        assert!(!include.passes("vCar:Speed:Chassis"));
        assert!(filter(&["^vCar$"], &[]).passes("vCar"));
        assert!(!filter(&["^vCar$"], &[]).passes("vCar2"));
    }

    #[test]
    fn an_invalid_pattern_is_refused_naming_it_and_its_field() {
        let error = IdentifierFilter::new(
            &patterns(&["ok", "(unclosed"]),
            &[],
            ("include_parameters", "exclude_parameters"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("include_parameters[1] '(unclosed' is not a valid regular"),
            "{error}"
        );
        assert!(error.contains("unclosed group"), "{error}");
        assert!(!error.contains('\n'), "{error:?}");
        let look_around =
            IdentifierFilter::new(&[], &patterns(&["(?=a)"]), ("i", "exclude_events"))
                .unwrap_err()
                .to_string();
        assert!(
            look_around.starts_with("exclude_events[0]"),
            "{look_around}"
        );
    }

    /// Formats by id, counting lookups.
    #[derive(Default)]
    struct Formats {
        known: HashMap<(FormatKind, u64), Arc<FormatContent>>,
        lookups: RefCell<usize>,
    }

    impl FormatLookup for Formats {
        fn lookup(&self, kind: FormatKind, id: u64) -> Option<Arc<FormatContent>> {
            *self.lookups.borrow_mut() += 1;
            self.known.get(&(kind, id)).cloned()
        }
    }

    fn parameters(list: &[&str]) -> Option<SampleDataFormat> {
        Some(SampleDataFormat {
            format: Some(sample_data_format::Format::ParameterIdentifiers(
                ParameterList {
                    parameter_identifiers: patterns(list),
                },
            )),
        })
    }

    fn parameter_id(id: u64) -> Option<SampleDataFormat> {
        Some(SampleDataFormat {
            format: Some(sample_data_format::Format::DataFormatIdentifier(id)),
        })
    }

    fn periodic(format: Option<SampleDataFormat>) -> Vec<u8> {
        PeriodicDataPacket {
            data_format: format,
            start_time: 1,
            interval: 2,
            columns: Vec::new(),
        }
        .encode_to_vec()
    }

    fn event(format: event_data_format::Format) -> Vec<u8> {
        EventPacket {
            data_format: Some(EventDataFormat {
                format: Some(format),
            }),
            timestamp: 3,
            raw_values: vec![1.0],
        }
        .encode_to_vec()
    }

    fn request(include: &[&str], exclude: &[&str]) -> DataPacketRequest {
        DataPacketRequest {
            include_parameters: patterns(include),
            exclude_parameters: patterns(exclude),
            include_events: patterns(include),
            exclude_events: patterns(exclude),
            ..Default::default()
        }
    }

    #[test]
    fn sample_packets_are_kept_when_any_parameter_passes() {
        let mut keep = DataPacketFilter::new(&request(&["Included"], &["Excluded"])).unwrap();
        let formats = Formats::default();
        let both = periodic(parameters(&["Excluded", "Included"]));
        let row = RowDataPacket {
            data_format: parameters(&["Included"]),
            ..Default::default()
        }
        .encode_to_vec();
        let synchro = SynchroDataPacket {
            data_format: parameters(&["Included"]),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(keep.decide("PeriodicData", &both, &formats), Verdict::Keep);
        assert_eq!(keep.decide("RowData", &row, &formats), Verdict::Keep);
        assert_eq!(
            keep.decide("SynchroData", &synchro, &formats),
            Verdict::Keep
        );
        let excluded = periodic(parameters(&["Excluded"]));
        assert_eq!(
            keep.decide("PeriodicData", &excluded, &formats),
            Verdict::Filtered
        );
        let other = periodic(parameters(&["Other"]));
        assert_eq!(
            keep.decide("PeriodicData", &other, &formats),
            Verdict::Filtered
        );
    }

    #[test]
    fn a_parameter_in_both_lists_is_excluded() {
        let mut keep = DataPacketFilter::new(&request(&["Both"], &["Both"])).unwrap();
        let packet = periodic(parameters(&["Both"]));
        assert_eq!(
            keep.decide("PeriodicData", &packet, &Formats::default()),
            Verdict::Filtered
        );
    }

    #[test]
    fn ids_are_resolved_through_the_formats_and_unknown_ids_are_not_remembered() {
        let mut keep = DataPacketFilter::new(&request(&["Included"], &[])).unwrap();
        let mut formats = Formats::default();
        let packet = periodic(parameter_id(7));
        assert_eq!(
            keep.decide("PeriodicData", &packet, &formats),
            Verdict::UnknownFormat(7)
        );
        formats.known.insert(
            (FormatKind::Parameters, 7),
            Arc::new(FormatContent::Parameters(patterns(&["Included"]))),
        );
        assert_eq!(
            keep.decide("PeriodicData", &packet, &formats),
            Verdict::Keep
        );
        // Known decisions are remembered: no more lookups for the same format.
        let lookups = *formats.lookups.borrow();
        assert_eq!(
            keep.decide("PeriodicData", &packet, &formats),
            Verdict::Keep
        );
        assert_eq!(*formats.lookups.borrow(), lookups);
    }

    #[test]
    fn an_id_of_the_other_kind_is_unknown() {
        let mut keep = DataPacketFilter::new(&request(&[], &[])).unwrap();
        let mut formats = Formats::default();
        formats.known.insert(
            (FormatKind::Event, 9),
            Arc::new(FormatContent::Event("lap".into())),
        );
        let packet = periodic(parameter_id(9));
        assert_eq!(
            keep.decide("PeriodicData", &packet, &formats),
            Verdict::UnknownFormat(9)
        );
        let lap = event(event_data_format::Format::DataFormatIdentifier(9));
        assert_eq!(keep.decide("Event", &lap, &formats), Verdict::Keep);
    }

    #[test]
    fn events_are_kept_by_their_event_identifier() {
        let mut keep = DataPacketFilter::new(&request(&["lap"], &["pit"])).unwrap();
        let formats = Formats::default();
        let lap = event(event_data_format::Format::EventIdentifier("lap".into()));
        let pit_lap = event(event_data_format::Format::EventIdentifier("pit lap".into()));
        let other = event(event_data_format::Format::EventIdentifier("flag".into()));
        assert_eq!(keep.decide("Event", &lap, &formats), Verdict::Keep);
        assert_eq!(keep.decide("Event", &pit_lap, &formats), Verdict::Filtered);
        assert_eq!(keep.decide("Event", &other, &formats), Verdict::Filtered);
    }

    #[test]
    fn markers_are_kept_exactly_when_included() {
        let marker = MarkerPacket {
            label: "Lap 1".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let formats = Formats::default();
        let mut without = DataPacketFilter::new(&request(&[], &[])).unwrap();
        assert_eq!(
            without.decide("Marker", &marker, &formats),
            Verdict::Filtered
        );
        let mut with = DataPacketFilter::new(&DataPacketRequest {
            include_markers: true,
            // Markers have no identifiers: patterns do not apply to them.
            exclude_parameters: patterns(&[".*"]),
            exclude_events: patterns(&[".*"]),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(with.decide("Marker", &marker, &formats), Verdict::Keep);
    }

    #[test]
    fn every_other_type_is_dropped() {
        let mut keep = DataPacketFilter::new(&DataPacketRequest {
            include_markers: true,
            ..Default::default()
        })
        .unwrap();
        let formats = Formats::default();
        for kind in [
            "Configuration",
            "Metadata",
            "RawCANData",
            "Error",
            "CoverageCursorInfo",
            "AxisData",
            "MapData",
            "NewSession",
            "DataFormatDefinition",
            "periodicdata",
            "",
        ] {
            assert_eq!(keep.decide(kind, &[], &formats), Verdict::NotData, "{kind}");
        }
    }

    #[test]
    fn content_that_does_not_decode_is_dropped() {
        let mut keep = DataPacketFilter::new(&request(&[], &[])).unwrap();
        let formats = Formats::default();
        let garbage = [0xff, 0xff, 0xff];
        assert_eq!(
            keep.decide("PeriodicData", &garbage, &formats),
            Verdict::Undecodable
        );
        assert_eq!(
            keep.decide("Event", &garbage, &formats),
            Verdict::Undecodable
        );
        let no_format = periodic(None);
        assert_eq!(
            keep.decide("PeriodicData", &no_format, &formats),
            Verdict::Undecodable
        );
    }

    #[test]
    fn the_decision_cache_stays_bounded() {
        let mut keep = DataPacketFilter::new(&request(&[], &[])).unwrap();
        let formats = Formats::default();
        for i in 0..(MAX_DECISIONS + 10) {
            let name = format!("p{i}");
            let packet = periodic(parameters(&[&name]));
            assert_eq!(
                keep.decide("PeriodicData", &packet, &formats),
                Verdict::Keep
            );
        }
        assert!(keep.decisions.len() <= MAX_DECISIONS);
        assert!(keep.decision_bytes <= MAX_DECISION_BYTES);
    }
}
