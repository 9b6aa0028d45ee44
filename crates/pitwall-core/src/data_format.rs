//! Data formats: what a data format id stands for (an ordered parameter list, or an event), the
//! key its content is found by, the checks a new one passes, and its `DataFormatDefinition`
//! packet.
//!
//! The reference keys a parameter list by joining its identifiers with `","`, so `["a,b"]` and
//! `["a","b"]` share an id and one of them decodes wrongly. Here every identifier is written
//! with its length first, so two different lists never share a key; the order of the
//! identifiers still matters, and parameter lists and events are separate spaces.

use pitwall_proto::open_data::{
    DataFormatDefinitionPacket, DataFormatType, ParameterList, data_format_definition_packet,
};

use crate::rejection::{Rejection, quote};
use crate::validate::{Limits, check_no_control};

/// The packet type of a data format definition.
pub const DEFINITION_TYPE: &str = "DataFormatDefinition";

/// Bytes of identifiers one data format holds at most: a definition is one packet, and every
/// format is kept in memory for as long as the server runs.
pub const MAX_FORMAT_BYTES: usize = 1024 * 1024;

/// Parameters one data format lists at most.
pub const MAX_FORMAT_PARAMETERS: usize = 65_536;

/// The two id spaces of a data source: a parameter list and an event with the same text are
/// different formats, with different ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FormatKind {
    Parameters,
    Event,
}

/// What a data format id stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FormatContent {
    /// Parameter identifiers, in order.
    Parameters(Vec<String>),
    Event(String),
}

/// The key a format's content is found by: its kind, and its identifiers each written as
/// `{length in bytes}:{identifier}`, joined by `,`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentKey {
    pub kind: FormatKind,
    pub text: String,
}

/// The unambiguous key text of an ordered list of identifiers: `["p1", "p2"]` is `2:p1,2:p2`.
/// The lengths say where each identifier ends, so no identifier can be taken for two.
pub fn identifiers_key<S: AsRef<str>>(identifiers: &[S]) -> String {
    let mut key = String::with_capacity(
        identifiers
            .iter()
            .map(|i| i.as_ref().len() + 4)
            .sum::<usize>(),
    );
    for (index, identifier) in identifiers.iter().enumerate() {
        let identifier = identifier.as_ref();
        if index > 0 {
            key.push(',');
        }
        key.push_str(&identifier.len().to_string());
        key.push(':');
        key.push_str(identifier);
    }
    key
}

impl FormatContent {
    pub fn kind(&self) -> FormatKind {
        match self {
            FormatContent::Parameters(_) => FormatKind::Parameters,
            FormatContent::Event(_) => FormatKind::Event,
        }
    }

    pub fn key(&self) -> ContentKey {
        ContentKey {
            kind: self.kind(),
            text: match self {
                FormatContent::Parameters(parameters) => identifiers_key(parameters),
                FormatContent::Event(event) => identifiers_key(&[event]),
            },
        }
    }

    /// The checks a format passes before it gets an id: at least one identifier, none empty,
    /// none longer than the identifier limit or holding control characters, and the whole
    /// within [`MAX_FORMAT_PARAMETERS`] and [`MAX_FORMAT_BYTES`].
    pub fn check(&self, limits: &Limits) -> Result<(), Rejection> {
        match self {
            FormatContent::Parameters(parameters) => {
                if parameters.is_empty() {
                    return Err(Rejection::invalid(
                        "parameters is empty; a data format lists one parameter or more, in order",
                    ));
                }
                if parameters.len() > MAX_FORMAT_PARAMETERS {
                    return Err(Rejection::invalid(format!(
                        "parameters lists {} identifiers; a data format lists at most \
                         {MAX_FORMAT_PARAMETERS}",
                        parameters.len()
                    )));
                }
                let bytes: usize = parameters.iter().map(String::len).sum();
                if bytes > MAX_FORMAT_BYTES {
                    return Err(Rejection::invalid(format!(
                        "parameters hold {bytes} bytes of identifiers; a data format holds at \
                         most {MAX_FORMAT_BYTES}"
                    )));
                }
                for (index, parameter) in parameters.iter().enumerate() {
                    check_identifier(&format!("parameters[{index}]"), parameter, limits)?;
                }
                Ok(())
            }
            FormatContent::Event(event) => check_identifier("event", event, limits),
        }
    }

    /// The `DataFormatDefinition` content binding `id` to this format.
    pub fn definition(&self, id: u64) -> DataFormatDefinitionPacket {
        let (kind, format) = match self {
            FormatContent::Parameters(parameters) => (
                DataFormatType::Parameter,
                data_format_definition_packet::Format::ParameterIdentifiers(ParameterList {
                    parameter_identifiers: parameters.clone(),
                }),
            ),
            FormatContent::Event(event) => (
                DataFormatType::Event,
                data_format_definition_packet::Format::EventIdentifier(event.clone()),
            ),
        };
        DataFormatDefinitionPacket {
            identifier: id,
            r#type: kind as i32,
            format: Some(format),
        }
    }

