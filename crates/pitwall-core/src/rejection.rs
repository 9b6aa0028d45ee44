//! Why a request was refused. Each variant is an expected failure that the contract answers with
//! `success = false` and a reason; the message is what the client reads.

use thiserror::Error;

/// A request refused because of its content or the state it refers to. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Rejection {
    #[error("session '{0}' not found")]
    UnknownSession(String),
    #[error("{0}")]
    Invalid(String),
    #[error("session management is disabled on this server (IntegrateSessionManagement = false)")]
    Disabled,
}

impl Rejection {
    /// A short, fixed label for metrics and logs: `not_found`, `invalid` or `disabled`.
    pub fn class(&self) -> &'static str {
        match self {
            Rejection::UnknownSession(_) => "not_found",
            Rejection::Invalid(_) => "invalid",
            Rejection::Disabled => "disabled",
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Rejection::Invalid(message.into())
    }
}
