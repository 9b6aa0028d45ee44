//! Status codes as grpc-core answers them, where tonic's own differ.
//!
//! A request over the message size limit fails inside tonic's decoder with `OUT_OF_RANGE`;
//! gRPC's other implementations, and the contract, answer `RESOURCE_EXHAUSTED`. The session
//! service never answers `OUT_OF_RANGE` itself, so every such status is that decoder error.

use http::HeaderValue;
use tonic::Code;

/// Rewrites a trailers-only `OUT_OF_RANGE` answer to `RESOURCE_EXHAUSTED`.
pub fn oversize_as_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let out_of_range = HeaderValue::from(Code::OutOfRange as i32);
    let headers = response.headers_mut();
    if headers.get("grpc-status") == Some(&out_of_range) {
        headers.insert(
            "grpc-status",
            HeaderValue::from(Code::ResourceExhausted as i32),
        );
    }
    response
}

/// Answers a request whose content type is not gRPC's with HTTP 415, as the gRPC protocol asks
/// of servers: otherwise an HTTP client that sent JSON would read the gRPC error, answered with
/// HTTP 200, as a success.
#[derive(Clone, Copy, Default)]
pub struct GrpcContentTypeLayer;

impl<S> tower::Layer<S> for GrpcContentTypeLayer {
    type Service = GrpcContentType<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcContentType { inner }
    }
}

#[derive(Clone)]
pub struct GrpcContentType<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for GrpcContentType<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        futures::future::Either<std::future::Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if is_grpc(request.headers().get(http::header::CONTENT_TYPE)) {
            return futures::future::Either::Right(self.inner.call(request));
        }
        let mut response = http::Response::new(tonic::body::Body::empty());
        *response.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
        response.headers_mut().insert(
            http::header::ACCEPT,
            HeaderValue::from_static("application/grpc"),
        );
        futures::future::Either::Left(std::future::ready(Ok(response)))
    }
}

/// `application/grpc`, alone or with a subtype (`application/grpc+proto`).
fn is_grpc(content_type: Option<&HeaderValue>) -> bool {
    content_type
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value == "application/grpc"
                || value.starts_with("application/grpc+")
                || value.starts_with("application/grpc;")
        })
}
