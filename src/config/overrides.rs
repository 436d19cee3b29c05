//! Settings from outside the file: `VIEWCAR_ORIGIN_<NAME>_ADDRESS` and `--origin NAME=ADDRESS`.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::{ConfigError, OriginConfig, SidecarConfig};
use crate::types::Dur;

/// What the command line and the environment set over a sidecar's config file (`viewcar
/// sidecar` and `viewcar check`); `None` leaves the file's setting.
#[derive(Debug, Clone, Default)]
pub struct SidecarOverrides {
    pub grpc_listen: Option<super::ListenAddr>,
    pub http_listen: Option<SocketAddr>,
    pub allow_non_loopback: bool,
    /// `--origin NAME=ADDRESS`, applied after `VIEWCAR_ORIGIN_<NAME>_ADDRESS`.
    pub origins: Vec<(String, String)>,
    pub shutdown_grace: Option<Dur>,
    pub ws_token: Option<String>,
}

impl SidecarConfig {
    /// Applies `env` (the process environment: `VIEWCAR_ORIGIN_<NAME>_ADDRESS`) and then `o`.
    /// Call [`SidecarConfig::validate`] afterwards.
    pub fn apply_overrides(
        &mut self,
        o: &SidecarOverrides,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        self.apply_origin_env(env)?;
        for (name, address) in &o.origins {
            self.set_origin_address(name, address, "--origin")?;
        }
        if let Some(a) = &o.grpc_listen {
            self.listen.grpc = a.clone();
        }
        if let Some(a) = o.http_listen {
            self.listen.http = Some(a);
        }
        if o.allow_non_loopback {
            self.listen.allow_non_loopback = true;
        }
        if let Some(g) = o.shutdown_grace {
            self.shutdown.grace = g;
        }
        if let Some(t) = &o.ws_token {
            self.ws.token = Some(t.clone());
        }
        Ok(())
    }
}

/// What the command line and the environment set over an origin's config (`viewcar origin`).
#[derive(Debug, Clone, Default)]
pub struct OriginOverrides {
    pub listen: Option<SocketAddr>,
    pub allow_non_loopback: bool,
    pub seed: Option<PathBuf>,
    pub publish_token: Option<String>,
    pub data_dir: Option<PathBuf>,
}

impl OriginConfig {
    /// Applies `o`. Call [`OriginConfig::validate`] afterwards.
    pub fn apply_overrides(&mut self, o: OriginOverrides) {
        if let Some(l) = o.listen {
            self.listen = l;
        }
        if o.allow_non_loopback {
            self.allow_non_loopback = true;
        }
        if let Some(s) = o.seed {
            self.seed = Some(s);
        }
        if let Some(t) = o.publish_token {
            self.publish_token = Some(t);
        }
        if let Some(d) = o.data_dir {
            self.data_dir = Some(d);
        }
    }
}

/// Prefix and suffix of the environment variables that set an origin's address:
/// `VIEWCAR_ORIGIN_<NAME>_ADDRESS`.
const ORIGIN_ENV_PREFIX: &str = "VIEWCAR_ORIGIN_";
const ORIGIN_ENV_SUFFIX: &str = "_ADDRESS";

/// The environment variable that sets the address of the `[[origin]]` named `name`:
/// `VIEWCAR_ORIGIN_<NAME>_ADDRESS`, with the name upper-cased and `-` and `.` written as `_`
/// (origin `catalog-eu` -> `VIEWCAR_ORIGIN_CATALOG_EU_ADDRESS`).
pub fn origin_address_env(name: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect();
    format!("{ORIGIN_ENV_PREFIX}{name}{ORIGIN_ENV_SUFFIX}")
}

/// `address` of an override: one address, or several separated by commas (the first dialled
/// first, the others on a lost feed, as `address = [..]` in the file). An empty entry is an
/// error naming `what`.
fn address_list(
    address: &str,
    from: &str,
    what: &str,
) -> Result<(String, Vec<String>), ConfigError> {
    let list: Vec<String> = address.split(',').map(|a| a.trim().to_string()).collect();
    if list.iter().any(String::is_empty) {
        return Err(ConfigError::invalid(
            from,
            what,
            format!(
                "'{address}' has an empty address; give one address or several separated by commas"
            ),
        ));
    }
    let mut list = list.into_iter();
    let first = list.next().unwrap_or_default();
    Ok((first, list.collect()))
}

impl SidecarConfig {
    /// Points the `[[origin]]` named `name` at `address` (one address, or several separated
    /// by commas). `from` says where the setting came from, for errors. Naming no origin is an
    /// error: an override must never be silently ignored. Call [`SidecarConfig::validate`]
    /// afterwards.
    pub fn set_origin_address(
        &mut self,
        name: &str,
        address: &str,
        from: &str,
    ) -> Result<(), ConfigError> {
        match self.origins.iter_mut().find(|o| o.name == name) {
            Some(o) => {
                (o.address, o.fallback) = address_list(address, from, name)?;
                Ok(())
            }
            None => Err(ConfigError::invalid(
                from,
                name,
                format!("no [[origin]] has this name ({})", self.origin_names()),
            )),
        }
    }

    /// Applies every `VIEWCAR_ORIGIN_<NAME>_ADDRESS` among `vars` (the process environment, in
    /// the binary). A variable that matches no origin, or two origins whose names differ only
    /// by case, `-` or `.`, is an error. Call [`SidecarConfig::validate`] afterwards.
    pub fn apply_origin_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (var, value) in vars {
            if !(var.starts_with(ORIGIN_ENV_PREFIX)
                && var.ends_with(ORIGIN_ENV_SUFFIX)
                && var.len() > ORIGIN_ENV_PREFIX.len() + ORIGIN_ENV_SUFFIX.len())
            {
                continue;
            }
            let matching: Vec<usize> = (0..self.origins.len())
                .filter(|&i| origin_address_env(&self.origins[i].name) == var)
                .collect();
            match matching.as_slice() {
                [i] => {
                    let o = &mut self.origins[*i];
                    (o.address, o.fallback) = address_list(&value, "environment", &var)?;
                }
                [] => {
                    return Err(ConfigError::invalid(
                        "environment",
                        var,
                        format!("names no [[origin]] ({})", self.origin_names()),
                    ))
                }
                _ => {
                    return Err(ConfigError::invalid(
                        "environment",
                        var,
                        "matches more than one [[origin]]; use --origin NAME=ADDRESS",
                    ))
                }
            }
        }
        Ok(())
    }

    fn origin_names(&self) -> String {
        if self.origins.is_empty() {
            return "the config declares none".to_string();
        }
        let names: Vec<String> = self
            .origins
            .iter()
            .map(|o| format!("'{}' ({})", o.name, origin_address_env(&o.name)))
            .collect();
        format!("origins: {}", names.join(", "))
    }
}
