//! The admin HTTP port: `/metrics` for Prometheus, `/healthz` (the process is up), `/readyz`
//! (the store is open and replayed and the server is not shutting down), and the live session
//! board ([`crate::board`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tracing::warn;

use crate::auth::{Access, Denied, http_rule};
use crate::board::{self, Board};
use crate::metrics::{CONTENT_TYPE, Metrics};
use crate::shutdown::Shutdown;

/// Whether the server is ready to serve: set once startup is complete, cleared when shutdown
/// begins.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    readiness: Readiness,
}

/// Serves the admin endpoints on `listener` (plain TCP or TLS) until shutdown.
/// Board event streams end by themselves once the feed closes at shutdown, so graceful
/// shutdown can wait for them like for any other response.
pub async fn serve<L>(
    listener: L,
    metrics: Metrics,
    readiness: Readiness,
    board: Board,
    shutdown: Shutdown,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let access = board.access.clone();
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_page))
        .with_state(AdminState { metrics, readiness })
        .merge(board::routes(board))
        .layer(axum::middleware::from_fn_with_state(access, authorize));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}

async fn metrics_page(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        state.metrics.render(),
    )
}

async fn ready_page(State(state): State<AdminState>) -> impl IntoResponse {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Checks the request's bearer token (or, where the board reads, the board's cookie) against
/// the path's rule.
async fn authorize(State(access): State<Access>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let rule = http_rule(&path);
    let headers = request.headers();
    let checked = match headers.get(header::AUTHORIZATION) {
        None if board::takes_cookie(&path) => {
            access.check_token(rule, board::cookie_token(headers).as_deref())
        }
        authorization => access.check(rule, authorization),
    };
    match checked {
        Ok(()) => next.run(request).await,
        Err(denied) => {
            warn!(path, reason = denied.message(), "admin request denied");
            let status = match denied {
                Denied::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
                Denied::PermissionDenied(_) => StatusCode::FORBIDDEN,
            };
            (status, format!("{}\n", denied.message())).into_response()
        }
    }
}
