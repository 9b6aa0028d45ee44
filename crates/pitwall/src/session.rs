//! `pitwall session …`: the client commands, over gRPC to a running server. The Stream API's
//! `SessionManagementService` serves most of them; [`feed`] holds the ones on Pitwall's own
//! `pitwall.v1.SessionFeed` (`list`, `tree`, and `watch --all`/`--from`).

mod feed;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use pitwall_proto::api::session_management_service_client::SessionManagementServiceClient;
use pitwall_proto::api::*;
use pitwall_proto::feed::session_feed_client::SessionFeedClient;
use pitwall_proto::feed::{DetailEquals, SessionFilter, SessionState, TimeRange};
use serde_json::{Value, json};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Response, Status};

use crate::cli::{Output, SessionArgs, SessionCommand};
use crate::client::{self, Bearer, ClientError};
use crate::output;
use crate::values::{format_time, format_utc_offset};

type Client = SessionManagementServiceClient<InterceptedService<Channel, Bearer>>;
type FeedClient = SessionFeedClient<InterceptedService<Channel, Bearer>>;

struct Session {
    client: Client,
    feed: FeedClient,
    url: String,
    output: Output,
}

pub async fn run(args: SessionArgs) -> Result<(), ClientError> {
    let (channel, bearer) = client::connect(&args.client).await?;
    let session = Session {
        client: SessionManagementServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        feed: SessionFeedClient::with_interceptor(channel, bearer),
        url: args.client.server,
        output: args.client.output,
    };
    match args.command {
        SessionCommand::Create {
            data_source,
            session_type,
            version,
            identifier,
            utc_offset,
            details,
            associates,
        } => {
            let request = CreateSessionRequest {
                data_source,
                r#type: session_type.unwrap_or_default(),
                version: version.unwrap_or_default(),
                utc_offset,
                identifier: identifier.unwrap_or_default(),
                associate_session_key: associates,
                details: details.into_iter().collect(),
                creation_time: None,
            };
            session.create(request).await
        }
        SessionCommand::List {
            data_sources,
            identifier,
            details,
            created_after,
            created_before,
            ended_after,
            ended_before,
            live,
            complete,
        } => {
            let range = |from, to| match (from, to) {
                (None, None) => None,
                (from, to) => Some(TimeRange { from, to }),
            };
            let state = if live {
                SessionState::Live
            } else if complete {
                SessionState::Complete
            } else {
                SessionState::All
            };
            let filter = SessionFilter {
                data_sources,
                state: state.into(),
                identifier_glob: identifier.unwrap_or_default(),
                details: details
                    .into_iter()
                    .map(|(key, value)| DetailEquals { key, value })
                    .collect(),
                created: range(created_after, created_before),
                ended: range(ended_after, ended_before),
            };
            session.list(filter).await
        }
        SessionCommand::Tree { session_key, depth } => {
            session.tree(&session_key, depth.unwrap_or(0)).await
        }
        SessionCommand::Get { session_key } => session.get(&session_key).await,
        SessionCommand::Update {
            session_key,
            identifier,
            details,
        } => session.update(&session_key, identifier, details).await,
        SessionCommand::Associate {
            session_key,
            associate_session_key,
        } => {
            session
                .associate(&session_key, &associate_session_key)
                .await
        }
        SessionCommand::End { session_key, at } => session.end(&session_key, at).await,
        SessionCommand::Watch {
            data_source,
            all,
            from,
            reconnect_seconds,
        } => match data_source {
            Some(data_source) if !all && from.is_none() => session.watch(&data_source).await,
            data_source => {
                let reconnect_for = Duration::from_secs(reconnect_seconds);
                session
                    .watch_feed(data_source, from.unwrap_or(0), reconnect_for)
                    .await
            }
        },
    }
}

impl Session {
    async fn create(&self, request: CreateSessionRequest) -> Result<(), ClientError> {
        let response = self.check(self.client.clone().create_session(request).await)?;
        match self.output {
            Output::Table => output::text(&response.session_key),
            Output::Json => {
                let packet = response.new_session.unwrap_or_default();
                output::json(&json!({
                    "session_key": response.session_key,
                    "data_source": packet.data_source,
                    "creation_time": packet.creation_time.as_ref().map(format_time),
                    "topic_partition_offsets": packet.topic_partition_offsets,
                }));
            }
        }
        Ok(())
    }

