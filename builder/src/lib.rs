//! The clutch image builder: one TOML file in, a bootable image out.

pub mod atomic;
pub mod bootfiles;
pub mod build;
pub mod cmd;
pub mod cross;
pub mod data;
pub mod disk;
pub mod doctor;
pub mod fat;
pub mod fetch;
pub mod foreign;
pub mod output;
pub mod pxe;
pub mod rootfs;
pub mod serve;
pub mod stage;
