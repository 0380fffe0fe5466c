//! `spotlight bench`: every scenario on the same images and cores in one run.

pub mod stub;
