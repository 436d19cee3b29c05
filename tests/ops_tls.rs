//! Feed security: mutual TLS with certificates made at test time (rcgen), and the origin's
//! Publish token. Everything on loopback port 0; waits are on events, bounded by deadlines.

mod common;
mod ops_support;

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

use common::{counter, origin_config, put, wait_position, within, TestOrigin};
use ops_support::TempDir;
use viewcar::pb::feed::v1 as feed;
use viewcar::tls::{ClientTls, ServerTls};
use viewcar::OriginConfig;

/// PEM files of a test PKI: a CA, a server certificate for `localhost`/127.0.0.1 and a client
/// certificate signed by it, and a client certificate signed by another CA.
struct Pki {
    _dir: TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    rogue_cert: PathBuf,
    rogue_key: PathBuf,
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let pem = params.self_signed(&key).unwrap().pem();
    (pem, Issuer::new(params, key))
}

fn leaf(names: &[&str], issuer: &Issuer<'static, KeyPair>) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn generate() -> Pki {
        let dir = TempDir::new("tls");
        let (ca_pem, issuer) = ca("viewcar test CA");
        let (server_cert, server_key) = leaf(&["localhost", "127.0.0.1"], &issuer);
        let (client_cert, client_key) = leaf(&["sidecar.test"], &issuer);
        let (_, rogue_issuer) = ca("someone else's CA");
        let (rogue_cert, rogue_key) = leaf(&["sidecar.test"], &rogue_issuer);
        Pki {
            ca: dir.write("ca.pem", &ca_pem),
            server_cert: dir.write("server.pem", &server_cert),
            server_key: dir.write("server.key", &server_key),
            client_cert: dir.write("client.pem", &client_cert),
            client_key: dir.write("client.key", &client_key),
            rogue_cert: dir.write("rogue.pem", &rogue_cert),
            rogue_key: dir.write("rogue.key", &rogue_key),
            _dir: dir,
        }
    }

    fn origin_config(&self) -> OriginConfig {
        OriginConfig {
            tls: Some(ServerTls {
                cert: self.server_cert.clone(),
                key: self.server_key.clone(),
                client_ca: Some(self.ca.clone()),
            }),
            ..origin_config()
        }
    }
}

/// A Fetch over TLS to `addr`, presenting `identity` (cert, key) when given: the error code
/// of whichever step fails (the handshake, or the first call when TLS 1.3 lets the client
/// finish before the server has checked its certificate).
async fn fetch_over_tls(
    addr: std::net::SocketAddr,
    ca: &PathBuf,
    identity: Option<(&PathBuf, &PathBuf)>,
) -> Result<feed::FetchResponse, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    feed::feed_client::FeedClient::new(channel)
        .fetch(feed::FetchRequest {
            topic: "t".into(),
            keys: vec!["a".into()],
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("fetch: {s:?}"))
}

#[tokio::test]
async fn mtls_accepts_the_right_client_certificate_and_refuses_others() {
    within(async {
        let pki = Pki::generate();
        let o = TestOrigin::start(pki.origin_config()).await;
        o.origin.publish("t", vec![put("a", "1")]).unwrap();

        let ok = fetch_over_tls(o.addr, &pki.ca, Some((&pki.client_cert, &pki.client_key)))
            .await
            .expect("a client certificate signed by client_ca is accepted");
        assert_eq!(ok.entries.len(), 1);
        assert_eq!(&ok.entries[0].value[..], b"1");

        let none = fetch_over_tls(o.addr, &pki.ca, None).await;
        assert!(none.is_err(), "accepted a client without a certificate");
        let rogue = fetch_over_tls(o.addr, &pki.ca, Some((&pki.rogue_cert, &pki.rogue_key))).await;
        assert!(rogue.is_err(), "accepted a certificate from another CA");
        // Plain text to a TLS origin gets nowhere either.
        let mut plain = common::feed_client(o.addr).await;
        assert!(plain
            .fetch(feed::FetchRequest {
                topic: "t".into(),
                keys: vec!["a".into()],
            })
            .await
            .is_err());
        assert_eq!(counter(&o.origin.stats().fetches), 1);

        // A sidecar configured with its client certificate syncs over mTLS and follows changes.
        let mut cfg =
            common::sidecar_config(&format!("https://localhost:{}", o.addr.port()), &["t"]);
        cfg.origins[0].tls = Some(ClientTls {
            ca: pki.ca.clone(),
            cert: Some(pki.client_cert.clone()),
            key: Some(pki.client_key.clone()),
            domain: None,
        });
        let sidecar = common::start_sidecar(cfg).await;
        sidecar.synced().await;
        let t = common::source(&sidecar, "t");
        assert_eq!(t.get("a").map(|e| e.value), Some("1".into()));
        let pos = o.origin.publish("t", vec![put("b", "2")]).unwrap();
        wait_position(&t, &pos.epoch, pos.version).await;
        assert_eq!(t.get("b").map(|e| e.value), Some("2".into()));
        assert!(sidecar.shutdown().await);
    })
    .await
}

