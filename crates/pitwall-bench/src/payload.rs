//! The session the benchmarks create: a `CreateSessionRequest` with five details, the size of a
//! typical session. etcd is sent the same request's encoded bytes as its value, so both
//! systems store the same payload.

use std::collections::BTreeMap;

use pitwall_proto::api::CreateSessionRequest;
use prost::Message;

/// Details a created session carries.
pub const DETAILS_PER_SESSION: usize = 5;

/// The create request of the `n`th session in `data_source`.
pub fn create_request(data_source: &str, n: u64) -> CreateSessionRequest {
    let details: BTreeMap<String, String> = [
        ("driver", format!("driver-{:02}", n % 20)),
        ("car", format!("car-{}", n % 10)),
        ("track", "silverstone-gp".to_owned()),
        ("event", format!("practice-{}", n % 3 + 1)),
        ("weather", "dry 21C".to_owned()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect();
    CreateSessionRequest {
        data_source: data_source.to_owned(),
        r#type: "Session".to_owned(),
        version: 1,
        identifier: format!("run {n}"),
        details,
        ..Default::default()
    }
}

/// The bytes etcd stores per session: the encoded create request.
pub fn etcd_value(n: u64) -> Vec<u8> {
    create_request("bench", n).encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_carry_five_details() {
        assert_eq!(create_request("ds", 7).details.len(), DETAILS_PER_SESSION);
    }

    #[test]
    fn the_etcd_value_is_the_encoded_create_request() {
        assert_eq!(etcd_value(3), create_request("bench", 3).encode_to_vec());
    }
}
