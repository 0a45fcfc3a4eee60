//! `clutch check` and `clutch build` agree on user names: for every user and group name of
//! Debian's base-passwd (trixie) and of a real clutch trixie root filesystem (its
//! /etc/passwd and /etc/group after the packages, tests/fixtures/), and for arbitrary names,
//! the name either builds — with the same primary group both ways — or `check` refuses it
//! with an error located at the `[user] name` value.

use std::path::Path;

use clutch_builder::stage;
use clutch_config::account::{self, Account};
use clutch_config::{ConfigError, Diagnostic, ImageConfig};
use proptest::prelude::*;

const PASSWD: &str = include_str!("fixtures/trixie-amd64-etcd.passwd");
const GROUP: &str = include_str!("fixtures/trixie-amd64-etcd.group");
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x";

/// An image config whose `name` value starts at line 4, column 8.
fn config_text(name: &str) -> String {
    format!(
        "version = 1\nboard = \"amd64\"\n[user]\nname = \"{name}\"\nauthorized_keys = [\"{KEY}\"]\n"
    )
}

/// `clutch check`'s verdict: the parsed config, or the located error.
fn check(name: &str) -> Result<ImageConfig, Diagnostic> {
    clutch_config::parse_image_config(Path::new("users.toml"), &config_text(name)).map_err(|e| {
        match e {
            ConfigError::Invalid(d) => *d,
            e => panic!("{name}: unlocated error {e}"),
        }
    })
}

/// The builder's verdict on the real root filesystem: useradd's arguments, or why not. A
/// name the config types refuse never reaches the builder.
fn build(name: &str) -> Result<Vec<String>, String> {
    let user = clutch_config::User {
        name: clutch_config::UserName::try_from(name)?,
        authorized_keys: vec![KEY.try_into().unwrap()],
        password_hash: Default::default(),
        password_hash_file: None,
        sudo: true,
    };
    stage::useradd_args(&user, PASSWD, GROUP).map_err(|i| i.message)
}

/// Asserts that check and build agree on `name`; returns whether it builds.
fn agree(name: &str) -> bool {
    let (c, b) = (check(name), build(name));
    match (&c, &b) {
        (Ok(cfg), Ok(args)) => {
            let want = account::decide_without_root(&cfg.user.as_ref().unwrap().name).unwrap();
            assert!(
                args.windows(want.useradd_group_args().len())
                    .any(|w| w == want.useradd_group_args()),
                "{name}: check says {want:?}, build runs useradd {args:?}"
            );
            if want == Account::NewInSharedGroup {
                assert!(
                    !args.contains(&"--user-group".to_string()),
                    "{name}: {args:?}"
                );
            }
            true
        }
        (Err(d), Err(_)) => {
            assert_eq!(
                (d.line, d.col, d.key.as_str()),
                (4, 8, "user.name"),
                "{name}: not located at the name: {d}"
            );
            assert!(
                d.to_string().starts_with("users.toml:4:8: user.name: "),
                "{d}"
            );
            false
        }
        _ => panic!("{name}: check says {c:?}, the build says {b:?}"),
    }
}

#[test]
fn check_and_build_agree_on_every_base_passwd_and_image_name() {
    let mut names = account::base_passwd_names();
    names.extend(account::passwd_entries(PASSWD).map(|e| e.name));
    names.extend(account::group_names(GROUP).map(str::to_string));
    names.sort();
    names.dedup();
    // base-passwd's 38 groups and 3 users without a group; 13 names from the packages.
    assert_eq!(names.len(), 54, "{names:?}");
    let building: Vec<&String> = names.iter().filter(|n| agree(n)).collect();
    // Every user of the real root filesystem is refused; of the groups, those that are not
    // privileged or reserved build.
    for e in account::passwd_entries(PASSWD) {
        assert!(!building.contains(&&e.name), "{} builds", e.name);
    }
    for n in [
        "operator", "staff", "users", "src", "video", "plugdev", "nogroup", "kvm",
    ] {
        assert!(building.iter().any(|b| *b == n), "{n} does not build");
    }
    for n in [
        "disk",
        "kmem",
        "shadow",
        "sudo",
        "root",
        "adm",
        "tty",
        "systemd-journal",
        "_ssh",
    ] {
        assert!(!building.iter().any(|b| *b == n), "{n} builds");
    }
    eprintln!(
        "{} names: {} build ({}), the rest are refused by check",
        names.len(),
        building.len(),
        building
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]
    /// Arbitrary names, and names made from the system ones, get the same verdict both ways.
    #[test]
    fn check_and_build_agree_on_any_name(
        pick in 0usize..80,
        suffix in "[a-z0-9_-]{0,4}",
        random in "[a-z_][a-z0-9_-]{0,12}",
    ) {
        let known: Vec<String> = account::passwd_entries(PASSWD)
            .map(|e| e.name)
            .chain(account::group_names(GROUP).map(str::to_string))
            .collect();
        agree(&random);
        agree(&format!("{}{suffix}", known[pick % known.len()]));
    }
}