    /// The id and format a definition binds, whoever wrote it; `None` when it binds nothing
    /// (no content, or id 0, which clients read as "no format"). The content decides the kind,
    /// whatever `type` says.
    pub fn from_definition(definition: DataFormatDefinitionPacket) -> Option<(u64, FormatContent)> {
        if definition.identifier == 0 {
            return None;
        }
        let content = match definition.format? {
            data_format_definition_packet::Format::ParameterIdentifiers(list) => {
                FormatContent::Parameters(list.parameter_identifiers)
            }
            data_format_definition_packet::Format::EventIdentifier(event) => {
                FormatContent::Event(event)
            }
        };
        Some((definition.identifier, content))
    }
}

fn check_identifier(field: &str, identifier: &str, limits: &Limits) -> Result<(), Rejection> {
    if identifier.is_empty() {
        return Err(Rejection::invalid(format!(
            "{field} is empty; name the identifier"
        )));
    }
    if identifier.len() > limits.identifier_bytes {
        return Err(Rejection::invalid(format!(
            "{field} {} is {} bytes; at most {} are allowed",
            quote(identifier),
            identifier.len(),
            limits.identifier_bytes
        )));
    }
    check_no_control(field, identifier)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parameters(list: &[&str]) -> FormatContent {
        FormatContent::Parameters(list.iter().map(|p| p.to_string()).collect())
    }

    // The reference's ParameterListKeyCreatorShould, with lengths in the key.
    #[test]
    fn an_empty_list_has_an_empty_key() {
        assert_eq!(identifiers_key::<&str>(&[]), "");
    }

    #[test]
    fn one_parameter_is_keyed_by_its_length_and_itself() {
        assert_eq!(identifiers_key(&["p1"]), "2:p1");
    }

    #[test]
    fn several_parameters_are_keyed_in_order() {
        assert_eq!(identifiers_key(&["p1", "p2", "p3"]), "2:p1,2:p2,2:p3");
    }

    #[test]
    fn an_identifier_holding_the_separator_does_not_collide_with_two_identifiers() {
        assert_ne!(parameters(&["a,b"]).key(), parameters(&["a", "b"]).key());
        assert_ne!(parameters(&["1:a"]).key(), parameters(&["1", "a"]).key());
        assert_ne!(parameters(&["a", ""]).key(), parameters(&["a"]).key());
    }

    #[test]
    fn the_order_of_parameters_matters() {
        assert_ne!(parameters(&["a", "b"]).key(), parameters(&["b", "a"]).key());
    }

    #[test]
    fn parameter_lists_and_events_are_separate_spaces() {
        let event = FormatContent::Event("e1".into());
        assert_ne!(parameters(&["e1"]).key(), event.key());
        assert_eq!(parameters(&["e1"]).key().text, event.key().text);
    }

    #[test]
    fn a_definition_reads_back_as_the_format_it_binds() {
        for content in [
            parameters(&["a", "b,c"]),
            FormatContent::Event("lap".into()),
        ] {
            let definition = content.definition(42);
            assert_eq!(
                FormatContent::from_definition(definition),
                Some((42, content))
            );
        }
        let parameter_type = parameters(&["x"]).definition(1).r#type;
        assert_eq!(parameter_type, DataFormatType::Parameter as i32);
        let event_type = FormatContent::Event("x".into()).definition(1).r#type;
        assert_eq!(event_type, DataFormatType::Event as i32);
    }

    #[test]
    fn a_definition_without_content_or_with_id_zero_binds_nothing() {
        let mut definition = parameters(&["a"]).definition(0);
        assert_eq!(FormatContent::from_definition(definition.clone()), None);
        definition.identifier = 5;
        definition.format = None;
        assert_eq!(FormatContent::from_definition(definition), None);
    }

    #[test]
    fn a_new_format_needs_identifiers_that_are_present_short_and_printable() {
        let limits = Limits::default();
        assert!(parameters(&["speed", "rpm"]).check(&limits).is_ok());
        assert!(FormatContent::Event("lap".into()).check(&limits).is_ok());
        let empty = parameters(&[]).check(&limits).unwrap_err().to_string();
        assert!(empty.contains("parameters is empty"), "{empty}");
        let blank = parameters(&["a", ""])
            .check(&limits)
            .unwrap_err()
            .to_string();
        assert!(blank.contains("parameters[1] is empty"), "{blank}");
        assert!(FormatContent::Event(String::new()).check(&limits).is_err());
        let control = parameters(&["a\nb"])
            .check(&limits)
            .unwrap_err()
            .to_string();
        assert!(control.contains("parameters[0]"), "{control}");
        let long = "p".repeat(limits.identifier_bytes + 1);
        assert!(parameters(&[&long]).check(&limits).is_err());
        assert!(FormatContent::Event(long).check(&limits).is_err());
    }

    #[test]
    fn a_new_format_is_bounded_in_count_and_bytes() {
        let limits = Limits::default();
        let many = FormatContent::Parameters(vec!["p".into(); MAX_FORMAT_PARAMETERS + 1]);
        assert!(many.check(&limits).is_err());
        let big = FormatContent::Parameters(vec!["p".repeat(1000); 1100]);
        let reason = big.check(&limits).unwrap_err().to_string();
        assert!(reason.contains("bytes of identifiers"), "{reason}");
    }
}
