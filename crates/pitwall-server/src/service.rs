//! The `ma.streaming.api.v1.SessionManagementService` over the engine.
//!
//! Expected failures (unknown key, invalid input, feature disabled) answer the normal response
//! with `success = false` and the reason in the `pitwall-error` metadata key; gRPC statuses are
//! kept for what is not the client's fault (storage, overload, shutdown).

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use futures::{Stream, StreamExt};
use pitwall_core::{Command, Decision, Limits, Record, Rejection, Session, quote};
use pitwall_proto::api::session_management_service_server::SessionManagementService;
use pitwall_proto::api::*;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};
use tracing::{info, warn};

use crate::engine::{Engine, WriteError};
use crate::keys::KeySource;
use crate::metrics::Metrics;
use crate::notify::{FellBehind, Hub, Kind};
use crate::shutdown::Shutdown;

/// Response metadata key carrying the reason of a `success = false` answer.
pub const ERROR_METADATA_KEY: &str = "pitwall-error";

pub struct SessionService {
    /// Set once the store has been read; until then every RPC answers `UNAVAILABLE`.
    engine: Arc<OnceLock<Engine>>,
    hub: Arc<Hub>,
    metrics: Metrics,
    limits: Limits,
    enabled: bool,
    shutdown: Shutdown,
    keys: KeySource,
    /// Largest response: a `GetCurrentSessions` answer beyond it is refused, not cut.
    max_message_bytes: usize,
}

/// Why a request did not succeed.
enum Failure {
    /// Expected: answered with `success = false` and a reason.
    Refused {
        session_key: String,
        rejection: Rejection,
    },
    /// Not the client's fault: answered with a gRPC status.
    Error(Status),
}

impl Failure {
    fn refused(session_key: &str, rejection: Rejection) -> Failure {
        Failure::Refused {
            session_key: session_key.to_owned(),
            rejection,
        }
    }
}

type NotificationStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl SessionService {
    pub fn new(
        engine: Arc<OnceLock<Engine>>,
        hub: Arc<Hub>,
        metrics: Metrics,
        limits: Limits,
        enabled: bool,
        shutdown: Shutdown,
        keys: KeySource,
    ) -> SessionService {
        SessionService {
            engine,
            hub,
            metrics,
            limits,
            enabled,
            shutdown,
            keys,
            max_message_bytes: usize::MAX,
        }
    }

    /// The largest message the server sends (`--max-message-bytes`).
    pub fn with_max_message_bytes(mut self, max_message_bytes: usize) -> SessionService {
        self.max_message_bytes = max_message_bytes;
        self
    }

    fn check_enabled(&self, session_key: &str) -> Result<(), Failure> {
        if self.enabled {
            Ok(())
        } else {
            Err(Failure::refused(session_key, Rejection::Disabled))
        }
    }

    fn engine(&self) -> Result<&Engine, Failure> {
        self.engine.get().ok_or_else(|| Failure::Error(starting()))
    }

    /// Validates, then hands the command to the writer and waits for it to be durable.
    async fn write(&self, command: Command) -> Result<Decision, Failure> {
        let session_key = command.session_key().to_owned();
        self.check_enabled(&session_key)?;
        command
            .validate(&self.limits)
            .map_err(|rejection| Failure::refused(&session_key, rejection))?;
        self.engine()?.submit(command).await.map_err(|e| match e {
            WriteError::Rejected(rejection) => Failure::refused(&session_key, rejection),
            WriteError::Overloaded(_) => Failure::Error(Status::resource_exhausted(e.to_string())),
            WriteError::Unavailable(_) | WriteError::ShuttingDown => {
                Failure::Error(Status::unavailable(e.to_string()))
            }
        })
    }

    /// Turns an outcome into the gRPC answer, with metrics and the refusal log line.
    fn answer<T: Default>(
        &self,
        method: &'static str,
        started: Instant,
        result: Result<T, Failure>,
    ) -> Result<Response<T>, Status> {
        match result {
            Ok(response) => answer_status(&self.metrics, method, started, Ok(response)),
            Err(Failure::Refused {
                session_key,
                rejection,
            }) => {
                self.metrics
                    .observe_rpc(method, rejection.class(), started.elapsed());
                warn!(rpc = method, session_key = %quote(&session_key), reason = %rejection, "request refused");
                let mut response = Response::new(T::default());
                response
                    .metadata_mut()
                    .insert(ERROR_METADATA_KEY, ascii_metadata(&rejection.to_string()));
                Ok(response)
            }
            Err(Failure::Error(status)) => {
                answer_status(&self.metrics, method, started, Err(status))
            }
        }
    }

    async fn create(
        &self,
        request: CreateSessionRequest,
    ) -> Result<CreateSessionResponse, Failure> {
        self.check_enabled("")?;
        // Validated before a key is asked for, so a remote generator is not called for requests
        // that will be refused anyway; `write` checks again with the key (an associate may not
        // be the session itself).
        let mut command = Command::Create {
            session_key: String::new(),
            request,
        };
        command
            .validate(&self.limits)
            .map_err(|rejection| Failure::refused("", rejection))?;
        let session_key = self.keys.next_key().await.map_err(Failure::Error)?;
        if let Command::Create {
            session_key: key, ..
        } = &mut command
        {
            key.clone_from(&session_key);
        }
        match self.write(command).await? {
            Decision::Append(Record::NewSession { packet, .. }) => Ok(CreateSessionResponse {
                session_key,
                new_session: Some(packet),
                success: true,
            }),
            other => Err(unexpected("CreateSession", &other)),
        }
    }

    /// A write whose answer is only `success`.
    async fn update<T: Default>(
        &self,
        method: &'static str,
        command: Command,
        success: T,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        let result = self.write(command).await.map(|_| success);
        self.answer(method, started, result)
    }

    async fn session_info(&self, session_key: &str) -> Result<GetSessionInfoResponse, Failure> {
        self.check_enabled(session_key)?;
        let engine = self.engine()?;
        let mut response = {
            let projection = engine.read();
            let session = projection.get(session_key).ok_or_else(|| {
                Failure::refused(session_key, Rejection::UnknownSession(session_key.into()))
            })?;
            info_response(session)
        };
        response.streams = engine.streams(&response.data_source, session_key).await;
        Ok(response)
    }

    /// A notification stream of `kind` for `data_source`; with the feature off, a stream that
    /// stays open and silent until the client leaves or the server stops.
    fn notifications<T: Send + 'static>(
        &self,
        method: &'static str,
        kind: Kind,
        data_source: String,
        make: fn(String, String) -> T,
    ) -> Result<Response<NotificationStream<T>>, Status> {
        let started = Instant::now();
        if self.engine.get().is_none() {
            self.metrics
                .observe_rpc(method, "unavailable", started.elapsed());
            return Err(starting());
        }
        if !self.enabled {
            let shutdown = self.shutdown.clone();
            let silent = futures::stream::once(async move { shutdown.wait().await })
                .filter_map(|()| async { None });
            self.metrics
                .observe_rpc(method, "disabled", started.elapsed());
            return Ok(Response::new(Box::pin(silent)));
        }
        // A stream has no `success` field: the reason travels in its status.
        if let Err(rejection) = self.limits.check_data_source(&data_source) {
            return answer_status(
                &self.metrics,
                method,
                started,
                Err(Status::invalid_argument(rejection.to_string())),
            );
        }
        let subscription = self.hub.subscribe(kind, &data_source);
        let stream = subscription.map(move |item| match item {
            Ok(session_key) => Ok(make(session_key.to_string(), data_source.clone())),
            Err(FellBehind { queue }) => Err(Status::resource_exhausted(format!(
                "subscriber fell more than {queue} notifications behind and was cut off; \
                 subscribe again and re-read the sessions"
            ))),
        });
        self.metrics
            .observe_rpc(method, "success", started.elapsed());
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl SessionManagementService for SessionService {
    async fn create_session(
        &self,
        request: Request<CreateSessionRequest>,
    ) -> Result<Response<CreateSessionResponse>, Status> {
        let started = Instant::now();
        let result = self.create(request.into_inner()).await;
        self.answer("CreateSession", started, result)
    }

    async fn end_session(
        &self,
        request: Request<EndSessionRequest>,
    ) -> Result<Response<EndSessionResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let requested_data_source = request.data_source.clone();
        let result = self.write(Command::End(request)).await.and_then(|decision| {
            let packet = match decision {
                Decision::Append(Record::EndOfSession { packet, .. }) => packet,
                Decision::AlreadyEnded(packet) => packet,
                other => return Err(unexpected("EndSession", &other)),
            };
            if !requested_data_source.is_empty() && requested_data_source != packet.data_source {
                info!(
                    requested = %quote(&requested_data_source),
                    session = %packet.data_source,
                    "EndSession named another data source than the session's; the session's is used"
                );
            }
            Ok(EndSessionResponse {
                end_session: Some(packet),
                success: true,
            })
        });
        self.answer("EndSession", started, result)
    }

    async fn get_current_sessions(
        &self,
        request: Request<GetCurrentSessionsRequest>,
    ) -> Result<Response<GetCurrentSessionsResponse>, Status> {
        let started = Instant::now();
        let data_source = request.into_inner().data_source;
        let result = self.check_enabled("").and_then(|()| {
            self.limits
                .check_data_source(&data_source)
                .map_err(|rejection| Failure::refused("", rejection))?;
            let projection = self.engine()?.read();
            // Measured before anything is copied: past the limit the answer could only fail
            // in the encoder, which tonic reports as OUT_OF_RANGE and nobody logs.
            let (count, bytes) = projection
                .keys_of(&data_source)
                .fold((0usize, SUCCESS_FIELD_BYTES), |(count, bytes), key| {
                    (count + 1, bytes + repeated_string_bytes(key))
                });
            if bytes > self.max_message_bytes {
                return Err(Failure::Error(Status::resource_exhausted(format!(
                    "GetCurrentSessions for data_source '{data_source}' would answer {count} \
                     session keys in {bytes} bytes, over the message limit of {} bytes; list \
                     them in pages with pitwall.v1.SessionFeed/ListSessions (filter.data_sources \
                     = ['{data_source}']), or remove completed sessions with retention \
                     (--retention-completed-for)",
                    self.max_message_bytes
                ))));
            }
            Ok(GetCurrentSessionsResponse {
                session_keys: projection.keys_of(&data_source).cloned().collect(),
                success: true,
            })
        });
        self.answer("GetCurrentSessions", started, result)
    }

    async fn get_session_info(
        &self,
        request: Request<GetSessionInfoRequest>,
    ) -> Result<Response<GetSessionInfoResponse>, Status> {
        let started = Instant::now();
        let result = self.session_info(&request.into_inner().session_key).await;
        self.answer("GetSessionInfo", started, result)
    }

    type GetSessionStartNotificationStream =
        NotificationStream<GetSessionStartNotificationResponse>;

    async fn get_session_start_notification(
        &self,
        request: Request<GetSessionStartNotificationRequest>,
    ) -> Result<Response<Self::GetSessionStartNotificationStream>, Status> {
        self.notifications(
            "GetSessionStartNotification",
            Kind::Start,
            request.into_inner().data_source,
            |session_key, data_source| GetSessionStartNotificationResponse {
                session_key,
                data_source,
            },
        )
    }

    type GetSessionStopNotificationStream = NotificationStream<GetSessionStopNotificationResponse>;

    async fn get_session_stop_notification(
        &self,
        request: Request<GetSessionStopNotificationRequest>,
    ) -> Result<Response<Self::GetSessionStopNotificationStream>, Status> {
        self.notifications(
            "GetSessionStopNotification",
            Kind::Stop,
            request.into_inner().data_source,
            |session_key, data_source| GetSessionStopNotificationResponse {
                session_key,
                data_source,
            },
        )
    }

    async fn update_session_identifier(
        &self,
        request: Request<UpdateSessionIdentifierRequest>,
    ) -> Result<Response<UpdateSessionIdentifierResponse>, Status> {
        let success = UpdateSessionIdentifierResponse { success: true };
        self.update(
            "UpdateSessionIdentifier",
            Command::UpdateIdentifier(request.into_inner()),
            success,
        )
        .await
    }

    async fn add_associate_session(
        &self,
        request: Request<AddAssociateSessionRequest>,
    ) -> Result<Response<AddAssociateSessionResponse>, Status> {
        let success = AddAssociateSessionResponse { success: true };
        self.update(
            "AddAssociateSession",
            Command::AddAssociate(request.into_inner()),
            success,
        )
        .await
    }

    async fn update_session_details(
        &self,
        request: Request<UpdateSessionDetailsRequest>,
    ) -> Result<Response<UpdateSessionDetailsResponse>, Status> {
        let success = UpdateSessionDetailsResponse { success: true };
        self.update(
            "UpdateSessionDetails",
            Command::UpdateDetails(request.into_inner()),
            success,
        )
        .await
    }
}

