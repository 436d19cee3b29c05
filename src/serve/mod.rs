//! The sidecar's listeners: the localhost Cache gRPC API and the http listener (WebSocket `/ws`).

pub(crate) mod grpc;
pub mod ws;
