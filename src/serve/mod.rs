//! The sidecar's listeners: the localhost Cache gRPC API.

pub(crate) mod grpc;
