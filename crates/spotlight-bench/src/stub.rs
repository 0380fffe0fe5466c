//! Stub workers (written by a helper).
