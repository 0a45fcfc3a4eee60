//! The time zone rule, one for `clutch check`, the builder and clutch-firstboot: which
//! `timezone` values an image can use, and what a node does with one its tzdata lacks.
//!
//! Debian trixie moved the legacy names (`US/Eastern`, `EST5EDT`, `Asia/Calcutta`, ...) out
//! of `tzdata` into `tzdata-legacy`, so a trixie image without that package has no file for
//! them and `/etc/localtime` would dangle. The tables come from the trixie packages
//! themselves (see the headers of `data/tzdata/zones` and `data/tzdata/legacy`):
//! - `clutch check` knows no root filesystem: a zone is usable when trixie's tzdata ships it,
//!   or when it is a legacy name and the config installs `tzdata-legacy`;
//! - the builder asks the staged root filesystem, after its packages are installed;
//! - clutch-firstboot asks the node's own `/usr/share/zoneinfo` and, instead of failing,
//!   maps a legacy name to its modern zone or keeps UTC, with a warning.
//!
//! Legacy names are refused even where the image would ship them (bookworm still has them
//! in `tzdata`) unless `tzdata-legacy` is asked for, so that check and build always agree:
//! the modern name works on every suite.

use std::fmt;

const ZONES: &str = include_str!("../data/tzdata/zones");
const LEGACY: &str = include_str!("../data/tzdata/legacy");

/// The package that ships the legacy names in trixie.
pub const LEGACY_PACKAGE: &str = "tzdata-legacy";
/// Where zone files live, in an image and on a node.
pub const ZONEINFO: &str = "/usr/share/zoneinfo";
/// The zone a node keeps when the configured one is not there.
pub const FALLBACK: &str = "UTC";

/// Names under /usr/share/zoneinfo that are not zones one may choose: `localtime` points
/// back at /etc/localtime; `posixrules` is zic's default rule file.
const NOT_ZONES: &[&str] = &["localtime", "posixrules"];
/// Trees of the same zones in other forms (`right/` counts leap seconds, which systemd and
/// most software do not expect); tzdata-legacy ships them.
const NOT_ZONE_TREES: &[&str] = &["posix/", "right/"];

fn table_lines(t: &'static str) -> impl Iterator<Item = &'static str> {
    t.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// Every zone name trixie's tzdata ships.
pub fn tzdata_zones() -> impl Iterator<Item = &'static str> {
    table_lines(ZONES)
}

/// `(legacy name, modern zone)` for every name trixie moved to tzdata-legacy.
pub fn legacy_names() -> impl Iterator<Item = (&'static str, &'static str)> {
    table_lines(LEGACY).filter_map(|l| l.split_once('\t'))
}

/// The modern zone a legacy name links to.
pub fn modern_name(legacy: &str) -> Option<&'static str> {
    legacy_names().find(|(l, _)| *l == legacy).map(|(_, m)| m)
}

/// Whether trixie's tzdata ships `name`.
pub fn in_tzdata(name: &str) -> bool {
    tzdata_zones().any(|z| z == name)
}

/// Whether the file at `path` (a host path: the caller maps it into the image or the
/// node's root) is a compiled zone, i.e. starts with the TZif magic.
pub fn is_compiled_zone(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == b"TZif"
}

/// Why a `timezone` value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZoneRejected {
    /// A file under zoneinfo that is not a zone to choose.
    NotAZone(String),
    /// A legacy name the image does not ship; `modern` is the zone it links to.
    Legacy { name: String, modern: &'static str },
    /// No such zone in the image.
    Unknown(String),
}

impl fmt::Display for ZoneRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ZoneRejected::NotAZone(n) => write!(
                f,
                "`{n}` is not a time zone name but a file beside them; give a zone such as `UTC` or `Europe/London`"
            ),
            ZoneRejected::Legacy { name, modern } => write!(
                f,
                "`{name}` is a legacy time zone name that Debian trixie's tzdata no longer ships \
                 (it moved to {LEGACY_PACKAGE}); use `{modern}`, the zone it stands for"
            ),
            ZoneRejected::Unknown(n) => write!(
                f,
                "there is no time zone `{n}` in tzdata; names look like `UTC` or `Europe/London` \
                 (see {ZONEINFO}/ or `timedatectl list-timezones`)"
            ),
        }
    }
}

impl std::error::Error for ZoneRejected {}

/// The rule: `name` is usable when it is a zone and `shipped(name)` says the image has it;
/// a legacy name is refused with its modern zone unless [`LEGACY_PACKAGE`] is installed.
pub fn check(
    name: &str,
    legacy_installed: bool,
    shipped: impl Fn(&str) -> bool,
) -> Result<(), ZoneRejected> {
    if NOT_ZONES.contains(&name) || NOT_ZONE_TREES.iter().any(|t| name.starts_with(t)) {
        return Err(ZoneRejected::NotAZone(name.to_string()));
    }
    let modern = modern_name(name);
    if let Some(modern) = modern {
        if !legacy_installed {
            return Err(ZoneRejected::Legacy {
                name: name.to_string(),
                modern,
            });
        }
    }
    if shipped(name) {
        Ok(())
    } else {
        match modern {
            Some(modern) => Err(ZoneRejected::Legacy {
                name: name.to_string(),
                modern,
            }),
            None => Err(ZoneRejected::Unknown(name.to_string())),
        }
    }
}

