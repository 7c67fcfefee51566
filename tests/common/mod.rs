//! The harness shared by every test and the benchmarks lives in `crates/testkit`; this module
//! only brings it in as `common`.
pub use wsrelay_testkit::*;
