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
