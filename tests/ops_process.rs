//! The `viewcar` binary as an orchestrator runs it: settings from flags and `VIEWCAR_*`
//! environment variables, readiness, and a clean exit on SIGTERM within the grace period.
//! Waits are on events (log lines, the gRPC health stream), each bounded by a deadline.

mod common;
mod ops_support;

use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use common::{
    addr, channel, log_line, open_watch, origin_config, put, spawn, until_synced, viewcar, within,
    TestOrigin,
};
use ops_support::{get, health_watch, TempDir};
use viewcar::pb::cache::v1 as cache;

/// A config whose addresses are all wrong on purpose: the test points them elsewhere with
/// flags and environment variables.
const CONFIG: &str = r#"
[listen]
grpc = "127.0.0.1:7070"

[shutdown]
grace = "5s"

[[origin]]
name = "catalog-eu"
address = "http://127.0.0.1:1"
topics = ["prices"]
"#;

#[tokio::test]
async fn sidecar_binary_exits_zero_on_sigterm_within_the_grace_period() {
    within(async {
        let o = TestOrigin::start(origin_config()).await;
        o.origin.publish("prices", vec![put("p1", "100")]).unwrap();
        let dir = TempDir::new("sigterm");
        let config = dir.write("viewcar.toml", CONFIG);

        let mut cmd = viewcar();
        cmd.args([
            "--log-format",
            "json",
            "sidecar",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("VIEWCAR_CONFIG", &config)
        .env("VIEWCAR_GRPC_LISTEN", "127.0.0.1:0")
        .env("VIEWCAR_ORIGIN_CATALOG_EU_ADDRESS", o.url());
        let (mut sidecar, mut log) = spawn(cmd);
        let started = log_line(&mut log, "sidecar started").await;
        let (grpc, http) = (addr(&started, "grpc"), addr(&started, "http"));
        assert_ne!(grpc.port(), 7070, "VIEWCAR_GRPC_LISTEN was not applied");

        // Ready: the health stream turns SERVING once the origin named by the environment
        // variable has been synced; /readyz agrees.
        let mut health = HealthClient::new(channel(grpc).await);
        let mut statuses = health_watch(&mut health, "").await;
        loop {
            let s = statuses.message().await.unwrap().expect("health stream");
            if s.status == ServingStatus::Serving as i32 {
                break;
            }
        }
        assert_eq!(get(http, "/readyz").await.status, 200);

        // A Watch stays open across the signal: shutdown ends it instead of waiting for it.
        let mut client = cache::cache_client::CacheClient::new(channel(grpc).await);
        let mut watch = open_watch(&mut client, "prices", &["p1"], true).await;
        until_synced(&mut watch).await;

        let grace = Duration::from_secs(5);
        let start = Instant::now();
        sidecar.signal("-TERM");
        let status = sidecar.wait(grace + Duration::from_secs(2)).await;
        let took = start.elapsed();
        assert_eq!(status.code(), Some(0), "{status:?}");
        assert!(took < grace, "took {took:?}, grace {grace:?}");
        log_line(&mut log, "shut down").await;
        // The Watch ended with the process (its end, or a broken connection).
        while let Ok(Some(_)) = watch.message().await {}
    })
    .await
}

/// A grace period that runs out ends the process with 1, not 0, and says so in the log: a
/// client holding a half-sent request keeps its http connection open past it.
#[tokio::test]
async fn sidecar_binary_exits_one_when_the_grace_period_runs_out() {
    use tokio::io::AsyncWriteExt;
    within(async {
        let o = TestOrigin::start(origin_config()).await;
        let dir = TempDir::new("grace");
        let config = dir.write(
            "viewcar.toml",
            &CONFIG.replace("grace = \"5s\"", "grace = \"300ms\""),
        );
        let mut cmd = viewcar();
        cmd.args([
            "--log-format",
            "json",
            "sidecar",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("VIEWCAR_CONFIG", &config)
        .env("VIEWCAR_GRPC_LISTEN", "127.0.0.1:0")
        .env("VIEWCAR_ORIGIN_CATALOG_EU_ADDRESS", o.url());
        let (mut sidecar, mut log) = spawn(cmd);
        let started = log_line(&mut log, "sidecar started").await;
        let http = addr(&started, "http");
        let mut half = tokio::net::TcpStream::connect(http).await.unwrap();
        half.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        assert_eq!(get(http, "/healthz").await.status, 200);
        sidecar.signal("-TERM");
        let status = sidecar.wait(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(1), "{status:?}");
        log_line(&mut log, "grace period over; dropping what is still open").await;
        drop(half);
    })
    .await
}

#[test]
fn sidecar_help_documents_every_flag() {
    let out = viewcar().args(["sidecar", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--config",
        "VIEWCAR_CONFIG",
        "--grpc-listen",
        "VIEWCAR_GRPC_LISTEN",
        "--http-listen",
        "VIEWCAR_HTTP_LISTEN",
        "--allow-non-loopback",
        "VIEWCAR_ALLOW_NON_LOOPBACK",
        "--origin <NAME=ADDRESS>",
        "VIEWCAR_ORIGIN_<NAME>_ADDRESS",
        "--shutdown-grace",
        "VIEWCAR_SHUTDOWN_GRACE",
        "--ws-token",
        "VIEWCAR_WS_TOKEN",
        "--log-format",
        "RUST_LOG",
        "Exit status",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
    let out = viewcar().args(["origin", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "VIEWCAR_ORIGIN_LISTEN",
        "VIEWCAR_ORIGIN_ALLOW_NON_LOOPBACK",
        "VIEWCAR_PUBLISH_TOKEN",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

/// `viewcar check` applies the same overrides as `viewcar sidecar`: a variable naming no
/// origin, or a non-loopback address without the explicit setting, is a usage error (64).
#[test]
fn overrides_are_checked_like_the_config() {
    let dir = TempDir::new("overrides");
    let config = dir.write("viewcar.toml", CONFIG);
    let check = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = viewcar();
        cmd.arg("check").arg("--config").arg(&config).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, stdout, _) = check(
        &[("VIEWCAR_ORIGIN_CATALOG_EU_ADDRESS", "http://catalog:7000")],
        &["--grpc-listen", "127.0.0.1:9070"],
    );
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("origin catalog-eu (http://catalog:7000)"),
        "{stdout}"
    );
    assert!(stdout.contains("listen.grpc = 127.0.0.1:9070"), "{stdout}");

    let (code, stdout, _) = check(
        &[("VIEWCAR_ORIGIN_CATALOG_EU_ADDRESS", "http://catalog:7000")],
        &["--origin", "catalog-eu=http://flag:7000"],
    );
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("origin catalog-eu (http://flag:7000)"),
        "{stdout}"
    );

    let (code, _, stderr) = check(&[("VIEWCAR_ORIGIN_CATALOG_ADDRESS", "http://x:1")], &[]);
    assert_eq!(code, Some(64));
    assert!(
        stderr.contains("VIEWCAR_ORIGIN_CATALOG_ADDRESS"),
        "{stderr}"
    );
    assert!(
        stderr.contains("VIEWCAR_ORIGIN_CATALOG_EU_ADDRESS"),
        "{stderr}"
    );

    let (code, _, stderr) = check(&[], &["--origin", "nope=http://x:1"]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("nope"), "{stderr}");

    let (code, _, stderr) = check(&[("VIEWCAR_HTTP_LISTEN", "0.0.0.0:7071")], &[]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("allow_non_loopback"), "{stderr}");
    let (code, stdout, stderr) = check(
        &[
            ("VIEWCAR_HTTP_LISTEN", "0.0.0.0:7071"),
            ("VIEWCAR_ALLOW_NON_LOOPBACK", "true"),
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("listen.http = 0.0.0.0:7071"), "{stdout}");
}
