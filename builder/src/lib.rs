//! The clutch image builder: one TOML file in, a bootable image out.

pub mod atomic;
pub mod bmap;
pub mod bootfiles;
pub mod build;
pub mod cmd;
pub mod cross;
pub mod data;
pub mod disk;
pub mod doctor;
pub mod engine;
pub mod fat;
pub mod fetch;
pub mod flash;
pub mod foreign;
pub mod lab;
pub mod manifest;
pub mod output;
pub mod progress;
pub mod pxe;
pub mod repro;
pub mod rootfs;
pub mod serve;
pub mod stage;
#[cfg(test)]
mod testutil;
pub mod update;
