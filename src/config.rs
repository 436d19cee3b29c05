//! The TOML configuration of the sidecar and of the origin, validated with errors that name the
//! file, the field and what was expected.
//!
//! Unknown keys are errors everywhere (`deny_unknown_fields`): a typo must never silently fall
//! back to a default.

//!
//! Config is plain data at the bottom of the crate: it checks what it can on its own (names,
//! addresses, bounds). The view graph is checked by `views`, whose error the caller reports as a
//! config error of the same file.

mod origin;
mod overrides;
mod postgres;
mod redis;
mod sidecar;
mod view;

use std::path::Path;

pub use crate::types::{ByteSize, Dur, Mode, DEFAULT_ON_DEMAND_BYTES, MIN_ON_DEMAND_BYTES};
pub use origin::{Fsync, OriginConfig};
pub use overrides::{origin_address_env, OriginOverrides, SidecarOverrides};
pub use postgres::{describe_origin, PgTls, PostgresConfig, TableSpec};
pub use redis::{ListenAddr, RedisConfig};
pub use sidecar::{
    describe, FeedConfig, Limits, ListenConfig, OriginSpec, RelayConfig, ShutdownConfig,
    SidecarConfig, TopicSpec, WsConfig,
};
pub use view::{Include, Includes, ViewSpec};

/// A configuration that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(
        file: &str,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError::Invalid {
            file: file.to_string(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Largest config file read: far above any real config, and `/dev/zero` cannot fill memory.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// A config file's name (for errors) and text. Only a regular file (or a link to one) of at
/// most [`MAX_CONFIG_BYTES`] is read: a FIFO with no writer would block forever, a device
/// could be endless.
pub fn read(path: &Path) -> Result<(String, String), ConfigError> {
    use std::io::Read;
    let file = path.display().to_string();
    let fail = |source| ConfigError::Read {
        file: file.clone(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(fail)?;
    if !meta.is_file() {
        return Err(fail(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(fail)?
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(fail)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(fail(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {}", ByteSize(MAX_CONFIG_BYTES)),
        )));
    }
    Ok((file, text))
}

/// TOML into a config type; the error names the file (toml's message names the key and line).
fn from_toml<T: serde::de::DeserializeOwned>(file: &str, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        file: file.to_string(),
        message: e.to_string().trim_end().to_string(),
    })
}

/// A config document that checks itself after parsing (what types alone cannot say).
trait Checked: serde::de::DeserializeOwned {
    fn check(&self, file: &str) -> Result<(), ConfigError>;
}

impl Checked for SidecarConfig {
    fn check(&self, file: &str) -> Result<(), ConfigError> {
        self.validate(file)
    }
}

impl Checked for OriginConfig {
    fn check(&self, file: &str) -> Result<(), ConfigError> {
        self.validate(file)
    }
}

/// Parses and checks config text; `file` names it in errors.
fn parse_checked<T: Checked>(file: &str, text: &str) -> Result<T, ConfigError> {
    let cfg: T = from_toml(file, text)?;
    cfg.check(file)?;
    Ok(cfg)
}

/// Reads, parses and checks a config file.
fn load_checked<T: Checked>(path: &Path) -> Result<T, ConfigError> {
    let (file, text) = read(path)?;
    parse_checked(&file, &text)
}

/// Refuses a token set to the empty string: a typo that would accept every client.
fn check_token(
    file: &str,
    field: &str,
    token: Option<&str>,
    hint: &str,
) -> Result<(), ConfigError> {
    if token.is_some_and(str::is_empty) {
        Err(ConfigError::invalid(
            file,
            field,
            format!("is empty; {hint}"),
        ))
    } else {
        Ok(())
    }
}

/// Refuses a duration outside `min..=max`.
fn check_duration(
    file: &str,
    field: &str,
    d: Dur,
    min: std::time::Duration,
    max: std::time::Duration,
) -> Result<(), ConfigError> {
    if (min..=max).contains(&d.0) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            file,
            field,
            format!("must be between {min:?} and {max:?}, got {:?}", d.0),
        ))
    }
}

/// Refuses a zero duration.
fn check_positive(file: &str, field: &str, d: Dur) -> Result<(), ConfigError> {
    if d.0.is_zero() {
        Err(ConfigError::invalid(file, field, "must be above 0"))
    } else {
        Ok(())
    }
}