/// `GetSessionInfo`'s view of a session.
fn info_response(session: &Session) -> GetSessionInfoResponse {
    GetSessionInfoResponse {
        data_source: session.data_source.clone(),
        identifier: session.identifier.clone(),
        r#type: session.session_type.clone(),
        version: session.version,
        associate_session_keys: session.associates.clone(),
        is_complete: session.is_complete(),
        // Filled by the caller from the broker; the embedded store has none.
        streams: Vec::new(),
        topic_partition_offsets: session.start_offsets().into_owned(),
        main_offset: session.start_offset_of(&session.data_source),
        essentials_offset: session.start_offset_of(&format!("{}_essential", session.data_source)),
        details: session.details.to_map(),
        utc_offset: Some(session.utc_offset),
        success: true,
        creation_time: session.creation_time,
        termination_time: session.termination_time(),
    }
}

pub(crate) fn starting() -> Status {
    Status::unavailable("the server is starting: the store is still being read; retry shortly")
}

fn unexpected(method: &str, decision: &Decision) -> Failure {
    Failure::Error(Status::internal(format!(
        "{method}: unexpected outcome {decision:?}"
    )))
}

/// The answer to a request that succeeded or failed with a gRPC status, counted in the RPC
/// metrics, a failure logged.
pub(crate) fn answer_status<T>(
    metrics: &Metrics,
    method: &'static str,
    started: Instant,
    result: Result<T, Status>,
) -> Result<Response<T>, Status> {
    match result {
        Ok(response) => {
            metrics.observe_rpc(method, "success", started.elapsed());
            Ok(Response::new(response))
        }
        Err(status) => {
            metrics.observe_rpc(method, status_label(status.code()), started.elapsed());
            warn!(rpc = method, code = ?status.code(), message = status.message(), "request failed");
            Err(status)
        }
    }
}

