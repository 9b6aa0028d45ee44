//! Compiles the etcd API subset in `proto/etcd` with a pure-Rust compiler (as `pitwall-proto`
//! does), so the peer benchmark needs no system `protoc`. Only a client is generated.

use std::path::PathBuf;

const PROTOS: &[&str] = &["etcdserverpb.proto", "mvccpb.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("proto/etcd");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let descriptors = protox::compile(PROTOS, [&root])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(descriptors)?;
    Ok(())
}
