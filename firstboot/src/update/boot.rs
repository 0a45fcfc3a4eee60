//! The boot side of each A/B scheme, as pure functions over file names and contents:
//! systemd-boot entries with boot counting (and syslinux for legacy BIOS), Raspberry Pi
//! `autoboot.txt`, and Raspberry Pi 3 `os_prefix=`. The files the builder writes too
//! (slot names, ESP paths, syslinux.cfg, autoboot.txt) come from `clutch_config::ab`.

use clutch_config::Release;

pub use clutch_config::ab::{Slot, autoboot_txt, esp_initrd, esp_kernel, syslinux_cfg};

/// The board's A/B scheme (`/usr/lib/clutch/ab.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    SystemdBoot,
    Tryboot,
    OsPrefix,
}

impl Scheme {
    pub fn parse(s: &str) -> Option<Scheme> {
        match s {
            "systemd-boot" => Some(Scheme::SystemdBoot),
            "tryboot" => Some(Scheme::Tryboot),
            "os-prefix" => Some(Scheme::OsPrefix),
            _ => None,
        }
    }
    /// The partition number of a slot's root partition (the builder's layouts).
    pub fn root_partition(self, s: Slot) -> u32 {
        let base = match self {
            Scheme::SystemdBoot | Scheme::OsPrefix => 2,
            Scheme::Tryboot => 4,
        };
        base + (s as u32)
    }
    /// The partition number of a slot's own boot partition (`tryboot`).
    pub fn boot_partition(self, s: Slot) -> Option<u32> {
        (self == Scheme::Tryboot).then_some(2 + s as u32)
    }
    /// The slot a root partition number belongs to.
    pub fn slot_of_partition(self, n: u32) -> Option<Slot> {
        [Slot::A, Slot::B]
            .into_iter()
            .find(|s| self.root_partition(*s) == n)
    }
}

/// A Boot Loader Specification entry file of a release, with its boot counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub release: Release,
    /// `None`: no counter (committed).
    pub tries_left: Option<u32>,
    pub tries_done: Option<u32>,
}

impl Entry {
    /// Parses `clutch_<release>[+<left>[-<done>]].conf`.
    pub fn parse(name: &str) -> Option<Entry> {
        let stem = name.strip_prefix("clutch_")?.strip_suffix(".conf")?;
        let (rel, counter) = match stem.split_once('+') {
            Some((r, c)) => (r, Some(c)),
            None => (stem, None),
        };
        let release = Release::try_from(rel).ok()?;
        let (left, done) = match counter {
            None => (None, None),
            Some(c) => match c.split_once('-') {
                Some((l, d)) => (Some(l.parse().ok()?), Some(d.parse().ok()?)),
                None => (Some(c.parse().ok()?), None),
            },
        };
        Some(Entry {
            name: name.to_string(),
            release,
            tries_left: left,
            tries_done: done,
        })
    }

    /// Still being tried (has a counter with tries left)?
    pub fn on_trial(&self) -> bool {
        self.tries_left.is_some_and(|l| l > 0)
    }
    /// Used up (systemd-boot sorts it last: the fallback)?
    pub fn bad(&self) -> bool {
        self.tries_left == Some(0)
    }

    /// The name that makes systemd-boot treat it as bad (no tries left).
    pub fn bad_name(&self) -> String {
        let done = self.tries_done.unwrap_or(0) + self.tries_left.unwrap_or(0);
        format!("clutch_{}+0-{}.conf", self.release, done.max(1))
    }
}

/// The entries of releases in a loader/entries listing, newest first.
pub fn entries<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<Entry> {
    let mut v: Vec<Entry> = names.into_iter().filter_map(Entry::parse).collect();
    v.sort_by(|a, b| b.release.cmp(&a.release));
    v
}

/// The `options` line of an entry.
pub fn entry_options(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("options"))
        .map(str::trim)
}

/// The `boot_partition` of autoboot.txt's `[all]` section (the committed one).
pub fn autoboot_committed(text: &str) -> Option<u32> {
    let mut section = "all".to_string();
    for l in text.lines() {
        let l = l.trim();
        if let Some(s) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_string();
        } else if section == "all" {
            if let Some(v) = l.strip_prefix("boot_partition=") {
                return v.trim().parse().ok();
            }
        }
    }
    None
}

/// config.txt with `os_prefix=` pointing at `slot`'s folder.
pub fn with_os_prefix(config_txt: &str, slot: Slot) -> String {
    let line = format!("os_prefix={}/", slot.as_str());
    let mut found = false;
    let mut out: Vec<String> = config_txt
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("os_prefix=") {
                found = true;
                line.clone()
            } else {
                l.to_string()
            }
        })
        .collect();
    if !found {
        out.push("[all]".into());
        out.push(line);
    }
    out.join("\n") + "\n"
}

/// A command line with its `root=` replaced.
pub fn with_root(cmdline: &str, root: &str) -> String {
    cmdline
        .split_whitespace()
        .map(|a| if a.starts_with("root=") { root } else { a })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden(name: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../builder/tests/golden/update")
            .join(name);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn r(s: &str) -> Release {
        Release::try_from(s).unwrap()
    }

    #[test]
    fn the_builder_and_the_node_write_the_same_boot_files() {
        let c = "root=PARTLABEL=clutch_2026.12.1 console=ttyS0,115200 rw panic=10";
        assert_eq!(
            syslinux_cfg(&r("2026.12.1"), c),
            golden("amd64-syslinux.cfg")
        );
        assert_eq!(autoboot_txt(2, 3), golden("rpi4-autoboot.txt"));
        assert_eq!(entry_options(&golden("amd64-loader-entry.conf")), Some(c));
    }

    #[test]
    fn entries_and_their_counters() {
        let e = entries([
            "clutch_1.conf",
            "clutch_10+1-1.conf",
            "clutch_2+0-2.conf",
            "other.conf",
            "clutch_3+2.conf",
        ]);
        let names: Vec<_> = e.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "clutch_10+1-1.conf",
                "clutch_3+2.conf",
                "clutch_2+0-2.conf",
                "clutch_1.conf"
            ]
        );
        assert!(e[0].on_trial() && !e[0].bad());
        assert!(e[2].bad());
        assert_eq!(e[3].tries_left, None);
        assert_eq!(e[0].bad_name(), "clutch_10+0-2.conf");
        assert_eq!(e[3].bad_name(), "clutch_1+0-1.conf");
    }

    #[test]
    fn pi_switches() {
        let a = autoboot_txt(3, 2);
        assert_eq!(autoboot_committed(&a), Some(3));
        assert_eq!(autoboot_committed(&autoboot_txt(2, 3)), Some(2));
        let c = "arm_64bit=1\nkernel=vmlinuz\n";
        let with = with_os_prefix(c, Slot::A);
        assert_eq!(with, "arm_64bit=1\nkernel=vmlinuz\n[all]\nos_prefix=a/\n");
        assert_eq!(
            with_os_prefix(&with, Slot::B),
            "arm_64bit=1\nkernel=vmlinuz\n[all]\nos_prefix=b/\n"
        );
        assert_eq!(
            with_root("console=x root=PARTUUID=1-02 rw", "root=PARTUUID=1-03"),
            "console=x root=PARTUUID=1-03 rw"
        );
        assert_eq!(Scheme::Tryboot.root_partition(Slot::B), 5);
        assert_eq!(Scheme::SystemdBoot.slot_of_partition(3), Some(Slot::B));
        assert_eq!(Scheme::Tryboot.boot_partition(Slot::A), Some(2));
        assert_eq!(Scheme::SystemdBoot.boot_partition(Slot::A), None);
    }
}
