//! Read connections (`ConnectionManagerService`): a stored read plan, its details as the client
//! sent them, and a cancel signal that ends every read running on it when it is closed.
//!
//! Connections live in memory, as in the reference (ids are invalid after a restart), and are
//! capped: a client that opens them without closing them is told so instead of growing the
//! server's memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use pitwall_core::{Limits, Rejection};
use pitwall_proto::api::connection_manager_service_server::ConnectionManagerService;
use pitwall_proto::api::{
    CloseConnectionRequest, CloseConnectionResponse, Connection, ConnectionDetails,
    GetConnectionRequest, GetConnectionResponse, NewConnectionRequest, NewConnectionResponse,
};
use pitwall_proto::feed::read_connections_server::ReadConnections;
use pitwall_proto::feed::{ListConnectionsRequest, ListConnectionsResponse, ReadConnection};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::service::answer_status;

/// Why a connection was not opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error(transparent)]
    Invalid(#[from] Rejection),
    #[error(
        "{open} read connections are open, the most this server keeps (--max-read-connections); close some with CloseConnection"
    )]
    TooMany { open: usize },
}

pub struct Connections {
    /// A `std` mutex: held for a map lookup or change, never across an await.
    open: Mutex<HashMap<i64, Open>>,
    max: usize,
    metrics: Metrics,
}

/// An open connection.
#[derive(Clone)]
pub struct Open {
    pub details: ConnectionDetails,
    /// Fires when the connection is closed: its reads end.
    pub closed: CancellationToken,
}

impl Connections {
    pub fn new(max: usize, metrics: Metrics) -> Connections {
        Connections {
            open: Mutex::new(HashMap::new()),
            max: max.max(1),
            metrics,
        }
    }

    /// Checks the details and opens a connection with a random non-zero id.
    pub fn open(
        &self,
        details: ConnectionDetails,
        limits: &Limits,
    ) -> Result<i64, ConnectionError> {
        limits.check_connection(&details)?;
        let mut open = self.lock();
        if open.len() >= self.max {
            return Err(ConnectionError::TooMany { open: open.len() });
        }
        let id = loop {
            // Random and non-zero: ids are opaque to clients, and 0 is "no connection".
            let id = uuid::Uuid::new_v4().as_u64_pair().0 as i64;
            if id != 0 && !open.contains_key(&id) {
                break id;
            }
        };
        self.metrics
            .connections
            .with_label_values(&[details.data_source.as_str()])
            .inc();
        open.insert(
            id,
            Open {
                details,
                closed: CancellationToken::new(),
            },
        );
        Ok(id)
    }

    pub fn get(&self, id: i64) -> Option<Open> {
        self.lock().get(&id).cloned()
    }

    /// Closes a connection and ends its reads; false if it was not open.
    pub fn close(&self, id: i64) -> bool {
        let Some(open) = self.lock().remove(&id) else {
            return false;
        };
        open.closed.cancel();
        self.metrics
            .connections
            .with_label_values(&[open.details.data_source.as_str()])
            .dec();
        true
    }

