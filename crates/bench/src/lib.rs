//! spindle-bench: the serving benchmark client behind `spindle bench` (not written yet; see
//! crates/bench/README.md).
