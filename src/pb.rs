//! Generated protobuf and gRPC code (see `proto/`). The protos are the interface: services in
//! any language generate their clients from the same files.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod feed {
    pub mod v1 {
        tonic::include_proto!("viewcar.feed.v1");
    }
}

pub mod cache {
    pub mod v1 {
        tonic::include_proto!("viewcar.cache.v1");
    }
}
