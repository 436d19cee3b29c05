//! A new user's first mistakes, through the `viewcar` binary: each one is visible (a log line,
//! `/readyz`, `/status`, an exit code) and none takes anything else down with it.

mod common;
mod ops_support;

use std::time::Duration;

use common::{addr, log_line, origin_config, put, spawn, viewcar, within, TestOrigin};
use ops_support::{get, TempDir};

/// A mistyped topic (`order` for `orders`) fails that topic only: the origin's other topics
/// sync and serve, `/readyz` names it with the origin's reason, and it is retried with the
/// feed's backoff, never in a hot loop and never by redialling the stream.
#[tokio::test]
async fn a_refused_topic_fails_alone_and_is_retried_with_backoff() {
    within(async {
        let o = TestOrigin::start(viewcar::OriginConfig {
            topics: vec!["orders".into(), "users".into(), "shops".into()],
            ..origin_config()
        })
        .await;
        o.origin
            .publish("users", vec![put("u1", r#"{"name":"Ann"}"#)])
            .unwrap();
        o.origin
            .publish("shops", vec![put("s1", r#"{"name":"Corner"}"#)])
            .unwrap();
        let dir = TempDir::new("refused-topic");
        let config = dir.write(
            "viewcar.toml",
            &format!(
                r#"
[listen]
grpc = "127.0.0.1:0"
http = "127.0.0.1:0"

[[origin]]
name = "shop"
address = "{}"
topics = ["order", "users", "shops"]
"#,
                o.url()
            ),
        );
        let mut cmd = viewcar();
        cmd.args(["--log-format", "json", "sidecar", "--config"])
            .arg(&config);
        let (_sidecar, mut log) = spawn(cmd);
        let started = log_line(&mut log, "sidecar started").await;
        let http = addr(&started, "http");
        let t0 = tokio::time::Instant::now();

        // The healthy topics sync within the normal time.
        loop {
            let status: serde_json::Value =
                serde_json::from_str(&get(http, "/status").await.body).unwrap();
            let synced = |name: &str| {
                status["sources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["name"] == name && s["synced"] == true)
            };
            if synced("users") && synced("shops") {
                assert_eq!(status["failed"][0]["source"], "order", "{status}");
                let error = status["failed"][0]["error"].as_str().unwrap();
                assert!(error.contains("no topic named 'order'"), "{error}");
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(3),
                "not synced: {status}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ready = get(http, "/readyz").await;
        assert_eq!(ready.status, 503);
        assert!(
            ready
                .body
                .contains("order (origin refused the topic: no topic named 'order')"),
            "{}",
            ready.body
        );

        // Five seconds of refusals: the backoff (100 ms doubling, full jitter) allows about
        // seven; a hot loop would make hundreds. The stream itself is never redialled.
        let mut refusals = 0;
        let mut connects = 0;
        let window = tokio::time::sleep_until(t0 + Duration::from_secs(5));
        tokio::pin!(window);
        loop {
            tokio::select! {
                _ = &mut window => break,
                line = log.recv() => {
                    let Some(line) = line else { break };
                    if line.contains("origin refused the topic") {
                        refusals += 1;
                    }
                    if line.contains("\"feed connected\"") {
                        connects += 1;
                    }
                }
            }
        }
        assert!(refusals <= 15, "{refusals} refusals in 5 s");
        assert!(refusals >= 2, "the refused topic is retried: {refusals}");
        assert!(connects <= 1, "the stream was redialled: {connects}");
        let status: serde_json::Value =
            serde_json::from_str(&get(http, "/status").await.body).unwrap();
        assert_eq!(status["origins"][0]["connects"], 1, "{status}");
        assert_eq!(status["origins"][0]["disconnects"], 0, "{status}");
    })
    .await
}

/// Every failed connection says why, in the log and in `/status` (last error and when, per
/// origin): a port where nothing listens is "connection refused", and a gRPC server that does
/// not serve Feed (a sidecar's Cache port, say) is "wrong protocol".
#[tokio::test]
async fn failed_connections_name_their_cause() {
    within(async {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        // A gRPC server with no Feed service.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let other = listener.local_addr().unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let dir = TempDir::new("connection-causes");
        let config = dir.write(
            "viewcar.toml",
            &format!(
                r#"
[listen]
grpc = "127.0.0.1:0"
http = "127.0.0.1:0"

[[origin]]
name = "nobody"
address = "http://127.0.0.1:{closed_port}"
topics = ["a"]

[[origin]]
name = "notfeed"
address = "http://{other}"
topics = ["b"]
"#
            ),
        );
        let mut cmd = viewcar();
        cmd.args(["--log-format", "json", "sidecar", "--config"])
            .arg(&config);
        let (_sidecar, mut log) = spawn(cmd);
        let started = log_line(&mut log, "sidecar started").await;
        let http = addr(&started, "http");
        let t0 = tokio::time::Instant::now();
        loop {
            let status: serde_json::Value =
                serde_json::from_str(&get(http, "/status").await.body).unwrap();
            let err = |i: usize| {
                status["origins"][i]["last_error"]
                    .as_str()
                    .map(str::to_string)
            };
            if let (Some(refused), Some(wrong)) = (err(0), err(1)) {
                assert!(refused.contains("connection refused"), "{refused}");
                assert!(wrong.contains("wrong protocol"), "{wrong}");
                assert!(wrong.contains("Feed"), "{wrong}");
                assert!(status["origins"][0]["last_error_at_ms"].as_u64().unwrap() > 0);
                // Per topic too.
                let topic_err = status["sources"][0]["last_error"].as_str().unwrap_or("");
                assert!(topic_err.contains("connection refused"), "{status}");
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no causes: {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let line = log_line(&mut log, "feed disconnected").await;
        assert!(line["fields"]["cause"].as_str().is_some(), "{line}");
        // `viewcar sources` says it too, with the connected column.
        let grpc = addr(&started, "grpc").to_string();
        let out = tokio::task::spawn_blocking(move || {
            viewcar()
                .args(["sources", "--addr", &grpc])
                .output()
                .expect("run sources")
        })
        .await
        .expect("join");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{out:?}");
        assert!(
            text.lines().next().unwrap_or("").contains("last_error"),
            "{text}"
        );
        let row = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no row {name} in\n{text}"))
                .to_string()
        };
        assert!(row("a").contains("connection refused"), "{text}");
        assert!(row("b").contains("wrong protocol"), "{text}");
        assert!(row("a").contains("false"), "connected false: {text}");
    })
    .await
}

/// What `viewcar demo` prints for a new user to try works as printed with the binary alone:
/// every `viewcar ...` line runs and answers (a watch prints a first change), and the grpcurl
/// line relies on the sidecar's reflection instead of proto files from a checkout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_the_demo_prints_work_with_the_binary_alone() {
    use common::Kill;
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let printed = within(tokio::task::spawn_blocking(|| {
        let mut demo = Kill(
            viewcar()
                .args([
                    "demo",
                    "--origin-listen",
                    "127.0.0.1:0",
                    "--grpc-listen",
                    "127.0.0.1:0",
                    "--http-listen",
                    "127.0.0.1:0",
                    "--products",
                    "300",
                    "--rate",
                    "20",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("start the demo"),
        );
        let out = demo.0.stdout.take().expect("stdout");
        let mut printed = Vec::new();
        for line in BufReader::new(out).lines() {
            let line = line.expect("demo output");
            let done = line.contains("ws_subscriber");
            printed.push(line);
            if done {
                break;
            }
        }
        let mut ran = Vec::new();
        for line in &printed {
            let Some(cmd) = line.strip_prefix("  viewcar ") else {
                continue;
            };
            let cmd = cmd.split('#').next().unwrap_or("");
            let args: Vec<&str> = cmd.split_whitespace().collect();
            if args.first() == Some(&"watch") {
                let mut w = Kill(
                    viewcar()
                        .args(&args)
                        .stdout(Stdio::piped())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("start watch"),
                );
                let first = BufReader::new(w.0.stdout.take().expect("stdout"))
                    .lines()
                    .next();
                assert!(
                    matches!(&first, Some(Ok(l)) if !l.is_empty()),
                    "{line}: {first:?}"
                );
            } else {
                let out = viewcar().args(&args).output().expect("run");
                assert!(out.status.success(), "{line}: {out:?}");
                let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                if args.first() == Some(&"get") {
                    assert!(stdout.contains("p00042"), "{line}: {stdout}");
                }
            }
            ran.push(args[0].to_string());
        }
        assert!(
            ["get", "watch", "sources"]
                .iter()
                .all(|c| ran.iter().any(|r| r == c)),
            "{ran:?} from {printed:#?}"
        );
        printed
    }))
    .await
    .expect("join");
    let text = printed.join("\n");
    let grpcurl = printed
        .iter()
        .find(|l| l.trim_start().starts_with("grpcurl"))
        .unwrap_or_else(|| panic!("no grpcurl line in {text}"));
    assert!(!grpcurl.contains("-proto"), "{grpcurl}");
    assert!(text.contains("websocat ws://"), "{text}");
}

/// `viewcar check --probe` dials each origin as the sidecar would and asks for each topic:
/// a mistyped topic, an address where nothing listens and a port that serves the Cache API
/// instead of Feed are each named with their cause (exit 69); a config whose origins serve
/// every topic passes (exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_probe_names_unreachable_origins_and_missing_topics() {
    within(async {
        let o = TestOrigin::start(viewcar::OriginConfig {
            topics: vec!["orders".into(), "users".into()],
            ..origin_config()
        })
        .await;
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let cache_port = common::start_sidecar(common::sidecar_config(&o.url(), &["users"])).await;
        let dir = TempDir::new("probe");
        let write = |name: &str, origins: &str| {
            dir.write(
                name,
                &format!("[listen]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n{origins}"),
            )
        };
        let bad = write(
            "bad.toml",
            &format!(
                r#"
[[origin]]
name = "shop"
address = "{}"
topics = ["order", "users"]

[[origin]]
name = "gone"
address = "http://{refused}"
topics = ["x"]

[[origin]]
name = "wrong"
address = "http://{}"
topics = ["y"]
"#,
                o.url(),
                cache_port.grpc_addr()
            ),
        );
        let good = write(
            "good.toml",
            &format!(
                "[[origin]]\nname = \"shop\"\naddress = \"{}\"\ntopics = [\"orders\", \"users\"]\n",
                o.url()
            ),
        );
        let run = |config: std::path::PathBuf| {
            tokio::task::spawn_blocking(move || {
                let mut cmd = viewcar();
                cmd.args(["check", "--probe", "--config"]).arg(config);
                cmd.output().expect("run check")
            })
        };
        let out = run(bad).await.expect("join");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(69), "{stdout}\n{out:?}");
        let probed = stdout.split("probe:").nth(1).unwrap_or_default();
        let line = |needle: &str| {
            probed
                .lines()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no line with {needle:?} in\n{stdout}"))
                .to_string()
        };
        assert!(line("topic users").contains("ok"), "{stdout}");
        let order = line("topic order:");
        assert!(
            order.contains("FAIL") && order.contains("no topic named 'order'"),
            "{order}"
        );
        let gone = line("origin gone");
        assert!(
            gone.contains("FAIL") && gone.contains("connection refused"),
            "{gone}"
        );
        let wrong = line("origin wrong");
        assert!(
            wrong.contains("FAIL") && wrong.contains("does not serve the Feed API"),
            "{wrong}"
        );
        let out = run(good).await.expect("join");
        assert!(out.status.success(), "{out:?}");
    })
    .await
}

/// The three silent view mistakes, each visible: an include keyed by a field no row has
/// (`usr_id` for `user_id`), a `where` comparing a bare word (`status == paid`), a `group_by`
/// on a field no row has; plus an include whose keys find no rows. Each is a warning in the
/// log (with a "did you mean" where a field is close), counters in `/status` and `/metrics`,
/// and an empty view is logged after its first build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_view_mistakes_are_logged_and_counted() {
    within(async {
        let o = TestOrigin::start(origin_config()).await;
        let orders: Vec<_> = (0..8)
            .map(|i| {
                put(
                    &format!("o{i}"),
                    &format!(
                        r#"{{"user_id":"u{}","shop_id":"nope{i}","status":"paid","total":{i}}}"#,
                        i % 3
                    ),
                )
            })
            .collect();
        o.origin.publish("orders", orders).unwrap();
        o.origin
            .publish(
                "users",
                vec![
                    put("u0", r#"{"name":"Ann"}"#),
                    put("u1", r#"{"name":"Bo"}"#),
                    put("u2", r#"{"name":"Cy"}"#),
                ],
            )
            .unwrap();
        o.origin
            .publish("shops", vec![put("s1", r#"{"name":"Corner"}"#)])
            .unwrap();
        let dir = TempDir::new("view-mistakes");
        let config = dir.write(
            "viewcar.toml",
            &format!(
                r#"
[listen]
grpc = "127.0.0.1:0"
http = "127.0.0.1:0"

[[origin]]
name = "shop"
address = "{}"
topics = ["orders", "users", "shops"]

[[view]]
name = "order_page"
from = "orders"
[view.include]
user = {{ source = "users", key = "usr_id" }}
shop = {{ source = "shops", key = "shop_id" }}

[[view]]
name = "paid_orders"
from = "orders"
where = "status == paid"

[[view]]
name = "orders_by_user"
from = "orders"
group_by = "userid"
"#,
                o.url()
            ),
        );
        let mut cmd = viewcar();
        cmd.args(["--log-format", "json", "sidecar", "--config"])
            .arg(&config);
        let (_sidecar, mut log) = spawn(cmd);
        // Every warning, in whatever order the views are built: some may come before the
        // sidecar says it started.
        let mut seen: Vec<serde_json::Value> = Vec::new();
        let started = loop {
            let line = log.recv().await.expect("log ended before the start");
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["fields"]["message"] == "sidecar started" {
                break v;
            }
            if v["level"] == "WARN" {
                seen.push(v);
            }
        };
        let http = addr(&started, "http");
        let wanted = [
            "include key finds no field in most rows",
            "include key finds no row of its source in most rows",
            "where compares 'paid' as a field",
            "view is empty after its first build",
        ];
        let empty_views = |seen: &[serde_json::Value]| {
            seen.iter()
                .filter(|v| {
                    v["fields"]["message"]
                        .as_str()
                        .unwrap_or("")
                        .contains("view is empty")
                })
                .count()
        };
        while !wanted.iter().all(|w| {
            seen.iter()
                .any(|v| v["fields"]["message"].as_str().unwrap_or("").contains(w))
        }) || empty_views(&seen) < 2
        {
            let line = log.recv().await.expect("log ended before every warning");
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["level"] == "WARN" {
                    seen.push(v);
                }
            }
        }
        let find = |w: &str| {
            seen.iter()
                .find(|v| v["fields"]["message"].as_str().unwrap_or("").contains(w))
                .cloned()
                .unwrap_or_default()
        };
        let key = find("include key finds no field");
        assert_eq!(key["fields"]["view"], "order_page", "{key}");
        assert_eq!(key["fields"]["include"], "user", "{key}");
        assert!(
            key["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("did you mean 'user_id'"),
            "{key}"
        );
        let lookup = find("finds no row of its source");
        assert_eq!(lookup["fields"]["include"], "shop", "{lookup}");
        assert_eq!(lookup["fields"]["source"], "shops", "{lookup}");
        let empty: Vec<&str> = seen
            .iter()
            .filter(|v| {
                v["fields"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("view is empty")
            })
            .filter_map(|v| v["fields"]["view"].as_str())
            .collect();
        assert!(
            empty.contains(&"paid_orders") && empty.contains(&"orders_by_user"),
            "{empty:?}"
        );

        let status: serde_json::Value =
            serde_json::from_str(&get(http, "/status").await.body).unwrap();
        let page = status["views"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "order_page"))
            .cloned()
            .unwrap_or_default();
        let include = |name: &str| {
            page["includes"]
                .as_array()
                .and_then(|v| v.iter().find(|i| i["name"] == name))
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(include("user")["key_missing"], 8, "{page}");
        assert_eq!(include("shop")["lookup_missing"], 8, "{page}");
        let metrics = get(http, "/metrics").await.body;
        assert!(
            metrics.contains(
                r#"viewcar_view_include_key_missing_total{view="order_page",include="user"} 8"#
            ),
            "{metrics}"
        );
    })
    .await
}

/// One malformed input row does not delete the view rows that read it: they keep their last
/// good value, counted as stale in `/status`, and `viewcar get` still answers them; fixing the
/// input recomputes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_input_keeps_the_last_good_view_rows() {
    within(async {
        let o = TestOrigin::start(origin_config()).await;
        let orders: Vec<_> = (0..3)
            .map(|i| put(&format!("o{i}"), r#"{"user_id":"u0","total":1}"#))
            .collect();
        o.origin.publish("orders", orders).unwrap();
        o.origin
            .publish("users", vec![put("u0", r#"{"name":"Ann"}"#)])
            .unwrap();
        let dir = TempDir::new("last-good");
        let config = dir.write(
            "viewcar.toml",
            &format!(
                r#"
[listen]
grpc = "127.0.0.1:0"
http = "127.0.0.1:0"

[[origin]]
name = "shop"
address = "{}"
topics = ["orders", "users"]

[[view]]
name = "order_page"
from = "orders"
[view.include]
user = {{ source = "users", key = "user_id" }}
"#,
                o.url()
            ),
        );
        let mut cmd = viewcar();
        cmd.args(["--log-format", "json", "sidecar", "--config"])
            .arg(&config);
        let (_sidecar, mut log) = spawn(cmd);
        let started = log_line(&mut log, "sidecar started").await;
        let http = addr(&started, "http");
        let grpc = addr(&started, "grpc").to_string();
        let view = |status: &serde_json::Value| {
            status["views"]
                .as_array()
                .and_then(|v| v.iter().find(|v| v["name"] == "order_page"))
                .cloned()
                .unwrap_or_default()
        };
        let status = || async {
            serde_json::from_str::<serde_json::Value>(&get(http, "/status").await.body).unwrap()
        };
        // Every row built, then the bad write.
        while status().await["ready"] != true {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        o.origin
            .publish("users", vec![put("u0", "{not json")])
            .unwrap();
        loop {
            let s = status().await;
            if view(&s)["stale_rows"] == 3 {
                assert!(view(&s)["kept_last_good"].as_u64() >= Some(3), "{s}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let read = |key: &'static str| {
            let grpc = grpc.clone();
            tokio::task::spawn_blocking(move || {
                viewcar()
                    .args(["get", "order_page", key, "--addr", &grpc])
                    .output()
                    .expect("run get")
            })
        };
        let out = read("o1").await.expect("join");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success() && text.contains("Ann"), "{out:?}");
        // Fixed: recomputed, no longer stale.
        o.origin
            .publish("users", vec![put("u0", r#"{"name":"Bo"}"#)])
            .unwrap();
        loop {
            if view(&status().await)["stale_rows"] == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let out = read("o1").await.expect("join");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Bo"),
            "{out:?}"
        );
    })
    .await
}

/// `viewcar demo | head -1`, or any reader that goes away: the demo's stdout is closed, and it
/// goes on serving (no panic on the failed write) until it is stopped, then exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_outlives_a_closed_stdout_and_stops_cleanly() {
    use common::Kill;
    use std::process::Stdio;

    within(tokio::task::spawn_blocking(|| {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let grpc = format!("127.0.0.1:{port}");
        let mut demo = Kill(
            viewcar()
                .args([
                    "demo",
                    "--origin-listen",
                    "127.0.0.1:0",
                    "--grpc-listen",
                    &grpc,
                    "--http-listen",
                    "127.0.0.1:0",
                    "--products",
                    "100",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("start the demo"),
        );
        // Nobody reads the demo's output.
        drop(demo.0.stdout.take());
        // Up and synced (the banner is written right after): every source listed as synced.
        loop {
            assert!(
                demo.0.try_wait().expect("wait").is_none(),
                "the demo exited"
            );
            let out = viewcar()
                .args(["sources", "--addr", &grpc])
                .output()
                .expect("run sources");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() && text.lines().skip(1).all(|l| l.contains(" true ")) {
                break;
            }
        }
        let out = viewcar()
            .args(["get", "products", "p00042", "--addr", &grpc])
            .output()
            .expect("run get");
        assert!(out.status.success(), "{out:?}");
        assert!(
            demo.0.try_wait().expect("wait").is_none(),
            "the demo exited"
        );
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &demo.0.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok);
        let status = demo.0.wait().expect("wait for the demo");
        assert!(status.success(), "{status:?}");
    }))
    .await
    .unwrap();
}