    /// Every open connection, for `pitwall connections list`.
    pub fn list(&self) -> Vec<(i64, ConnectionDetails)> {
        let mut all: Vec<(i64, ConnectionDetails)> = self
            .lock()
            .iter()
            .map(|(id, open)| (*id, open.details.clone()))
            .collect();
        all.sort_by_key(|(id, _)| *id);
        all
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Open>> {
        // Every change under the lock is one insert or remove: a poisoned map is consistent.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `ConnectionManagerService` over the registry.
pub struct ConnectionService {
    plane: super::DataPlane,
}

impl ConnectionService {
    pub fn new(plane: super::DataPlane) -> ConnectionService {
        ConnectionService { plane }
    }
}

fn connection_id(connection: Option<Connection>) -> Result<i64, Status> {
    connection
        .map(|c| c.id)
        .ok_or_else(|| Status::invalid_argument("connection is missing"))
}

#[tonic::async_trait]
impl ConnectionManagerService for ConnectionService {
    async fn new_connection(
        &self,
        request: Request<NewConnectionRequest>,
    ) -> Result<Response<NewConnectionResponse>, Status> {
        let started = Instant::now();
        let result = (|| {
            let details = request
                .into_inner()
                .details
                .ok_or_else(|| Status::invalid_argument("details is missing"))?;
            let id = self
                .plane
                .connections
                .open(details, &self.plane.limits)
                .map_err(|e| match e {
                    ConnectionError::Invalid(rejection) => super::invalid(rejection),
                    e @ ConnectionError::TooMany { .. } => {
                        Status::resource_exhausted(e.to_string())
                    }
                })?;
            Ok(NewConnectionResponse {
                connection: Some(Connection { id }),
            })
        })();
        answer_status(&self.plane.metrics, "NewConnection", started, result)
    }

    async fn get_connection(
        &self,
        request: Request<GetConnectionRequest>,
    ) -> Result<Response<GetConnectionResponse>, Status> {
        let started = Instant::now();
        let result = connection_id(request.into_inner().connection).map(|id| {
            // An unknown id answers no details, as the reference does (its clients test it).
            GetConnectionResponse {
                details: self.plane.connections.get(id).map(|open| open.details),
            }
        });
        answer_status(&self.plane.metrics, "GetConnection", started, result)
    }

    async fn close_connection(
        &self,
        request: Request<CloseConnectionRequest>,
    ) -> Result<Response<CloseConnectionResponse>, Status> {
        let started = Instant::now();
        let result =
            connection_id(request.into_inner().connection).map(|id| CloseConnectionResponse {
                success: self.plane.connections.close(id),
            });
        answer_status(&self.plane.metrics, "CloseConnection", started, result)
    }
}

/// `pitwall.v1.ReadConnections`: the open connections, for `pitwall connections list`.
pub struct ReadConnectionsService {
    plane: super::DataPlane,
}

impl ReadConnectionsService {
    pub fn new(plane: super::DataPlane) -> ReadConnectionsService {
        ReadConnectionsService { plane }
    }
}

#[tonic::async_trait]
impl ReadConnections for ReadConnectionsService {
    async fn list_connections(
        &self,
        _request: Request<ListConnectionsRequest>,
    ) -> Result<Response<ListConnectionsResponse>, Status> {
        let started = Instant::now();
        let connections = self
            .plane
            .connections
            .list()
            .into_iter()
            .map(|(id, details)| ReadConnection {
                id,
                data_source: details.data_source,
                session_key: details.session_key,
                streams: details.streams,
                stream_offsets: details.stream_offsets,
                main_offset: details.main_offset,
                essentials_offset: details.essentials_offset,
                exclude_main_stream: details.exclude_main_stream,
            })
            .collect();
        answer_status(
            &self.plane.metrics,
            "ListConnections",
            started,
            Ok(ListConnectionsResponse { connections }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn details(data_source: &str) -> ConnectionDetails {
        ConnectionDetails {
            data_source: data_source.into(),
            ..Default::default()
        }
    }

    #[test]
    fn identical_details_get_different_ids_and_the_gauge_follows() {
        let metrics = Metrics::new();
        let connections = Connections::new(10, metrics.clone());
        let limits = Limits::default();
        let a = connections.open(details("ds"), &limits).unwrap();
        let b = connections.open(details("ds"), &limits).unwrap();
        assert_ne!(a, b);
        assert!(a != 0 && b != 0);
        let gauge = || metrics.connections.with_label_values(&["ds"]).get();
        assert_eq!(gauge(), 2);
        assert_eq!(connections.get(a).unwrap().details, details("ds"));
        assert!(connections.get(0).is_none());
        assert!(!connections.close(0));
        assert_eq!(gauge(), 2);
        let closed = connections.get(a).unwrap().closed;
        assert!(connections.close(a));
        assert!(closed.is_cancelled());
        assert!(connections.get(a).is_none());
        assert_eq!(gauge(), 1);
    }

    #[test]
    fn offsets_must_match_the_streams_and_the_cap_holds() {
        let connections = Connections::new(1, Metrics::new());
        let limits = Limits::default();
        let mismatched = ConnectionDetails {
            streams: vec!["a".into(), "b".into()],
            stream_offsets: vec![0],
            ..details("ds")
        };
        assert!(matches!(
            connections.open(mismatched, &limits),
            Err(ConnectionError::Invalid(_))
        ));
        connections.open(details("ds"), &limits).unwrap();
        assert!(matches!(
            connections.open(details("ds"), &limits),
            Err(ConnectionError::TooMany { open: 1 })
        ));
    }
}
