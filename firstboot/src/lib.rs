//! `clutch-firstboot`: turns a freshly flashed clutch image into a distinct node.
//!
//! The flow of one boot ([`run::run`]): read `clutch.toml` (and a Raspberry Pi
//! `custom.toml`) from the FAT partition ([`load`]), look at the machine ([`facts`]), plan
//! every change as plain data ([`plan`]), carry the plan out ([`apply`]) through the
//! [`sys::Sys`] trait, and report through a [`status::StatusSink`]. All paths are under a
//! root directory ([`facts::Paths`]), `/` on a node and a temp dir in tests.

pub mod apply;
pub mod cluster;
pub mod facts;
pub mod fsx;
pub mod grow;
pub mod hold;
pub mod links;
pub mod load;
pub mod loopdev;
pub mod netconfig;
pub mod plan;
pub mod render;
pub mod run;
pub mod status;
pub mod sys;
pub mod update;

#[cfg(test)]
mod tests;
