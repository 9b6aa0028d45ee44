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
