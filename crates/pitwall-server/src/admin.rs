//! The admin HTTP port: `/metrics` for Prometheus, `/healthz` (the process is up) and
//! `/readyz` (the store is open and replayed and the server is not shutting down).

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
pub async fn serve<L>(
    listener: L,
    metrics: Metrics,
    readiness: Readiness,
    access: Access,
    shutdown: Shutdown,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_page))
        .with_state(AdminState { metrics, readiness })
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

/// Checks the request's bearer token against the path's rule.
async fn authorize(State(access): State<Access>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    match access.check(
        http_rule(&path),
        request.headers().get(header::AUTHORIZATION),
    ) {
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
