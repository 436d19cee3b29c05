//! `viewcar bench all --smoke`: every scenario end to end in a few seconds, so the harness
//! cannot rot unnoticed. Redis figures appear only where redis-server is installed.

mod common;

use std::process::Command;

/// Runs `viewcar bench <args> --out <out>`, asserts it succeeded, and returns its stdout and
/// the `bench.json` it wrote.
fn bench(args: &[&str], out: &std::path::Path) -> (String, serde_json::Value) {
    let run = Command::new(env!("CARGO_BIN_EXE_viewcar"))
        .arg("bench")
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .expect("viewcar runs");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "bench failed\n{stdout}\n{stderr}");
    let json = serde_json::from_slice(&std::fs::read(out.join("bench.json")).expect("bench.json"))
        .expect("valid JSON");
    (stdout, json)
}

#[test]
fn every_scenario_runs_end_to_end() {
    let out = std::env::temp_dir().join(format!("viewcar-bench-smoke-{}", std::process::id()));
    let (stdout, json) = bench(&["all", "--smoke"], &out);
    for title in [
        "fanout:",
        "reads:",
        "freshness:",
        "push:",
        "ingest:",
        "fleet:",
    ] {
        assert!(stdout.contains(title), "no {title} table in\n{stdout}");
    }
    let tree = json["fanout"]["tree_closed"].as_array().expect("tree runs");
    assert_eq!(tree.len(), 2);
    assert_eq!(tree[1]["calls_per_page"], 12);
    assert!(tree.iter().all(|t| t["requests"].as_u64() > Some(0)));
    assert!(json["fanout"]["sidecar_closed"][0]["requests"].as_u64() > Some(0));
    assert!(json["reads"]["runs"]
        .as_array()
        .is_some_and(|r| r.len() >= 4));
    assert!(json["freshness"]["channels"][1]["samples"].as_u64() > Some(0));
    // Present, as numbers (a short run may fall within one /proc tick).
    for cpu in ["sidecar_cpu_s_per_s", "harness_cpu_s_per_s"] {
        assert!(
            json["freshness"]["params"][cpu].as_f64() >= Some(0.0),
            "{cpu}"
        );
    }
    let push = &json["push"];
    assert_eq!(push["protocol"], "ws", "{push}");
    assert_eq!(push["subscribers"], 20, "{push}");
    assert_eq!(push["fanout"], 1, "{push}");
    assert!(push["rate"].as_u64() > Some(0), "{push}");
    assert!(push["frames"].as_u64() > Some(0), "{push}");
    assert!(
        push["frames_per_server_cpu_s"].as_f64() > Some(0.0),
        "{push}"
    );
    assert!(push["server_cpu_s"].as_f64() > Some(0.0), "{push}");
    let (p50, p99) = (push["p50_us"].as_f64(), push["p99_us"].as_f64());
    assert!(p50 > Some(0.0) && p99 >= p50, "{push}");
    assert_eq!(push["closed"], 0, "{push}");
    assert!(json["ingest"]["memory"]["sidecar_bytes_per_key"].as_f64() > Some(0.0));
    // The sidecar's CPU for the load covers its whole life, start-up included.
    assert!(json["ingest"]["memory"]["snapshot_sidecar_cpu_s"].as_f64() > Some(0.0));
    assert!(json["ingest"]["memory"]["snapshot_origin_cpu_s"].as_f64() >= Some(0.0));
    let fleet = json["fleet"]["runs"].as_array().expect("fleet runs");
    assert_eq!(fleet.len(), 2, "direct and through the relay");
    assert!(fleet
        .iter()
        .all(|r| r["deliveries_per_s"].as_f64() > Some(0.0)));
    assert!(json["fleet"]["storm"][0]["all_synced_s"].as_f64() > Some(0.0));
    assert!(out.join("fanout_latency_vs_depth.svg").is_file());
    assert!(out.join("freshness_cdf.svg").is_file());
    // The comparison with Redis: its rows where redis-server is installed (and under CI, where
    // .ci/run installs it, always).
    if common::installed("redis-server") {
        let runs = json["reads"]["runs"].as_array().expect("read runs");
        for read in ["GET", "page"] {
            let row = runs
                .iter()
                .find(|r| {
                    r["system"] == "redis"
                        && r["read"].as_str().is_some_and(|s| s.starts_with(read))
                })
                .unwrap_or_else(|| panic!("no redis {read} row in {runs:?}"));
            assert!(row["requests"].as_u64() > Some(0), "{row}");
        }
        assert!(
            json["ingest"]["memory"]["redis_used_memory_per_key"].as_f64() > Some(0.0),
            "{}",
            json["ingest"]["memory"]
        );
    } else {
        common::missing("redis-server");
    }
    // The Postgres source's figures, where Postgres is installed (.ci/run installs it).
    if viewcar::bench::postgres::postgres_bin().is_some() {
        let pg = &json["postgres"];
        assert_eq!(pg["copy"]["rows"], 2001, "{pg}");
        assert!(
            pg["copy"]["rows_per_s_to_synced"].as_f64() > Some(0.0),
            "{pg}"
        );
        assert!(
            pg["apply"]["applied_per_origin_cpu_s"].as_f64() > Some(0.0),
            "{pg}"
        );
        let latency = pg["latency"].as_array().expect("latency rows");
        assert_eq!(latency.len(), 2, "Get and WebSocket: {pg}");
        assert!(
            latency.iter().all(|r| r["samples"].as_u64() > Some(0)),
            "{pg}"
        );
    } else {
        common::missing("postgres");
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn the_push_scenario_runs_over_grpc_watch() {
    let out = std::env::temp_dir().join(format!("viewcar-bench-watch-{}", std::process::id()));
    let (stdout, json) = bench(&["push", "--smoke", "--push-protocol", "watch"], &out);
    assert!(stdout.contains("gRPC Watch event"), "{stdout}");
    let push = &json["push"];
    assert_eq!(push["protocol"], "watch", "{push}");
    assert_eq!(push["subscribers"], 20, "{push}");
    assert!(push["frames"].as_u64() > Some(0), "{push}");
    assert!(push["p99_us"].as_f64() > Some(0.0), "{push}");
    assert_eq!(push["closed"], 0, "{push}");
    let _ = std::fs::remove_dir_all(&out);
}

/// `--fleet-streams`, `--fleet-rates` and `--fleet-streams-per-connection` at the edges of their ranges: 0 and one past the top
/// fail the run, naming the flag and the bound, before anything is started.
#[test]
fn fleet_rows_out_of_range_are_refused_naming_the_flag() {
    for (flag, value, bound) in [
        ("--fleet-streams", "0", "1 to 100000"),
        ("--fleet-streams", "100001", "1 to 100000"),
        ("--fleet-rates", "0", "1 to 1000000"),
        ("--fleet-rates", "1000001", "1 to 1000000"),
        ("--fleet-streams-per-connection", "0", "1 to 1000"),
        ("--fleet-streams-per-connection", "1001", "1 to 1000"),
    ] {
        let out = std::env::temp_dir().join(format!(
            "viewcar-bench-fleet-bounds-{}-{flag}-{value}",
            std::process::id()
        ));
        let run = Command::new(env!("CARGO_BIN_EXE_viewcar"))
            .args(["bench", "fleet", flag, value, "--out"])
            .arg(&out)
            .output()
            .expect("viewcar runs");
        let text = String::from_utf8_lossy(&run.stdout).into_owned()
            + &String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{flag} {value} accepted\n{text}");
        assert!(
            text.contains(&format!("{flag} {value}: "))
                && text.contains(&format!("must be {bound}")),
            "{flag} {value}: {text}"
        );
        let _ = std::fs::remove_dir_all(&out);
    }
}
