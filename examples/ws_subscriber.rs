//! A small WebSocket subscriber: subscribes to keys (or a prefix) of a source on a sidecar's
//! `/ws` and prints every frame it is pushed.
//!
//! ```text
//! cargo run --example ws_subscriber -- ws://127.0.0.1:7071/ws prices p00042 p00043
//! cargo run --example ws_subscriber -- ws://127.0.0.1:7071/ws prices --prefix p0004
//! VIEWCAR_TOKEN=s3cret cargo run --example ws_subscriber -- ws://127.0.0.1:7071/ws prices p00042
//! ```

use std::process::ExitCode;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn usage() -> ExitCode {
    eprintln!("usage: ws_subscriber URL SOURCE (KEY... | --prefix PREFIX)");
    ExitCode::from(64)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, source, rest @ ..] = args.as_slice() else {
        return usage();
    };
    let subscribe = match rest {
        [flag, prefix] if flag == "--prefix" => {
            json!({"op":"subscribe","id":"s1","source":source,"prefix":prefix,"initial":true})
        }
        [] => return usage(),
        keys => json!({"op":"subscribe","id":"s1","source":source,"keys":keys,"initial":true}),
    };
    let mut request = match url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ws_subscriber: bad URL {url}: {e}");
            return usage();
        }
    };
    if let Ok(token) = std::env::var("VIEWCAR_TOKEN") {
        match format!("Bearer {token}").parse() {
            Ok(v) => {
                request.headers_mut().insert("authorization", v);
            }
            Err(_) => {
                eprintln!("ws_subscriber: VIEWCAR_TOKEN is not a valid header value");
                return usage();
            }
        }
    }
    let (mut ws, _) = match tokio_tungstenite::connect_async(request).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ws_subscriber: cannot connect to {url}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = ws.send(Message::text(subscribe.to_string())).await {
        eprintln!("ws_subscriber: {e}");
        return ExitCode::FAILURE;
    }
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                let _ = ws.close(None).await;
                return ExitCode::SUCCESS;
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    // Print one line per frame, as the server sent it.
                    println!("{text}");
                    if let Ok(v) = serde_json::from_str::<Value>(text.as_str()) {
                        if v["type"] == "error" && v["code"] == "not_found" {
                            return ExitCode::FAILURE;
                        }
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    eprintln!("closed by the server: {frame:?}");
                    return ExitCode::SUCCESS;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    eprintln!("ws_subscriber: {e}");
                    return ExitCode::FAILURE;
                }
                None => return ExitCode::SUCCESS,
            }
        }
    }
}
