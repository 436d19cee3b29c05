//! Scenario `ingest`.

use super::{BenchError, Ctx};

pub async fn run(ctx: &mut Ctx) -> Result<(), BenchError> {
    ctx.report.note("ingest", "not yet implemented");
    Ok(())
}
