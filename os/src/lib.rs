//! OS helpers shared by every clutch crate, written once:
//! - [`fs`]: the crash-safe, symlink-safe file writer (temp file created with `O_EXCL`,
//!   fsync, rename, directory fsync), durable directory creation, and writing into a
//!   directory that another user controls (a home directory) without following links.
//! - [`cmd`]: running programs through a trait (real and, with the `testing` feature, a
//!   recording fake), with secrets redacted from everything that is logged or returned.

pub mod cmd;
pub mod fs;

pub use cmd::{CmdOutput, CommandRunner, RealRunner, Redactor};
pub use fs::{WriteError, write_atomic, write_if_changed};
