//! Compiles the repository's `.proto` files with a pure-Rust compiler, so building needs no
//! system `protoc`.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "ma/streaming/open_data/v1/open_data.proto",
    "ma/streaming/api/v1/api.proto",
    "ma/streaming/key_generator/v1/key_generator.proto",
    "pitwall/v1/feed.proto",
    "pitwall/v1/connections.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let descriptors = protox::compile(PROTOS, [&root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // Kept for gRPC server reflection.
    std::fs::write(
        out_dir.join("pitwall_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    // Ordered maps make sessions compare and encode deterministically.
    tonic_prost_build::configure()
        .btree_map(".")
        // Hand-written (src/watch_response.rs) so a server can send pre-encoded events.
        .extern_path(
            ".pitwall.v1.WatchResponse",
            "crate::watch_response::WatchResponse",
        )
        // Hand-written (src/raw_packet.rs) so a client's packet is stored and served as the
        // bytes it sent.
        .extern_path(
            ".ma.streaming.api.v1.DataPacketDetails",
            "crate::raw_packet::DataPacketDetails",
        )
        .extern_path(
            ".ma.streaming.api.v1.PacketResponse",
            "crate::raw_packet::PacketResponse",
        )
        .compile_fds(descriptors)?;
    Ok(())
}