    async fn get(&self, session_key: &str) -> Result<(), ClientError> {
        let info = self.check(
            self.client
                .clone()
                .get_session_info(GetSessionInfoRequest {
                    session_key: session_key.to_owned(),
                })
                .await,
        )?;
        match self.output {
            Output::Json => output::json(&info_json(session_key, &info)),
            Output::Table => {
                let list = |items: &[String]| {
                    if items.is_empty() {
                        "-".to_owned()
                    } else {
                        items.join(", ")
                    }
                };
                let offsets: Vec<String> = info
                    .topic_partition_offsets
                    .iter()
                    .map(|(topic, offset)| format!("{topic}={offset}"))
                    .collect();
                let mut pairs = vec![
                    ("session_key", session_key.to_owned()),
                    ("data_source", info.data_source.clone()),
                    ("identifier", info.identifier.clone()),
                    ("type", info.r#type.clone()),
                    ("version", info.version.to_string()),
                    ("complete", info.is_complete.to_string()),
                    (
                        "created",
                        info.creation_time
                            .as_ref()
                            .map(format_time)
                            .unwrap_or_default(),
                    ),
                    (
                        "ended",
                        info.termination_time
                            .as_ref()
                            .map(format_time)
                            .unwrap_or_else(|| "-".into()),
                    ),
                    (
                        "utc_offset",
                        format_utc_offset(&info.utc_offset.unwrap_or_default()),
                    ),
                    ("offsets", list(&offsets)),
                    ("main_offset", info.main_offset.to_string()),
                    ("essentials_offset", info.essentials_offset.to_string()),
                    ("streams", list(&info.streams)),
                    ("associates", list(&info.associate_session_keys)),
                    ("details", info.details.len().to_string()),
                ];
                let details: Vec<(String, String)> = info
                    .details
                    .iter()
                    .map(|(k, v)| (format!("  {k}"), v.clone()))
                    .collect();
                pairs.extend(details.iter().map(|(k, v)| (k.as_str(), v.clone())));
                output::fields(&pairs);
            }
        }
        Ok(())
    }

    async fn update(
        &self,
        session_key: &str,
        identifier: Option<String>,
        details: Vec<(String, String)>,
    ) -> Result<(), ClientError> {
        if let Some(identifier) = &identifier {
            self.check(
                self.client
                    .clone()
                    .update_session_identifier(UpdateSessionIdentifierRequest {
                        session_key: session_key.to_owned(),
                        identifier: identifier.clone(),
                    })
                    .await,
            )?;
        }
        let details: BTreeMap<String, String> = details.into_iter().collect();
        if !details.is_empty() || identifier.is_none() {
            self.check(
                self.client
                    .clone()
                    .update_session_details(UpdateSessionDetailsRequest {
                        session_key: session_key.to_owned(),
                        details: details.clone(),
                    })
                    .await,
            )?;
        }
        match self.output {
            Output::Table => output::text(&format!("updated {session_key}")),
            Output::Json => output::json(&json!({
                "session_key": session_key,
                "identifier": identifier,
                "details": details,
            })),
        }
        Ok(())
    }

    async fn associate(&self, session_key: &str, associate: &str) -> Result<(), ClientError> {
        self.check(
            self.client
                .clone()
                .add_associate_session(AddAssociateSessionRequest {
                    session_key: session_key.to_owned(),
                    associate_session_key: associate.to_owned(),
                })
                .await,
        )?;
        match self.output {
            Output::Table => output::text(&format!("associated {associate} with {session_key}")),
            Output::Json => output::json(&json!({
                "session_key": session_key,
                "associate_session_key": associate,
            })),
        }
        Ok(())
    }

    async fn end(
        &self,
        session_key: &str,
        termination_time: Option<prost_types::Timestamp>,
    ) -> Result<(), ClientError> {
        let response = self.check(
            self.client
                .clone()
                .end_session(EndSessionRequest {
                    data_source: String::new(),
                    session_key: session_key.to_owned(),
                    termination_time,
                })
                .await,
        )?;
        let packet = response.end_session.unwrap_or_default();
        let ended = packet.termination_time.as_ref().map(format_time);
        match self.output {
            Output::Table => output::text(&format!(
                "ended {session_key} at {}",
                ended.as_deref().unwrap_or("?")
            )),
            Output::Json => output::json(&json!({
                "session_key": session_key,
                "data_source": packet.data_source,
                "termination_time": ended,
                "topic_partition_offsets": packet.topic_partition_offsets,
            })),
        }
        Ok(())
    }

    async fn watch(&self, data_source: &str) -> Result<(), ClientError> {
        let starts = self
            .client
            .clone()
            .get_session_start_notification(GetSessionStartNotificationRequest {
                data_source: data_source.to_owned(),
            })
            .await
            .map_err(|status| self.failure(status))?
            .into_inner()
            .map_ok(|n| ("started", n.session_key, n.data_source));
        let stops = self
            .client
            .clone()
            .get_session_stop_notification(GetSessionStopNotificationRequest {
                data_source: data_source.to_owned(),
            })
            .await
            .map_err(|status| self.failure(status))?
            .into_inner()
            .map_ok(|n| ("stopped", n.session_key, n.data_source));
        // Both subscriptions are registered: nothing from here on is missed.
        eprintln!(
            "watching data source '{data_source}' for sessions starting and stopping; Ctrl-C to stop"
        );
        let mut events = futures::stream::select(starts, stops);
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            };
            match event {
                None => return Ok(()),
                Some(Err(status)) => return Err(self.failure(status)),
                Some(Ok((kind, session_key, data_source))) => match self.output {
                    Output::Table => {
                        output::text(&format!("{kind:<8} {session_key}  {data_source}"))
                    }
                    Output::Json => output::json(&json!({
                        "event": kind,
                        "session_key": session_key,
                        "data_source": data_source,
                    })),
                },
            }
        }
    }

    /// The body of a successful answer; the `pitwall-error` reason of a refused one.
    fn check<T>(&self, answer: Result<Response<T>, Status>) -> Result<T, ClientError>
    where
        T: Succeeded,
    {
        let response = answer.map_err(|status| self.failure(status))?;
        let reason = response
            .metadata()
            .get("pitwall-error")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.into_inner();
        if body.succeeded() {
            return Ok(body);
        }
        Err(ClientError::Refused(reason.unwrap_or_else(|| {
            "the server refused the request (no reason given)".into()
        })))
    }

    fn failure(&self, status: Status) -> ClientError {
        client::failure(&self.url, status)
    }
}

