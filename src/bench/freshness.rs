//! Scenario `freshness`.

use super::{BenchError, Ctx};

pub async fn run(ctx: &mut Ctx) -> Result<(), BenchError> {
    ctx.report.note("freshness", "not yet implemented");
    Ok(())
}