/// Refuses a count outside `min..=max`: zero, or so large that it is surely a mistake.
fn check_range(
    file: &str,
    field: &str,
    v: usize,
    min: usize,
    max: usize,
) -> Result<(), ConfigError> {
    if (min..=max).contains(&v) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            file,
            field,
            format!("must be between {min} and {max}, got {v}"),
        ))
    }
}

/// Checks that every TLS file exists and is readable, naming the field that points at it.
fn check_tls_files(
    file: &str,
    at: &str,
    files: Vec<(&'static str, &Path)>,
) -> Result<(), ConfigError> {
    for (field, path) in files {
        if let Err(e) = std::fs::File::open(path) {
            return Err(ConfigError::invalid(
                file,
                format!("{at}.{field}"),
                format!("cannot read {}: {e}", path.display()),
            ));
        }
    }
    Ok(())
}

/// Source names are what readers type: keep them to a safe alphabet.
pub(crate) fn check_name(file: &str, field: &str, name: &str) -> Result<(), ConfigError> {
    crate::types::check_name(name).map_err(|message| ConfigError::invalid(file, field, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(ByteSize::parse("64MiB").unwrap(), ByteSize(64 << 20));
        assert_eq!(ByteSize::parse("1_000").unwrap(), ByteSize(1000));
        assert_eq!(ByteSize::parse("2KB").unwrap(), ByteSize(2000));
        assert!(ByteSize::parse("5XB")
            .unwrap_err()
            .contains("unknown size unit"));
        assert_eq!(
            Dur::parse("250ms").unwrap(),
            Dur(Duration::from_millis(250))
        );
        assert_eq!(Dur::parse("10m").unwrap(), Dur(Duration::from_secs(600)));
        assert!(Dur::parse("10").unwrap_err().contains("unit"));
    }

    #[test]
    fn minimal_config_parses_with_topic_tables() {
        let cfg = SidecarConfig::parse(
            "t.toml",
            r#"
            [listen]
            grpc = "127.0.0.1:0"
            [[origin]]
            name = "catalog"
            address = "http://127.0.0.1:7000"
            topics = ["products", { name = "prices" }]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.origins[0].topics[1].name, "prices");
        assert_eq!(cfg.origins[0].topics[1].mode, Mode::Full);
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let err = SidecarConfig::parse("t.toml", "[listen]\ngrcp = \"127.0.0.1:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("t.toml:"), "{err}");
        assert!(err.contains("grcp"), "{err}");
        let err = SidecarConfig::parse(
            "t.toml",
            "[[origin]]\nname = \"o\"\naddress = \"http://x:1\"\ntopics = [{ name = \"a\", mdoe = \"full\" }]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("mdoe"), "{err}");
    }

    /// A value of the wrong type names the key and what was expected in the file's terms, never
    /// a Rust type ("expected struct ListenConfig").
    #[test]
    fn type_errors_name_the_expected_table_not_a_rust_type() {
        for (text, key, expected) in [
            (
                "listen = \"127.0.0.1:7070\"\n",
                "listen",
                "a table [listen]",
            ),
            ("ws = 5\n", "ws", "a table [ws]"),
            ("limits = 5\n", "limits", "a table [limits]"),
            ("feed = \"x\"\n", "feed", "a table [feed]"),
            ("shutdown = 1\n", "shutdown", "a table [shutdown]"),
            ("origin = [1]\n", "origin", "an [[origin]] table"),
            ("view = [\"v\"]\n", "view", "a [[view]] table"),
        ] {
            let err = SidecarConfig::parse("t.toml", text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(expected), "{text}: {err}");
            assert!(!err.contains("struct"), "{text}: {err}");
        }
        let err = OriginConfig::parse("o.toml", "tls = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls = {") && !err.contains("struct"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let err = SidecarConfig::parse(
            "t.toml",
            "[[origin]]\nname = \"o\"\naddress = \"127.0.0.1:7000\"\ntopics = [\"a\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("origin[0].address"), "{err}");
        let err = SidecarConfig::parse(
            "t.toml",
            "[[origin]]\nname = \"o\"\naddress = \"http://a:1\"\ntopics = [\"a\"]\n[[origin]]\nname = \"p\"\naddress = \"http://a:1\"\ntopics = [\"a\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("duplicate source name 'a'"), "{err}");
        let err = SidecarConfig::parse("t.toml", "[listen]\ngrpc = \"0.0.0.0:7070\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("allow_non_loopback"), "{err}");
    }

    #[test]
    fn relay_keys_are_checked_and_named() {
        let base = "[[origin]]\nname = \"o\"\naddress = \"http://a:1\"\ntopics = [\"a\"]\n";
        let cfg = SidecarConfig::parse(
            "t.toml",
            &format!("[listen]\nfeed = \"127.0.0.1:7100\"\n[relay]\nretain_batches = 10\nmax_connections = 5\n[feed]\ninstance = \"leaf-1\"\n{base}"),
        )
        .unwrap();
        assert_eq!(cfg.listen.feed, Some("127.0.0.1:7100".parse().unwrap()));
        assert_eq!(cfg.relay.retain_batches, 10);
        assert_eq!(cfg.relay.max_connections, 5);
        assert_eq!(cfg.feed.instance.as_deref(), Some("leaf-1"));
        for (text, needle) in [
            ("[relay]\nretain_batches = 0\n", "relay.retain_batches"),
            ("[relay]\nmax_connections = 0\n", "relay.max_connections"),
            (
                "[relay]\nheader_timeout = \"1ms\"\n",
                "relay.header_timeout",
            ),
            (
                "[relay]\nmax_subscribed_bytes = \"100B\"\n",
                "relay.max_subscribed_bytes",
            ),
            (
                "[relay]\nsnapshot_chunk_bytes = \"32MiB\"\n",
                "relay.snapshot_chunk_bytes",
            ),
            ("[relay]\nretain = 1\n", "unknown field `retain`"),
            ("[listen]\nfeed = \"0.0.0.0:7100\"\n", "listen.feed"),
            (
                "[listen]\ngrpc = \"127.0.0.1:7100\"\nfeed = \"127.0.0.1:7100\"\n",
                "listen.feed",
            ),
        ] {
            let err = SidecarConfig::parse("t.toml", &format!("{text}{base}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        let err = SidecarConfig::parse(
            "t.toml",
            "[listen]\nfeed = \"127.0.0.1:7100\"\n[[origin]]\nname = \"o\"\naddress = \"http://a:1\"\ntopics = [{ name = \"a\", mode = \"on_demand\" }]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("nothing") || err.contains("no full topic"),
            "{err}"
        );
    }

    #[test]
    fn origin_addresses_come_from_the_environment() {
        let mut cfg = SidecarConfig::parse(
            "t.toml",
            "[[origin]]\nname = \"catalog-eu\"\naddress = \"http://127.0.0.1:1\"\ntopics = [\"a\"]\n[[origin]]\nname = \"users\"\naddress = \"http://127.0.0.1:2\"\ntopics = [\"b\"]\n",
        )
        .unwrap();
        assert_eq!(
            origin_address_env("catalog-eu"),
            "VIEWCAR_ORIGIN_CATALOG_EU_ADDRESS"
        );
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        cfg.apply_origin_env(env(&[
            ("PATH", "/bin"),
            ("VIEWCAR_ORIGIN_LISTEN", "0.0.0.0:7000"),
            ("VIEWCAR_ORIGIN_CATALOG_EU_ADDRESS", "http://catalog:7000"),
        ]))
        .unwrap();
        assert_eq!(cfg.origins[0].address, "http://catalog:7000");
        assert_eq!(cfg.origins[1].address, "http://127.0.0.1:2");
        let err = cfg
            .apply_origin_env(env(&[("VIEWCAR_ORIGIN_USER_ADDRESS", "http://x:1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("VIEWCAR_ORIGIN_USER_ADDRESS"), "{err}");
        assert!(err.contains("VIEWCAR_ORIGIN_USERS_ADDRESS"), "{err}");
        cfg.set_origin_address("users", "http://users:7000", "--origin")
            .unwrap();
        assert_eq!(cfg.origins[1].address, "http://users:7000");
        let err = cfg
            .set_origin_address("nope", "http://x:1", "--origin")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--origin: nope:"), "{err}");
        cfg.set_origin_address("users", "users:7000", "--origin")
            .unwrap();
        let err = cfg.validate("t.toml").unwrap_err().to_string();
        assert!(err.contains("origin[1].address"), "{err}");

        // Several addresses, as `address = [..]` in the file: tried in turn on a lost feed.
        cfg.apply_origin_env(env(&[(
            "VIEWCAR_ORIGIN_CATALOG_EU_ADDRESS",
            "http://relay-a:7100, http://relay-b:7100,http://origin:7000",
        )]))
        .unwrap();
        assert_eq!(cfg.origins[0].address, "http://relay-a:7100");
        assert_eq!(
            cfg.origins[0].fallback,
            ["http://relay-b:7100", "http://origin:7000"]
        );
        cfg.set_origin_address("users", "http://a:1,http://b:2", "--origin")
            .unwrap();
        assert_eq!(
            (
                cfg.origins[1].address.as_str(),
                cfg.origins[1].fallback.as_slice()
            ),
            ("http://a:1", ["http://b:2".to_string()].as_slice())
        );
        // One address again drops the others.
        cfg.set_origin_address("users", "http://c:3", "--origin")
            .unwrap();
        assert!(cfg.origins[1].fallback.is_empty());
        cfg.validate("t.toml").unwrap();
        for bad in ["http://a:1,", ",http://a:1", "http://a:1,,http://b:2", ""] {
            let err = cfg
                .apply_origin_env(env(&[("VIEWCAR_ORIGIN_USERS_ADDRESS", bad)]))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("VIEWCAR_ORIGIN_USERS_ADDRESS") && err.contains("empty address"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn http_listener_defaults_and_ws_limits_validate() {
        let cfg = SidecarConfig::parse("t.toml", "").unwrap();
        assert_eq!(cfg.listen.http_addr(), "127.0.0.1:7071".parse().unwrap());
        let cfg = SidecarConfig::parse("t.toml", "[listen]\ngrpc = \"127.0.0.1:0\"\n").unwrap();
        assert_eq!(cfg.listen.http_addr().port(), 0);
        let cfg = SidecarConfig::parse(
            "t.toml",
            "[listen]\nhttp = \"127.0.0.1:9000\"\n[ws]\nqueue = 10\nmax_message_bytes = \"1KiB\"\ntoken = \"s3cret\"\nallowed_origins = [\"https://app.example.com\"]\n",
        )
        .unwrap();
        assert_eq!(cfg.listen.http_addr().port(), 9000);
        assert_eq!(cfg.ws.queue, 10);
        assert_eq!(cfg.ws.max_message_bytes, ByteSize(1024));
        for (text, field) in [
            ("[ws]\nqeue = 1\n", "qeue"),
            ("[ws]\nqueue = 0\n", "ws.queue"),
            (
                "[ws]\nidle_timeout = \"1s\"\nping_interval = \"2s\"\n",
                "ws.idle_timeout",
            ),
            ("[ws]\ntoken = \"\"\n", "ws.token"),
            (
                "[ws]\nallowed_origins = [\"https://a.example/\"]\n",
                "ws.allowed_origins[0]",
            ),
            ("[listen]\nhttp = \"0.0.0.0:7071\"\n", "listen.http"),
            ("[listen]\nhttp = \"127.0.0.1:7070\"\n", "listen.http"),
        ] {
            let err = SidecarConfig::parse("t.toml", text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn origin_stream_send_buffer_defaults_and_validates() {
        let cfg = OriginConfig::parse("o.toml", "").unwrap();
        assert_eq!(cfg.stream_send_buffer, 16);
        let cfg = OriginConfig::parse("o.toml", "stream_send_buffer = 64\n").unwrap();
        assert_eq!(cfg.stream_send_buffer, 64);
        for text in [
            "stream_send_buffer = 0\n",
            "stream_send_buffer = 1025\n",
            "stream_send_buffer = -1\n",
        ] {
            let err = OriginConfig::parse("o.toml", text).unwrap_err().to_string();
            assert!(err.starts_with("o.toml:"), "{text}: {err}");
            assert!(err.contains("stream_send_buffer"), "{text}: {err}");
        }
    }

    #[test]
    fn origin_subscription_and_keepalive_bounds_default_and_validate() {
        let cfg = OriginConfig::parse("o.toml", "").unwrap();
        assert_eq!(cfg.max_subscribed_keys, 1_000_000);
        assert_eq!(cfg.keepalive_interval.0, Duration::from_secs(10));
        let cfg = OriginConfig::parse(
            "o.toml",
            "max_subscribed_keys = 5\nkeepalive_interval = \"1s\"\nkeepalive_timeout = \"2s\"\n",
        )
        .unwrap();
        assert_eq!(cfg.max_subscribed_keys, 5);
        assert_eq!(cfg.keepalive_timeout.0, Duration::from_secs(2));
        for (text, key) in [
            ("max_subscribed_keys = 0\n", "max_subscribed_keys"),
            ("keepalive_interval = \"10ms\"\n", "keepalive_interval"),
            ("keepalive_timeout = \"0s\"\n", "keepalive_timeout"),
        ] {
            let err = OriginConfig::parse("o.toml", text).unwrap_err().to_string();
            assert!(
                err.starts_with("o.toml:") && err.contains(key),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn ws_connection_buffers_default_and_validate() {
        let ws = SidecarConfig::parse("t.toml", "").unwrap().ws;
        assert_eq!(ws.send_batch_frames, 128);
        assert_eq!(ws.read_buffer_bytes, ByteSize(4096));
        assert_eq!(ws.command_queue, 32);
        let ws = SidecarConfig::parse(
            "t.toml",
            "[ws]\nsend_batch_frames = 1\nread_buffer_bytes = \"64KiB\"\ncommand_queue = 8\n",
        )
        .unwrap()
        .ws;
        assert_eq!(ws.send_batch_frames, 1);
        assert_eq!(ws.read_buffer_bytes, ByteSize(64 << 10));
        assert_eq!(ws.command_queue, 8);
        for (text, field) in [
            ("[ws]\nsend_batch_frames = 0\n", "ws.send_batch_frames"),
            ("[ws]\nsend_batch_frames = 4097\n", "ws.send_batch_frames"),
            ("[ws]\nread_buffer_bytes = 0\n", "ws.read_buffer_bytes"),
            (
                "[ws]\nread_buffer_bytes = \"255B\"\n",
                "ws.read_buffer_bytes",
            ),
            (
                "[ws]\nread_buffer_bytes = \"2MiB\"\n",
                "ws.read_buffer_bytes",
            ),
            ("[ws]\ncommand_queue = 0\n", "ws.command_queue"),
            ("[ws]\ncommand_queue = 1025\n", "ws.command_queue"),
            ("[ws]\ncommand_queue = \"many\"\n", "command_queue"),
        ] {
            let err = SidecarConfig::parse("t.toml", text)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("t.toml:"), "{text}: {err}");
            assert!(err.contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn writer_batch_defaults_and_validates() {
        let cfg = SidecarConfig::parse("t.toml", "").unwrap();
        assert_eq!(cfg.limits.writer_batch, 256);
        let cfg = SidecarConfig::parse("t.toml", "[limits]\nwriter_batch = 1\n").unwrap();
        assert_eq!(cfg.limits.writer_batch, 1);
        for text in [
            "[limits]\nwriter_batch = 0\n",
            "[limits]\nwriter_batch = 65537\n",
        ] {
            let err = SidecarConfig::parse("t.toml", text)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("t.toml:"), "{text}: {err}");
            assert!(err.contains("limits.writer_batch"), "{text}: {err}");
        }
    }

    #[test]
    fn watch_send_buffer_defaults_and_validates() {
        let cfg = SidecarConfig::parse("t.toml", "").unwrap();
        assert_eq!(cfg.limits.watch_send_buffer, 64);
        for text in [
            "[limits]\nwatch_send_buffer = 0\n",
            "[limits]\nwatch_send_buffer = 4097\n",
        ] {
            let err = SidecarConfig::parse("t.toml", text)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("t.toml") && err.contains("limits.watch_send_buffer"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn batch_read_attempts_defaults_and_validates() {
        let cfg = SidecarConfig::parse("t.toml", "").unwrap();
        assert_eq!(cfg.limits.batch_read_attempts, 64);
        let cfg = SidecarConfig::parse("t.toml", "[limits]\nbatch_read_attempts = 1\n").unwrap();
        assert_eq!(cfg.limits.batch_read_attempts, 1);
        for text in [
            "[limits]\nbatch_read_attempts = 0\n",
            "[limits]\nbatch_read_attempts = 1001\n",
        ] {
            let err = SidecarConfig::parse("t.toml", text)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("t.toml:"), "{text}: {err}");
            assert!(err.contains("limits.batch_read_attempts"), "{text}: {err}");
        }
    }
}
