//! The clinic's side (in progress).
