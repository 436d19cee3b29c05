//! The status page in a real headless Chromium (Debian's `chromium`), driven over the DevTools
//! protocol: against a running demo catalog, the sources table fills, a change published to
//! `prices` appears in the live tail, the sparklines show prices moving, and the view graph
//! is drawn with an edge per view input. Without Chromium the test says so and passes.
//!
//! The page has no event a test can wait on, so the DOM is polled with `Runtime.evaluate`
//! every 50 ms, bounded by a deadline.

mod common;
mod ops_support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use common::{loopback0, TestOrigin};
use ops_support::TempDir;
use viewcar::{demo, Origin, Put};

/// Chromium's start-up dominates; everything else takes well under a second.
const DEADLINE: Duration = Duration::from_secs(60);

/// `VIEWCAR_CHROMIUM`, or the first of the usual names found on `PATH`.
fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VIEWCAR_CHROMIUM") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
    .find(|p| p.is_file())
}

/// A headless Chromium with its own profile directory; killed and removed when dropped.
struct Chromium {
    child: Child,
    _profile: TempDir,
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Chromium {
    /// Starts Chromium and returns it with its DevTools WebSocket URL (from its stderr).
    async fn start(bin: &PathBuf) -> (Chromium, String) {
        let profile = TempDir::new("chromium");
        let mut child = Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn chromium");
        let stderr = child.stderr.take().expect("piped stderr");
        let chromium = Chromium {
            child,
            _profile: profile,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut tx = Some(tx);
            // Keep reading to the end so that Chromium never blocks on a full pipe.
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(url.trim().to_string());
                    }
                }
            }
        });
        let url = rx
            .await
            .expect("chromium exited before printing its DevTools address");
        (chromium, url)
    }
}

/// A DevTools protocol connection to the browser, with one page attached in flat mode.
struct Cdp {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    session: Option<String>,
}

impl Cdp {
    async fn connect(url: &str) -> Cdp {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect to DevTools");
        Cdp {
            ws,
            next_id: 0,
            session: None,
        }
    }

    /// Sends a command (to the attached page, if any) and returns its result; events that
    /// arrive meanwhile are skipped.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .expect("send to DevTools");
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).expect("DevTools sends JSON");
                    if v["id"] == id {
                        assert!(v.get("error").is_none(), "{method}: {v}");
                        return v["result"].clone();
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("DevTools connection ended: {other:?}"),
            }
        }
    }

    /// Opens `url` in a new page and attaches to it.
    async fn open(&mut self, url: &str) {
        let target = self
            .call("Target.createTarget", json!({ "url": url }))
            .await;
        let session = self
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        self.session = Some(
            session["sessionId"]
                .as_str()
                .expect("a session id")
                .to_string(),
        );
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Polls `expression` until it is `true`.
    async fn wait_for(&mut self, what: &str, expression: &str) {
        let start = tokio::time::Instant::now();
        while self.eval(expression).await != Value::Bool(true) {
            if start.elapsed() > DEADLINE {
                let body = self.eval("document.body.innerText").await;
                panic!("the page never showed {what}; it shows:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn status_page_fills_and_tails_changes_in_chromium() {
    let Some(bin) = find_chromium() else {
        common::missing("chromium");
        return;
    };
    tokio::time::timeout(DEADLINE, async {
        let origin = Origin::new(demo::origin_config(loopback0()));
        let size = demo::CatalogSize {
            products: 100,
            ..demo::CatalogSize::default()
        };
        demo::load(&origin, size, 1);
        let o = TestOrigin::start_on(origin.clone(), loopback0()).await;
        let sidecar = common::start_sidecar(demo::sidecar_config(o.addr, loopback0())).await;
        sidecar.synced().await;
        let sources = sidecar.store().sources().len();

        let (_chromium, devtools) = Chromium::start(&bin).await;
        let mut cdp = Cdp::connect(&devtools).await;
        cdp.open(&format!("http://{}/?tail=prices", sidecar.http_addr()))
            .await;

        cdp.wait_for(
            "a row per source, every one synced, prices with its 100 keys",
            &format!(
                r##"(() => {{
                    const rows = document.querySelectorAll("#sources tbody tr");
                    const prices = document.querySelector('#sources tr[data-source="prices"]');
                    return rows.length === {sources}
                        && [...rows].every(r => r.cells[3].textContent === "synced")
                        && prices !== null && prices.cells[5].textContent === "100";
                }})()"##
            ),
        )
        .await;
        let summary = cdp
            .eval(r##"document.getElementById("summary").textContent"##)
            .await;
        assert!(
            summary.as_str().unwrap_or("").starts_with("ready"),
            "{summary}"
        );
        cdp.wait_for(
            "the origin connected",
            r##"document.querySelector("#origins tbody tr td:nth-child(3)")?.textContent === "connected""##,
        )
        .await;
        cdp.wait_for(
            "the live tail subscribed to prices",
            r##"document.getElementById("tailstate").dataset.synced === "1""##,
        )
        .await;

        let key = demo::product_id(7);
        origin
            .publish("prices", vec![Put::upsert(key.clone(), r##"{"amount":424242}"##)])
            .unwrap();
        cdp.wait_for(
            "the published change in the live tail",
            &format!(
                r##"[...document.querySelectorAll("#tail li")].some(li =>
                    li.dataset.type === "change"
                    && li.querySelector(".key").textContent === "{key}"
                    && li.textContent.includes("424242"))"##
            ),
        )
        .await;

        // What moves: prices' versions/s sparkline rises once its changes span two samples of
        // the history (taken every 2 s); every source has both sparklines.
        for i in 0..5 {
            origin
                .publish(
                    "prices",
                    vec![Put::upsert(demo::product_id(i), r##"{"amount":1}"##)],
                )
                .unwrap();
        }
        cdp.wait_for(
            "sparklines for every source, prices' versions/s above 0",
            &format!(
                r##"(() => {{
                    const rows = document.querySelectorAll("#sources tbody tr");
                    const prices = document.querySelector('#sources tr[data-source="prices"] svg.spark.rate');
                    return rows.length === {sources}
                        && [...rows].every(r => r.querySelectorAll("svg.spark").length === 2)
                        && prices !== null && Number(prices.dataset.max) > 0
                        && prices.querySelector("polyline") !== null;
                }})()"##
            ),
        )
        .await;
        // The view graph: a node per view and per topic a view reads, an edge per input.
        let status: Value =
            serde_json::from_str(&ops_support::get(sidecar.http_addr(), "/status").await.body)
                .expect("status JSON");
        let views = status["views"].as_array().expect("views").clone();
        let edges: usize = views
            .iter()
            .map(|v| v["inputs"].as_array().map_or(0, |i| i.len()))
            .sum();
        assert!(edges >= 7, "{views:?}");
        let page_inputs = views
            .iter()
            .find(|v| v["name"] == "product_page")
            .and_then(|v| v["inputs"].as_array())
            .map_or(0, |i| i.len());
        cdp.wait_for(
            "the view graph with every view and edge",
            &format!(
                r##"(() => {{
                    const g = document.getElementById("graph");
                    return g.querySelectorAll("line").length === {edges}
                        && g.querySelectorAll('line[data-to="product_page"]').length === {page_inputs}
                        && g.querySelector('g.node[data-name="product_page"] rect.view') !== null
                        && g.querySelector('g.node[data-name="prices"] rect.topic') !== null
                        && Number(g.getAttribute("width")) > 0;
                }})()"##
            ),
        )
        .await;

        let _ = cdp.call("Browser.close", json!({})).await;
        sidecar.shutdown().await;
    })
    .await
    .expect("the browser test did not finish within its deadline");
}
