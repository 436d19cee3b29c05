//! Views: named keyspaces derived from sources and maintained incrementally by the writer.

use std::collections::HashSet;
use std::sync::Arc;

use serde::Deserialize;

use crate::config::ConfigError;
use crate::store::writer::Derive;
use crate::store::{Clock, Store};

/// A `[[view]]` declaration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewSpec {
    pub name: String,
    pub from: String,
}

/// A view set that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("view '{view}': {message}")]
    Invalid { view: String, message: String },
}

/// Checks view declarations against the known source names.
pub(crate) fn validate_specs(
    file: &str,
    specs: &[ViewSpec],
    _sources: &HashSet<String>,
) -> Result<(), ConfigError> {
    if let Some(v) = specs.first() {
        return Err(ConfigError::invalid(
            file,
            format!("view '{}'", v.name),
            "views are not supported by this build yet",
        ));
    }
    Ok(())
}

/// The views of a sidecar, ready to be attached to its store.
pub(crate) struct ViewSet;

impl ViewSet {
    pub(crate) fn attach(self, _store: Arc<Store>) -> Box<dyn Derive> {
        unreachable!("validate_specs refuses views until the engine exists")
    }
}

/// Adds a source per view to `store` and returns the engine that maintains them.
pub(crate) fn build(
    specs: &[ViewSpec],
    _store: &mut Store,
    _clock: Clock,
) -> Result<Option<ViewSet>, ViewError> {
    if let Some(v) = specs.first() {
        return Err(ViewError::Invalid {
            view: v.name.clone(),
            message: "views are not supported by this build yet".into(),
        });
    }
    Ok(None)
}

/// The view graph, one line per view, for `viewcar check`.
pub(crate) fn describe(specs: &[ViewSpec]) -> String {
    specs
        .iter()
        .map(|v| format!("view {} <- {}\n", v.name, v.from))
        .collect()
}
