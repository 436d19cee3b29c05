//! The sidecar's listeners: the localhost Cache gRPC API (with health and reflection) and the
//! http listener (WebSocket `/ws` and the admin endpoints), over one read path (`read`), and
//! the Feed API of a relay (`feed`).

pub(crate) mod admin;
pub mod feed;
pub(crate) mod grpc;
pub(crate) mod http;
pub(crate) mod metrics;
pub(crate) mod read;
pub(crate) mod redis;
pub mod ws;
