//! SVG charts of the fanout and freshness figures.

use std::path::Path;

use super::Report;

pub fn draw(_report: &Report, _dir: &Path) -> std::io::Result<()> {
    Ok(())
}
