//! View maintenance benchmarks (being written).
fn main() {}
