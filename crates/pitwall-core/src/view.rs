//! A session in the form `pitwall.v1` answers with.

use pitwall_proto::feed;

use crate::session::Session;

impl Session {
    /// This session as `pitwall.v1.Session`.
    pub fn to_view(&self) -> feed::Session {
        feed::Session {
            session_key: self.key.clone(),
            data_source: self.data_source.clone(),
            identifier: self.identifier.clone(),
            r#type: self.session_type.clone(),
            version: self.version,
            associate_session_keys: self.associates.clone(),
            details: self.details.to_map(),
            utc_offset: Some(self.utc_offset),
            creation_time: self.creation_time,
            is_complete: self.is_complete(),
            termination_time: self.termination_time(),
            last_activity_time: self.last_activity,
            topic_partition_offsets: self.start_offsets().into_owned(),
        }
    }
}
