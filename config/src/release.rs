//! [`Release`]: the name of an OS release (`[image] release`, what a node runs, what an
//! update offers), ordered the way version numbers are: `2026.12.10` is newer than
//! `2026.12.9`.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

/// An OS release name: 1..=64 characters of letters, digits and `.`, `_`, `+`, `~`, `-`,
/// starting with a letter or digit (it goes into file names, partition labels and etcd
/// keys).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Release(String);

impl TryFrom<String> for Release {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok_start = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
        if s.is_empty() || s.len() > 64 || !ok_start {
            return Err(format!(
                "release `{s}` must be 1 to 64 characters and start with a letter or digit"
            ));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "._+~-".contains(*c)))
        {
            return Err(format!(
                "release `{s}` may hold letters, digits and . _ + ~ - only (not `{c}`)"
            ));
        }
        Ok(Release(s))
    }
}
impl TryFrom<&str> for Release {
    type Error = String;
    fn try_from(s: &str) -> Result<Self, String> {
        Release::try_from(s.to_string())
    }
}
impl From<Release> for String {
    fn from(r: Release) -> String {
        r.0
    }
}
impl Release {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Release({})", self.0)
    }
}

/// Runs of digits compare as numbers, other runs as text; a release that is a prefix of
/// another is older (`1.2` < `1.2.1`).
fn segments(s: &str) -> Vec<(bool, &str)> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let digit = b[i].is_ascii_digit();
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() == digit {
            i += 1;
        }
        out.push((digit, &s[start..i]));
    }
    out
}

impl Ord for Release {
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (segments(&self.0), segments(&other.0));
        for (x, y) in a.iter().zip(b.iter()) {
            let o = match (x, y) {
                ((true, p), (true, q)) => {
                    let (p, q) = (p.trim_start_matches('0'), q.trim_start_matches('0'));
                    p.len().cmp(&q.len()).then_with(|| p.cmp(q))
                }
                ((_, p), (_, q)) => p.cmp(q),
            };
            if o != Ordering::Equal {
                return o;
            }
        }
        a.len().cmp(&b.len()).then_with(|| self.0.cmp(&other.0))
    }
}
impl PartialOrd for Release {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Release {
        Release::try_from(s).unwrap()
    }

    #[test]
    fn releases_order_like_version_numbers() {
        assert!(r("2026.12.10") > r("2026.12.9"));
        assert!(r("2026.12.1") < r("2026.12.1.1"));
        assert!(r("2") > r("1"));
        assert!(r("10") > r("9"));
        assert!(r("1.0-rc2") < r("1.0-rc10"));
        assert_eq!(
            r("007").cmp(&r("7")),
            Ordering::Less,
            "a total order: text breaks ties"
        );
        assert!(r("2026.12.1") == r("2026.12.1"));
    }

    #[test]
    fn dates_from_day_counts() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_425), (2025, 12, 3));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn release_names_are_safe_in_files_labels_and_keys() {
        for bad in [
            "",
            ".1",
            "a/b",
            "a b",
            "a\nb",
            "x".repeat(65).as_str(),
            "-1",
        ] {
            assert!(Release::try_from(bad).is_err(), "{bad:?}");
        }
        for good in ["1", "2026.12.1", "v3", "1.0~rc1", "2026.12.1+build.5"] {
            assert!(Release::try_from(good).is_ok(), "{good}");
        }
    }
}
