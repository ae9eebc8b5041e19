//! `#[derive(Trace)]` for pymalloc's cycle collector.