fn info_json(session_key: &str, info: &GetSessionInfoResponse) -> Value {
    json!({
        "session_key": session_key,
        "data_source": info.data_source,
        "identifier": info.identifier,
        "type": info.r#type,
        "version": info.version,
        "is_complete": info.is_complete,
        "creation_time": info.creation_time.as_ref().map(format_time),
        "termination_time": info.termination_time.as_ref().map(format_time),
        "utc_offset": format_utc_offset(&info.utc_offset.unwrap_or_default()),
        "associate_session_keys": info.associate_session_keys,
        "details": info.details,
        "topic_partition_offsets": info.topic_partition_offsets,
        "main_offset": info.main_offset,
        "essentials_offset": info.essentials_offset,
        "streams": info.streams,
    })
}

/// Responses that carry a `success` flag.
trait Succeeded {
    fn succeeded(&self) -> bool;
}

macro_rules! succeeded {
    ($($t:ty),*) => {$(
        impl Succeeded for $t {
            fn succeeded(&self) -> bool {
                self.success
            }
        }
    )*};
}
succeeded!(
    CreateSessionResponse,
    EndSessionResponse,
    GetSessionInfoResponse,
    UpdateSessionIdentifierResponse,
    AddAssociateSessionResponse,
    UpdateSessionDetailsResponse
);
