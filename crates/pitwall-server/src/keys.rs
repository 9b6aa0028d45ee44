//! Where new session keys come from: a local random UUID, or the reference's remote key
//! generator service (`UseRemoteKeyGenerator`).

use std::time::Duration;

use pitwall_proto::key_generator::generate_unique_key_response::Key;
use pitwall_proto::key_generator::unique_key_generator_service_client::UniqueKeyGeneratorServiceClient;
use pitwall_proto::key_generator::{GenerateUniqueKeyRequest, KeyType};
use tonic::Status;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

/// Longest key accepted from a remote generator; a GUID has 36 characters.
const MAX_REMOTE_KEY_BYTES: usize = 256;

#[derive(Clone)]
pub enum KeySource {
    /// A random (v4) UUID in lowercase 8-4-4-4-12 form.
    Local,
    Remote(Box<RemoteGenerator>),
}

#[derive(Clone)]
pub struct RemoteGenerator {
    address: String,
    client: UniqueKeyGeneratorServiceClient<Channel>,
    deadline: Duration,
}

impl KeySource {
    /// A remote source for `address` (`host:port`, as the reference's setting, or a URL). The
    /// connection is made on first use, so a generator that starts later is still found.
    pub fn remote(address: &str, deadline: Duration) -> Result<KeySource, String> {
        let url = if address.contains("://") {
            address.to_owned()
        } else {
            format!("http://{address}")
        };
        let endpoint = Endpoint::from_shared(url)
            .map_err(|e| format!("remote key generator address '{address}' is not valid: {e}"))?
            .connect_timeout(deadline);
        Ok(KeySource::Remote(Box::new(RemoteGenerator {
            address: address.to_owned(),
            client: UniqueKeyGeneratorServiceClient::new(endpoint.connect_lazy()),
            deadline,
        })))
    }

    /// A new session key. A remote generator that fails, answers late or answers without a
    /// string key gives `UNAVAILABLE`.
    pub async fn next_key(&self) -> Result<String, Status> {
        let RemoteGenerator {
            address,
            client,
            deadline,
        } = match self {
            KeySource::Local => return Ok(Uuid::new_v4().to_string()),
            KeySource::Remote(remote) => remote.as_ref(),
        };
        let deadline = *deadline;
        let request = GenerateUniqueKeyRequest {
            r#type: KeyType::String as i32,
        };
        let unavailable =
            |why: String| Status::unavailable(format!("remote key generator at {address} {why}"));
        let answer = tokio::time::timeout(deadline, client.clone().generate_unique_key(request))
            .await
            .map_err(|_| unavailable(format!("did not answer within {} ms", deadline.as_millis())))?
            .map_err(|status| unavailable(format!("failed: {}", status.message())))?;
        match answer.into_inner().key {
            Some(Key::StringKey(key)) if !key.is_empty() && key.len() <= MAX_REMOTE_KEY_BYTES => {
                Ok(key)
            }
            Some(Key::StringKey(key)) => Err(unavailable(format!(
                "answered an unusable key of {} bytes",
                key.len()
            ))),
            Some(Key::UlongKey(_)) | None => {
                Err(unavailable("answered without a string key".to_owned()))
            }
        }
    }
}