/// [`check`] as `clutch check` runs it, with no root filesystem: trixie's tables.
pub fn check_without_root(name: &str, packages: &[&str]) -> Result<(), ZoneRejected> {
    let legacy = packages.contains(&LEGACY_PACKAGE);
    check(name, legacy, |n| {
        in_tzdata(n) || (legacy && modern_name(n).is_some())
    })
}

/// What a node does with its configured zone: keep it when it is there; else its modern
/// zone when that is there; else UTC. The second value is the warning for the status.
pub fn for_node(name: &str, shipped: impl Fn(&str) -> bool) -> (String, Option<String>) {
    if check(name, true, &shipped).is_ok() {
        return (name.to_string(), None);
    }
    if let Some(modern) = modern_name(name) {
        if shipped(modern) {
            return (
                modern.to_string(),
                Some(format!(
                    "system.timezone: `{name}` is a legacy name this node's tzdata does not ship; using `{modern}`, the zone it stands for"
                )),
            );
        }
    }
    (
        FALLBACK.to_string(),
        Some(format!(
            "system.timezone: there is no time zone `{name}` in this node's {ZONEINFO}; keeping {FALLBACK}"
        )),
    )
}

/// Zone names a node needs to look up for [`for_node`]: the configured one, its modern
/// zone, and the fallback.
pub fn candidates(name: &str) -> Vec<String> {
    let mut v = vec![name.to_string()];
    v.extend(modern_name(name).map(str::to_string));
    v.push(FALLBACK.to_string());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_whole_and_consistent() {
        let zones: Vec<_> = tzdata_zones().collect();
        assert_eq!(
            zones.len(),
            485,
            "trixie's tzdata 2026f ships 485 zone names"
        );
        assert!(zones.contains(&"UTC") && zones.contains(&"America/New_York"));
        let legacy: Vec<_> = legacy_names().collect();
        assert_eq!(
            legacy.len(),
            113,
            "trixie's tzdata-legacy has 113 legacy names"
        );
        for (old, new) in legacy {
            assert!(!in_tzdata(old), "{old} is in tzdata, so it is not legacy");
            assert!(in_tzdata(new), "{old} -> {new}, which tzdata does not ship");
        }
    }

    #[test]
    fn check_refuses_legacy_names_with_the_modern_zone() {
        assert_eq!(check_without_root("Europe/London", &[]), Ok(()));
        assert_eq!(check_without_root("UTC", &[]), Ok(()));
        let e = check_without_root("US/Eastern", &[]).unwrap_err();
        assert_eq!(
            e,
            ZoneRejected::Legacy {
                name: "US/Eastern".into(),
                modern: "America/New_York"
            }
        );
        assert!(e.to_string().contains("use `America/New_York`"), "{e}");
        assert_eq!(
            check_without_root("Asia/Calcutta", &[]).unwrap_err(),
            ZoneRejected::Legacy {
                name: "Asia/Calcutta".into(),
                modern: "Asia/Kolkata"
            }
        );
        // With tzdata-legacy in the packages the old name is shipped.
        assert_eq!(check_without_root("US/Eastern", &["tzdata-legacy"]), Ok(()));
        assert!(matches!(
            check_without_root("Mars/Olympus", &[]),
            Err(ZoneRejected::Unknown(_))
        ));
        for n in [
            "localtime",
            "posixrules",
            "right/UTC",
            "posix/Europe/London",
        ] {
            assert!(
                matches!(check_without_root(n, &[]), Err(ZoneRejected::NotAZone(_))),
                "{n}"
            );
        }
    }

    #[test]
    fn compiled_zones_are_told_by_their_magic() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("z");
        assert!(!is_compiled_zone(&p), "missing");
        std::fs::write(&p, "TZif2\0\0").unwrap();
        assert!(is_compiled_zone(&p));
        std::fs::write(&p, "# zone.tab\n").unwrap();
        assert!(!is_compiled_zone(&p));
        std::fs::write(&p, "TZ").unwrap();
        assert!(!is_compiled_zone(&p), "short");
    }

    #[test]
    fn a_node_maps_legacy_names_or_keeps_utc() {
        let trixie = |n: &str| in_tzdata(n);
        assert_eq!(
            for_node("Europe/Berlin", trixie),
            ("Europe/Berlin".into(), None)
        );
        let (tz, w) = for_node("US/Eastern", trixie);
        assert_eq!(tz, "America/New_York");
        assert!(w.unwrap().contains("using `America/New_York`"));
        // A node that has tzdata-legacy (or bookworm's tzdata) keeps the name as given.
        assert_eq!(
            for_node("US/Eastern", |_| true),
            ("US/Eastern".into(), None)
        );
        let (tz, w) = for_node("Mars/Olympus", trixie);
        assert_eq!(tz, "UTC");
        assert!(w.unwrap().contains("keeping UTC"));
        assert_eq!(for_node("localtime", |_| true).0, "UTC");
        assert_eq!(
            candidates("US/Eastern"),
            ["US/Eastern", "America/New_York", "UTC"]
        );
    }
}
