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
        &["idle_timeout", "expected ms, s, m or h"],
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