/// A sidecar without a client certificate never gets the data from an mTLS origin.
#[tokio::test]
async fn sidecar_without_a_client_certificate_is_refused() {
    within(async {
        let pki = Pki::generate();
        let o = TestOrigin::start(pki.origin_config()).await;
        o.origin.publish("t", vec![put("a", "1")]).unwrap();
        // Through a proxy that counts connections: each refused handshake is one dial.
        let proxy = common::Proxy::start(o.addr).await;
        let mut cfg =
            common::sidecar_config(&format!("https://127.0.0.1:{}", proxy.addr.port()), &["t"]);
        cfg.origins[0].tls = Some(ClientTls {
            ca: pki.ca.clone(),
            cert: None,
            key: None,
            domain: Some("localhost".into()),
        });
        let sidecar = common::start_sidecar(cfg).await;
        let stats = sidecar.feed_stats("o").unwrap().clone();
        common::eventually("three dials", || proxy.accepted() >= 3).await;
        assert!(!common::source(&sidecar, "t").is_synced());
        assert!(!sidecar.readiness().is_ready());
        assert_eq!(counter(&stats.connects), 0, "a feed stream was opened");
        assert_eq!(counter(&stats.messages), 0, "the origin sent data");
        assert_eq!(counter(&o.origin.stats().streams_opened), 0);
        sidecar.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn publish_without_the_token_is_refused_and_nothing_is_applied() {
    within(async {
        let o = TestOrigin::start(OriginConfig {
            publish_token: Some("s3cret-token".into()),
            ..origin_config()
        })
        .await;
        let first = o.origin.publish("t", vec![put("a", "1")]).unwrap();
        let sidecar = common::start_sidecar(common::sidecar_config(&o.url(), &["t"])).await;
        sidecar.synced().await;
        let t = common::source(&sidecar, "t");

        let request = |value: &str| feed::PublishRequest {
            topic: "t".into(),
            changes: vec![
                feed::Change {
                    key: "a".into(),
                    value: value.as_bytes().to_vec().into(),
                    deleted: false,
                },
                feed::Change {
                    key: "intruder".into(),
                    value: b"x".to_vec().into(),
                    deleted: false,
                },
            ],
        };
        let mut client = o.feed_client().await;
        let with = |req: feed::PublishRequest, auth: Option<&str>| {
            let mut r = tonic::Request::new(req);
            if let Some(a) = auth {
                r.metadata_mut().insert("authorization", a.parse().unwrap());
            }
            r
        };
        for auth in [
            None,
            Some("Bearer wrong-token"),
            Some("Bearer s3cret-toke"),
            Some("s3cret-token"),
            Some("Basic s3cret-token"),
        ] {
            let err = client
                .publish(with(request("666"), auth))
                .await
                .expect_err("publish without the right token");
            assert_eq!(err.code(), Code::Unauthenticated, "{auth:?}: {err:?}");
            assert!(err.message().contains("publish_token"), "{}", err.message());
        }
        assert_eq!(counter(&o.origin.stats().unauthenticated), 5);
        assert_eq!(o.origin.version("t"), Some(first.version));
        assert_eq!(
            o.origin.rows("t"),
            vec![("a".to_string(), bytes::Bytes::from_static(b"1"))]
        );

        // The right token is applied, as the very next version: the refused ones took none.
        let ok = client
            .publish(with(request("2"), Some("Bearer s3cret-token")))
            .await
            .expect("publish with the token")
            .into_inner()
            .position
            .unwrap();
        assert_eq!(ok.version, first.version + 1);
        wait_position(&t, &ok.epoch, ok.version).await;
        assert_eq!(t.get("a").map(|e| e.value), Some("2".into()));
        assert_eq!(t.get("intruder").map(|e| e.value), Some("x".into()));
        assert_eq!(t.len(), 2);
        assert!(sidecar.shutdown().await);
    })
    .await
}

/// Certificates are read again at every dial: after the origin's CA, its certificate and the
/// sidecar's client certificate are all replaced on disk (a rotation), the sidecar redials the
/// restarted origin with the new files and follows it, without a restart of its own.
#[tokio::test]
async fn rotated_certificates_are_read_again_on_redial() {
    within(async {
        let pki = Pki::generate();
        let mut o = TestOrigin::start(pki.origin_config()).await;
        o.origin.publish("t", vec![put("a", "1")]).unwrap();
        let mut cfg =
            common::sidecar_config(&format!("https://localhost:{}", o.addr.port()), &["t"]);
        cfg.origins[0].tls = Some(ClientTls {
            ca: pki.ca.clone(),
            cert: Some(pki.client_cert.clone()),
            key: Some(pki.client_key.clone()),
            domain: None,
        });
        let sidecar = common::start_sidecar(cfg).await;
        sidecar.synced().await;

        // A new CA: every file is replaced in place, and the origin restarts with them.
        let (ca_pem, issuer) = ca("viewcar rotated CA");
        let (server_cert, server_key) = leaf(&["localhost", "127.0.0.1"], &issuer);
        let (client_cert, client_key) = leaf(&["sidecar.test"], &issuer);
        for (path, pem) in [
            (&pki.ca, &ca_pem),
            (&pki.server_cert, &server_cert),
            (&pki.server_key, &server_key),
            (&pki.client_cert, &client_cert),
            (&pki.client_key, &client_key),
        ] {
            std::fs::write(path, pem).unwrap();
        }
        let restarted = o.restart(pki.origin_config()).await;
        let pos = restarted.publish("t", vec![put("a", "2")]).unwrap();
        let t = common::source(&sidecar, "t");
        wait_position(&t, &pos.epoch, pos.version).await;
        assert_eq!(t.get("a").map(|e| e.value), Some("2".into()));
        assert!(sidecar.shutdown().await);
    })
    .await
}

/// A relay (`[listen] feed` with `[relay] tls` and `client_ca`) serves its feed over mTLS as an
/// origin does: a leaf with a certificate signed by `client_ca` syncs and follows; no
/// certificate, another CA's, or plain text gets nothing.
#[tokio::test]
async fn a_relay_serves_its_feed_over_mtls_only_to_leaves_with_the_right_certificate() {
    within(async {
        let pki = Pki::generate();
        let o = TestOrigin::start(origin_config()).await;
        o.origin.publish("t", vec![put("a", "1")]).unwrap();
        let mut cfg = common::sidecar_config(&o.url(), &["t"]);
        cfg.listen.feed = Some(common::loopback0());
        cfg.relay.tls = Some(ServerTls {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            client_ca: Some(pki.ca.clone()),
        });
        let relay = common::start_sidecar(cfg).await;
        relay.synced().await;
        let addr = relay.feed_addr().expect("serves feed");

        let ok = fetch_over_tls(addr, &pki.ca, Some((&pki.client_cert, &pki.client_key)))
            .await
            .expect("a leaf certificate signed by client_ca is accepted");
        assert_eq!(&ok.entries[0].value[..], b"1");
        assert!(fetch_over_tls(addr, &pki.ca, None).await.is_err());
        assert!(
            fetch_over_tls(addr, &pki.ca, Some((&pki.rogue_cert, &pki.rogue_key)))
                .await
                .is_err()
        );
        let mut plain = common::feed_client(addr).await;
        assert!(plain
            .fetch(feed::FetchRequest {
                topic: "t".into(),
                keys: vec!["a".into()],
            })
            .await
            .is_err());
        let served = relay.relay().expect("relay").origin().clone();
        assert_eq!(counter(&served.stats().fetches), 1);

        let mut leaf_cfg =
            common::sidecar_config(&format!("https://localhost:{}", addr.port()), &["t"]);
        leaf_cfg.origins[0].tls = Some(ClientTls {
            ca: pki.ca.clone(),
            cert: Some(pki.client_cert.clone()),
            key: Some(pki.client_key.clone()),
            domain: None,
        });
        let leaf = common::start_sidecar(leaf_cfg).await;
        leaf.synced().await;
        let t = common::source(&leaf, "t");
        let pos = o.origin.publish("t", vec![put("b", "2")]).unwrap();
        wait_position(&t, &pos.epoch, pos.version).await;
        assert_eq!(t.get("b").map(|e| e.value), Some("2".into()));
        assert_eq!(counter(&served.stats().streams_opened), 1);
        leaf.shutdown().await;
        relay.shutdown().await;
    })
    .await
}
