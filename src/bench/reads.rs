//! Scenario `reads`.

use super::{BenchError, Ctx};

pub async fn run(ctx: &mut Ctx) -> Result<(), BenchError> {
    ctx.report.note("reads", "not yet implemented");
    Ok(())
}
