//! The old name of `tests/common::fake_node`, kept so that test files written
//! against it build unchanged: `mod fault_support;` brings the whole harness
//! in (as `fault_support::common`) and re-exports the fault names. New files
//! use `mod common;` and `common::fake_node`.

#[path = "../common/mod.rs"]
pub mod common;

pub use common::fake_node::*;
