//! The session model, the rules of the session service and of data formats, with no I/O.
//!
//! - [`session`]: a session as the projection holds it (and as the embedded store persists it);
//!   [`details`]: its key/value details, compactly.
//! - [`record`]: the three records of the log (`NewSession`, `SessionInfo`, `EndOfSession`) and
//!   their `Packet` encoding shared with the reference's `SessionInfo` topic.
//! - [`transition`]: the one transition of a session by a record (the merge rules live here and
//!   only here), and the events it yields.
//! - [`projection`]: folds records, in log order, into the sessions, with their indexes; applying
//!   a record yields the events notifications are made from.
//! - [`overlay`]: the sessions as a batch of records will leave them, folded with the same
//!   transition, for the writer to decide and persist a batch before it is applied.
//! - [`command`]: turns a validated write request into the records to append (or a rejection),
//!   given the session as it stands.
//! - [`lifecycle`]: when sessions end or leave without a request: auto-end and retention, and
//!   the auto-end policies.
//! - [`query`]: listing filters and stable paging; [`tree`]: associate trees; [`view`]: a session
//!   in the `pitwall.v1` form.
//! - [`data_format`]: what a data format id stands for, its unambiguous content key, the
//!   checks of a new format and its `DataFormatDefinition` packet; [`data_filter`]: what
//!   `ReadDataPackets` keeps (packet types, include/exclude patterns on identifiers).
//! - [`validate`]: the request checks of the contract (names, sizes, times) and [`Limits`].
//! - [`rejection`]: why a request was refused, in words a client can act on.
//!
//! This crate must not do I/O, read clocks or spawn tasks: callers pass the time in, so every
//! rule is unit-testable and replay is the same code as live apply.

pub mod command;
pub mod data_filter;
pub mod data_format;
pub mod details;
pub mod lifecycle;
pub mod overlay;
pub mod projection;
pub mod query;
pub mod record;
pub mod rejection;
pub mod session;
pub mod transition;
pub mod tree;
pub mod validate;
pub mod view;

pub use command::{Command, Decision};
pub use details::Details;
pub use overlay::Overlay;
pub use projection::{Projection, SessionCounts};
pub use record::Record;
pub use rejection::{Rejection, quote};
pub use session::Session;
pub use transition::{Event, EventKind};
pub use validate::Limits;
