//! Generated protobuf messages and gRPC stubs for the Stream API.
//!
//! Generated code: `open_data` holds every open-data packet (the session packets are also the
//! records of the log), `api` the Stream API's services (session management, packet writing and
//! reading, read connections, data format ids) with their clients and servers, `key_generator` the
//! remote key generator's client, `feed` Pitwall's own `pitwall.v1` service. Three messages are
//! written by hand: [`watch_response`], so that a server can send an event it encoded once to
//! every watcher, and the two of [`raw_packet`], so that a client's packet is kept as the bytes it
//! sent; [`json`] is the one JSON form of `pitwall.v1` sessions, events and trees (the command
//! line prints it, the board reads it). Logic belongs in `pitwall-core` and `pitwall-server`.

/// The generated modules, nested as their protobuf packages (generated code refers across
/// packages by relative paths, so the nesting must match).
pub mod ma {
    pub mod streaming {
        pub mod open_data {
            pub mod v1 {
                tonic::include_proto!("ma.streaming.open_data.v1");
            }
        }
        pub mod api {
            pub mod v1 {
                tonic::include_proto!("ma.streaming.api.v1");

                pub use crate::raw_packet::{DataPacketDetails, PacketResponse};
            }
        }
        pub mod key_generator {
            pub mod v1 {
                tonic::include_proto!("ma.streaming.key_generator.v1");
            }
        }
    }
}

pub mod json;
pub mod raw_packet;
pub mod watch_response;

/// Pitwall's own services, beside the Stream API.
pub mod pitwall {
    pub mod v1 {
        tonic::include_proto!("pitwall.v1");

        pub use crate::watch_response::WatchResponse;
    }
}

/// `pitwall.v1`: the session feed, listings and associate trees.
pub use pitwall::v1 as feed;

/// `ma.streaming.open_data.v1`: the open-data packets.
pub use ma::streaming::open_data::v1 as open_data;

/// `ma.streaming.api.v1`: the Stream API services.
pub use ma::streaming::api::v1 as api;

/// `ma.streaming.key_generator.v1`: the remote session key generator.
pub use ma::streaming::key_generator::v1 as key_generator;

/// Encoded `FileDescriptorSet` of every file above, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/pitwall_descriptor.bin"));
