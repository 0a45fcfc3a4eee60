//! Property tests over the config parsers: whatever bytes arrive (a card edited on another
//! computer, a truncated write), parsing never panics, and every error is located inside the
//! text it came from.

use std::path::Path;

use proptest::prelude::*;

const VALID: &str = r#"version = 1
board = "amd64"
suite = "trixie"
[image]
size = "auto"
formats = ["raw", "qcow2"]
[system]
hostname = "node-{id}"
[user]
name = "admin"
authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x"]
[wifi]
ssid = "lab"
psk = "long enough passphrase"
country = "GB"
[[storage.loopback]]
name = "data0"
size = "2GiB"
[cluster]
name = "lab"
engine = "etcd"
token = "0123456789abcdef0123456789abcdef"
expected_size = 3
"#;

fn located_inside(text: &str, err: &clutch_config::ConfigError) -> bool {
    match err.diagnostic() {
        Some(d) => {
            let lines = text.lines().count().max(1) + 1;
            d.line >= 1 && d.line <= lines && d.col >= 1 && !d.message.is_empty()
        }
        // Only file-read errors are unlocated, and parsing from text reads no file
        // except *_file secrets, which these inputs do not name.
        None => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(s in "\\PC{0,400}") {
        let p = Path::new("fuzz.toml");
        if let Err(e) = clutch_config::parse_image_config(p, &s) {
            prop_assert!(located_inside(&s, &e), "{e}");
        }
        if let Err(e) = clutch_config::parse_node_config(p, &s) {
            prop_assert!(located_inside(&s, &e), "{e}");
        }
    }

    #[test]
    fn mutated_valid_config_is_parsed_or_located(
        edits in proptest::collection::vec((0usize..VALID.len(), 0usize..6, "[ -~\\n]{0,4}"), 1..4)
    ) {
        let mut s = VALID.to_string();
        for (at, del, ins) in edits {
            let at = at.min(s.len());
            let end = (at + del).min(s.len());
            if s.is_char_boundary(at) && s.is_char_boundary(end) {
                s.replace_range(at..end, &ins);
            }
        }
        let p = Path::new("fuzz.toml");
        match clutch_config::parse_image_config(p, &s) {
            Ok(c) => prop_assert_eq!(c.version, 1),
            Err(e) if e.to_string().contains("cannot read") => {}
            Err(e) => prop_assert!(located_inside(&s, &e), "{}", e),
        }
    }
}

#[test]
fn the_valid_seed_parses() {
    clutch_config::parse_image_config(Path::new("v.toml"), VALID).unwrap();
}