/// The outcome label of a failed RPC. The first three come only from `pitwall.v1` (the Stream
/// API answers those cases with `success = false`) and match the refusal classes' names.
fn status_label(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "invalid",
        Code::NotFound => "not_found",
        // The feed's history is no longer kept (or the feed is off on this server).
        Code::FailedPrecondition => "compacted",
        Code::Unavailable => "unavailable",
        Code::ResourceExhausted => "resource_exhausted",
        Code::Internal => "internal",
        Code::Cancelled => "cancelled",
        Code::DeadlineExceeded => "deadline_exceeded",
        _ => "error",
    }
}

/// `success = true` in a response: tag and value.
const SUCCESS_FIELD_BYTES: usize = 2;

/// Encoded size of one entry of a repeated string field numbered below 16.
fn repeated_string_bytes(value: &str) -> usize {
    1 + prost::encoding::encoded_len_varint(value.len() as u64) + value.len()
}

/// Longest `pitwall-error` value. Reasons quote client values cut short already; this bounds
/// what escaping makes of them, well within the 8 KiB of metadata every client accepts.
const MAX_REASON_BYTES: usize = 2048;

/// Metadata values must be visible ASCII: anything else is written as a Rust escape.
fn ascii_metadata(text: &str) -> MetadataValue<tonic::metadata::Ascii> {
    let mut ascii = String::with_capacity(text.len());
    for c in text.chars() {
        if (' '..='~').contains(&c) {
            ascii.push(c);
        } else {
            ascii.extend(c.escape_default());
        }
        if ascii.len() > MAX_REASON_BYTES {
            ascii.truncate(MAX_REASON_BYTES - 3);
            ascii.push_str("...");
            break;
        }
    }
    MetadataValue::try_from(ascii).unwrap_or_else(|_| MetadataValue::from_static("refused"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_in_metadata_is_bounded_whatever_it_quotes() {
        let value = ascii_metadata(&"é".repeat(10_000));
        assert_eq!(value.len(), MAX_REASON_BYTES);
        assert!(value.to_str().unwrap().ends_with("..."));
    }

    #[test]
    fn reasons_are_made_ascii_for_metadata() {
        let value = ascii_metadata("data_source 'é\n' contains 'é'");
        assert_eq!(
            value.to_str().unwrap(),
            "data_source '\\u{e9}\\n' contains '\\u{e9}'"
        );
    }
}
