//! Whole-system tests of Kiln; the tests live in `tests/`, helpers for them here.
