//! Bad config files, through the real binary: exit status 64 (EX_USAGE) and a message naming the
//! file, the field and what was expected. A good file passes `check`.

mod common;

use std::path::PathBuf;
use std::process::Output;

fn write(name: &str, text: &str) -> PathBuf {
    common::write_file("config-tests", name, text)
}

fn viewcar(args: &[&str]) -> Output {
    common::run_viewcar(args)
}

/// Both `check` and `sidecar` refuse the file with 64 and a message containing every `needle`.
fn refused(name: &str, text: &str, needles: &[&str]) {
    let path = write(name, text);
    let file = path.to_str().unwrap();
    for cmd in ["check", "sidecar"] {
        let out = viewcar(&[cmd, "--config", file]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{cmd} {name}: {err}");
        assert!(err.contains(file), "{cmd} {name}: no file name in: {err}");
        for n in needles {
            assert!(err.contains(n), "{cmd} {name}: no {n:?} in: {err}");
        }
    }
}

const ORIGIN: &str = "[[origin]]\nname = \"o\"\naddress = \"http://127.0.0.1:1\"\n";

#[test]
fn unknown_fields_are_refused_naming_them_and_the_expected_ones() {
    refused(
        "unknown-listen.toml",
        "[listen]\ngrcp = \"127.0.0.1:0\"\n",
        &["grcp", "expected", "grpc"],
    );
    refused(
        "unknown-topic-key.toml",
        &format!("{ORIGIN}topics = [{{ name = \"a\", mdoe = \"full\" }}]\n"),
        &["mdoe", "expected", "mode"],
    );
    refused(
        "unknown-section.toml",
        &format!("{ORIGIN}topics = [\"a\"]\n[limts]\nmax_batch_keys = 5\n"),
        &["limts", "expected", "limits"],
    );
}

#[test]
fn malformed_values_are_refused_naming_the_field_and_what_was_expected() {
    refused(
        "wrong-type.toml",
        "[limits]\nmax_batch_keys = \"many\"\n",
        &["max_batch_keys", "expected"],
    );
    refused(
        "bad-variant.toml",
        &format!("{ORIGIN}topics = [{{ name = \"a\", mode = \"fast\" }}]\n"),
        &["mode", "expected `full` or `on_demand`"],
    );
    refused(
        "bad-duration.toml",
        "[feed]\nidle_timeout = \"10\"\n",
        &["idle_timeout", "expected ms, s, m, h or d"],
    );
    refused(
        "bad-size.toml",
        "[limits]\nmax_message_bytes = \"4XB\"\n",
        &["max_message_bytes", "expected B, KiB"],
    );
    refused(
        "missing-field.toml",
        "[[origin]]\nname = \"o\"\ntopics = [\"a\"]\n",
        &["missing field `address`"],
    );
    refused("syntax.toml", "[listen\n", &["line 1", "expected"]);
    refused(
        "bad-address.toml",
        "[[origin]]\nname = \"o\"\naddress = \"127.0.0.1:1\"\ntopics = [\"a\"]\n",
        &["origin[0].address", "expected http://host:port"],
    );
    refused(
        "small-limit.toml",
        &format!("{ORIGIN}topics = [\"a\"]\n[limits]\nmax_message_bytes = 100\n"),
        &["limits.max_message_bytes", "at least 1KiB"],
    );
    refused(
        "dup-topic.toml",
        &format!("{ORIGIN}topics = [\"a\", \"a\"]\n"),
        &["origin[0].topics[1].name", "duplicate source name 'a'"],
    );
}

#[test]
fn zero_or_absurd_bounds_are_refused_naming_the_key() {
    refused(
        "zero-writer-batch.toml",
        &format!("{ORIGIN}topics = [\"a\"]\n[limits]\nwriter_batch = 0\n"),
        &["limits.writer_batch", "between 1 and 65536"],
    );
    refused(
        "huge-command-queue.toml",
        &format!("{ORIGIN}topics = [\"a\"]\n[ws]\ncommand_queue = 1000000\n"),
        &["ws.command_queue", "between 1 and 1024"],
    );
    refused(
        "zero-send-timeout.toml",
        &format!("{ORIGIN}topics = [\"a\"]\n[ws]\nsend_timeout = \"0s\"\n"),
        &["ws.send_timeout", "above 0"],
    );
    refused(
        "zero-watch-send-timeout.toml",
        &format!("{ORIGIN}topics = [\"a\"]\n[limits]\nwatch_send_timeout = \"0s\"\n"),
        &["limits.watch_send_timeout", "above 0"],
    );
    refused(
        "wildcard-origin.toml",
        &format!("{ORIGIN}topics = [\"a\"]\n[ws]\nallowed_origins = [\"*\"]\n"),
        &["ws.allowed_origins[0]", "wildcards are not supported"],
    );
    refused(
        "origin-without-scheme.toml",
        &format!("{ORIGIN}topics = [\"a\"]\n[ws]\nallowed_origins = [\"app.example.com\"]\n"),
        &["ws.allowed_origins[0]", "scheme"],
    );
    refused(
        "huge-read-buffer.toml",
        &format!("{ORIGIN}topics = [\"a\"]\n[ws]\nread_buffer_bytes = \"1GiB\"\n"),
        &["ws.read_buffer_bytes", "between 256B and 1MiB"],
    );
}

#[test]
fn an_unreadable_file_is_a_usage_error() {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("no-such-viewcar.toml");
    let out = viewcar(&["check", "--config", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("no-such-viewcar.toml") && err.contains("cannot read"));
}

#[test]
fn a_good_file_passes_check_and_lists_its_sources() {
    let path = write(
        "good.toml",
        &format!(
            "[listen]\ngrpc = \"127.0.0.1:0\"\n{ORIGIN}topics = [\"products\", {{ name = \"prices\" }}]\n"
        ),
    );
    let out = viewcar(&["check", "--config", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("topic products") && stdout.contains("topic prices"),
        "{stdout}"
    );
}

/// Numbers at the edge of their type, which once passed `check` and then panicked (a semaphore
/// past its permits, a channel too large, an instant overflowing) or broke the service (a feed
/// that redials forever): refused with 64, naming the key.
#[test]
fn numbers_that_would_panic_or_break_the_service_are_refused() {
    let huge = "2305843009213693952";
    for (section, key) in [
        ("ws", "max_connections"),
        ("limits", "max_watches"),
        ("limits", "writer_queue"),
    ] {
        refused(
            &format!("huge-{key}.toml"),
            &format!("{ORIGIN}topics = [\"a\"]\n[{section}]\n{key} = {huge}\n"),
            &[&format!("{section}.{key}"), "between 1 and"],
        );
    }
    refused(
        "huge-keepalive.toml",
        &format!(
            "{ORIGIN}topics = [\"a\"]\n[feed]\nkeepalive_interval = \"18446744073709551615s\"\n"
        ),
        &["keepalive_interval", "too long"],
    );
    refused(
        "zero-idle.toml",
        &format!("{ORIGIN}topics = [\"a\"]\n[feed]\nidle_timeout = \"0s\"\n"),
        &["feed.idle_timeout", "between 100ms and"],
    );
    for (key, value) in [
        ("stream_queue", "4611686018427387904"),
        ("max_streams", huge),
    ] {
        let path = write(&format!("origin-{key}.toml"), &format!("{key} = {value}\n"));
        let out = viewcar(&["origin", "--config", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{key}: {err}");
        assert!(
            err.contains(key) && err.contains("between 1 and"),
            "{key}: {err}"
        );
    }
}

/// A config path that is not a regular file is refused at once: `/dev/zero` once grew the
/// process to gigabytes, and a FIFO with no writer hung it.
#[test]
fn a_config_that_is_not_a_regular_file_is_refused() {
    let out = viewcar(&["check", "--config", "/dev/zero"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("/dev/zero") && err.contains("not a regular file"),
        "{err}"
    );
    let fifo = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("viewcar-config-fifo");
    let _ = std::fs::remove_file(&fifo);
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if made.is_ok_and(|s| s.success()) {
        let out = viewcar(&["check", "--config", fifo.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(64));
        let _ = std::fs::remove_file(&fifo);
    } else {
        println!("skipped the FIFO case: mkfifo not found");
    }
    let big = write("big.toml", &format!("# {}\n", "x".repeat(5 << 20)));
    let out = viewcar(&["check", "--config", big.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("larger than 4MiB"), "{err}");
}

/// Bad flags and variables are usage errors like bad config: 64, not clap's 2.
#[test]
fn bad_flags_and_variables_exit_64() {
    let good = write("flags.toml", &format!("{ORIGIN}topics = [\"a\"]\n"));
    let good = good.to_str().unwrap();
    for args in [
        vec!["check", "--config", good, "--grpc-listen", "notanaddr"],
        vec!["--log-format", "xml", "check", "--config", good],
        vec!["check"],
        vec!["sidecar", "--no-such-flag", "--config", good],
    ] {
        let out = viewcar(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
    }
    let out = common::viewcar()
        .args(["check", "--config", good])
        .env("VIEWCAR_ALLOW_NON_LOOPBACK", "maybe")
        .output()
        .expect("run viewcar");
    assert_eq!(out.status.code(), Some(64));
    let out = viewcar(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "help is not an error");
}

#[test]
fn an_origin_address_may_be_a_list_and_each_is_checked() {
    let good = write(
        "address-list.toml",
        "[[origin]]\nname = \"o\"\naddress = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\"]\ntopics = [\"a\"]\n",
    );
    let out = viewcar(&["check", "--config", good.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("http://127.0.0.1:1, http://127.0.0.1:2"),
        "{text}"
    );
    refused(
        "address-list-bad.toml",
        "[[origin]]\nname = \"o\"\naddress = [\"http://127.0.0.1:1\", \"127.0.0.1:2\"]\ntopics = [\"a\"]\n",
        &["origin[0].address[1]", "http://host:port"],
    );
}

#[test]
fn an_origin_config_with_postgres_is_checked_as_such() {
    let good = write(
        "pg-origin.toml",
        "[postgres]\nurl = \"postgres://u:secret@127.0.0.1/db\"\ntables = [\"products\"]\n",
    );
    let out = viewcar(&["check", "--config", good.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("topic products <- table public.products"),
        "{text}"
    );
    assert!(!text.contains("secret"), "{text}");
    let bad = write(
        "pg-origin-bad.toml",
        "[postgres]\nurl = \"postgres://u@h/db\"\ntables = [\"products\"]\nsnapshot_chunk_rows = 0\n",
    );
    let out = viewcar(&["check", "--config", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("postgres.snapshot_chunk_rows"), "{err}");
}

/// An origin address that cannot be dialled is a config error, naming the field: before, the
/// sidecar started and redialled it forever.
#[test]
fn origin_addresses_are_checked() {
    for (i, (address, field, needle)) in [
        (
            r#""http://127.0.0.1:99999""#,
            "origin[0].address",
            "1 to 65535",
        ),
        (r#""http://127.0.0.1:0""#, "origin[0].address", "1 to 65535"),
        (r#""http://:7000""#, "origin[0].address", "no host"),
        (
            r#""http://127.0.0.1:7000/feed""#,
            "origin[0].address",
            "no path",
        ),
        (
            r#""grpc://127.0.0.1:7000""#,
            "origin[0].address",
            "http:// or https://",
        ),
        (
            r#"["http://127.0.0.1:7000", "http://127.0.0.1:70000"]"#,
            "origin[0].address[1]",
            "1 to 65535",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        refused(
            &format!("bad-address-{i}.toml"),
            &format!("[[origin]]\nname = \"o\"\naddress = {address}\ntopics = [\"a\"]\n"),
            &[field, needle],
        );
    }
    for (i, good) in [
        r#""http://127.0.0.1:65535""#,
        r#""http://localhost""#,
        r#""http://[::1]:7000""#,
        r#"["http://a.internal:7000", "http://b.internal:7000/"]"#,
    ]
    .into_iter()
    .enumerate()
    {
        let path = write(
            &format!("good-address-{i}.toml"),
            &format!("[[origin]]\nname = \"o\"\naddress = {good}\ntopics = [\"a\"]\n"),
        );
        let out = viewcar(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{good}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_demo_catalog_past_its_bound_is_a_usage_error() {
    let out = viewcar(&["demo", "--products", "99999999999"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("--products"), "{err}");
}
