//! The pieces of the hostile-image tests.

pub mod crafted;
pub mod exercise;
pub mod guard;
pub mod layout;
pub mod mutate;
