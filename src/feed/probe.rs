//! `viewcar check --probe`: dials each origin address of a sidecar config as the feed client
//! would (same timeouts, same TLS) and asks it for one key of each topic (`Fetch`), so that a
//! mistyped topic, an address where nothing listens, a port that serves something else or a
//! TLS mismatch is reported before the sidecar runs, with the same causes the feed logs.

use std::time::Duration;

use tonic::transport::Endpoint;

use super::{cause, FeedError};
use crate::config::SidecarConfig;
use crate::pb::feed::v1 as pb;

/// A key no topic is expected to hold: the probe asks whether the topic exists, not for data.
const PROBE_KEY: &str = "viewcar-check-probe";

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub origin: String,
    pub address: String,
    /// `None` for the address itself (it could not be reached).
    pub topic: Option<String>,
    /// `None` = fine.
    pub problem: Option<String>,
}

impl Finding {
    pub fn is_ok(&self) -> bool {
        self.problem.is_none()
    }
}

/// Probes every address of every origin of `cfg`; each call is bounded by the feed's
/// `connect_timeout`.
pub async fn probe(cfg: &SidecarConfig) -> Vec<Finding> {
    let mut out = Vec::new();
    for o in &cfg.origins {
        for address in std::iter::once(&o.address).chain(&o.fallback) {
            let finding = |topic: Option<&str>, problem: Option<String>| Finding {
                origin: o.name.clone(),
                address: crate::types::redact_address(address),
                topic: topic.map(str::to_string),
                problem,
            };
            let mut client = match dial(cfg, address, o.tls.as_ref()).await {
                Ok(c) => c,
                Err(e) => {
                    out.push(finding(None, Some(cause(&e))));
                    continue;
                }
            };
            let limit = cfg.feed.connect_timeout.0.max(Duration::from_millis(100));
            for t in &o.topics {
                let asked = client.fetch(pb::FetchRequest {
                    topic: t.name.clone(),
                    keys: vec![PROBE_KEY.to_string()],
                });
                let problem = match tokio::time::timeout(limit, asked).await {
                    Ok(Ok(_)) => None,
                    Ok(Err(status)) => Some(cause(&FeedError::Status(status))),
                    Err(_) => Some(format!("timed out: no answer to Fetch within {limit:?}")),
                };
                out.push(finding(Some(&t.name), problem));
            }
        }
    }
    out
}

async fn dial(
    cfg: &SidecarConfig,
    address: &str,
    tls: Option<&crate::tls::ClientTls>,
) -> Result<pb::feed_client::FeedClient<tonic::transport::Channel>, FeedError> {
    let endpoint = Endpoint::from_shared(address.to_string())
        .map_err(|e| FeedError::Address(e.to_string()))?
        .connect_timeout(cfg.feed.connect_timeout.0)
        .tcp_nodelay(true);
    let endpoint = match tls {
        Some(tls) => endpoint.tls_config(tls.load()?)?,
        None => endpoint,
    };
    Ok(pb::feed_client::FeedClient::new(endpoint.connect().await?))
}
