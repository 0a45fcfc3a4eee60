//! Fixtures shared by the builder's unit tests.

use std::path::Path;

use clutch_config::{Board, ImageConfig};

/// A board file shipped in `boards/`.
pub fn board(name: &str) -> Board {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../boards")
        .join(format!("{name}.toml"));
    clutch_config::load_board(&p).unwrap_or_else(|e| panic!("{e}"))
}

/// An amd64 image config with user `admin` (password hash only); `extra` is TOML placed
/// before the `[user]` table, so it may hold top-level keys as well as whole tables.
pub fn image_config(extra: &str) -> ImageConfig {
    let text = format!(
        "version = 1\nboard = \"amd64\"\n{extra}\n[user]\nname = \"admin\"\npassword_hash = \"$y$abc\"\n"
    );
    clutch_config::parse_image_config(Path::new("t.toml"), &text).unwrap_or_else(|e| panic!("{e}"))
}

/// Whether a test that needs root (chroot, file ownership) can run. Without root it fails
/// under CI=true and is skipped, loudly, otherwise.
pub fn need_root(what: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "CI must run this test as root: {what}"
    );
    eprintln!("SKIPPED (needs root): {what}");
    false
}

/// The `/etc/passwd` and `/etc/group` of a real trixie amd64 root filesystem (with etcd).
pub const TRIXIE_PASSWD: &str = include_str!("../tests/fixtures/trixie-amd64-etcd.passwd");
pub const TRIXIE_GROUP: &str = include_str!("../tests/fixtures/trixie-amd64-etcd.group");
