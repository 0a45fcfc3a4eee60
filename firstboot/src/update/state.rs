//! What an update remembers across reboots (`/var/lib/clutch/update/state.json`, on the data
//! partition) and what it shows (`/run/clutch/update.json`, merged into `status.json`).

use std::path::{Path, PathBuf};

use clutch_config::Release;
use serde::{Deserialize, Serialize};

use crate::facts::Paths;
use crate::fsx;

/// The persistent state file (node path).
pub const STATE_FILE: &str = "/var/lib/clutch/update/state.json";
/// The live update status, next to status.json (node path).
pub const LIVE_FILE: &str = "/run/clutch/update.json";

/// An update that went down for a reboot and is not decided yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    pub release: Release,
    pub slot: String,
    pub from_release: Release,
    pub from_slot: String,
    /// Seconds since the epoch when the node went down for it.
    pub started: u64,
    /// Whatever the rollout coordinator handed out before the reboot (the cluster's
    /// ticket), kept across the reboot and handed back at commit or rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<serde_json::Value>,
    /// Why the release was given up, when a boot of it found out before rebooting (failed
    /// phase, health timeout); empty when it never got that far (panic, hang).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Written to the slot but not booted yet (the coordinator said wait).
    #[serde(default)]
    pub written_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Committed,
    RolledBack,
    Refused,
    Failed,
}

/// How the last update attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    pub result: Verdict,
    pub release: String,
    pub reason: String,
    pub at: u64,
}

/// A release that failed on this node: never tried again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bad {
    pub release: Release,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Outcome>,
    #[serde(default)]
    pub bad: Vec<Bad>,
}

impl UpdateState {
    pub fn load(paths: &Paths) -> Result<Self, String> {
        let p = paths.host(STATE_FILE);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("{}: {e}", p.display())),
        }
    }

    pub fn save(&self, paths: &Paths) -> Result<(), String> {
        let p = paths.host(STATE_FILE);
        let mut j = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        j.push(b'\n');
        fsx::write_atomic(&p, &j, 0o600).map_err(|e| format!("{}: {e}", p.display()))
    }

    pub fn bad(&self, r: &Release) -> Option<&Bad> {
        self.bad.iter().find(|b| &b.release == r)
    }

    pub fn mark_bad(&mut self, r: &Release, reason: &str) {
        if self.bad(r).is_none() {
            self.bad.push(Bad {
                release: r.clone(),
                reason: reason.to_string(),
            });
        }
    }
}

/// What `status.json` says about updates (its `update` key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    /// `idle`, `checking`, `up-to-date`, `available`, `downloading`, `writing`, `waiting`,
    /// `rebooting`, `trying`, `committed`, `rolled-back`, `refused`, `failed`.
    pub state: String,
    /// The release this is about (offered, being applied, failed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub release: String,
    /// Percent of the current download or write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The last outcome, for a node that was rolled back long ago.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Outcome>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scheme: String,
}

/// The update part of the live status: running release and slot, and the update.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Live {
    pub release: String,
    pub slot: String,
    pub update: UpdateStatus,
}

impl Live {
    pub fn path(paths: &Paths) -> PathBuf {
        paths.host(LIVE_FILE)
    }
    pub fn load(path: &Path) -> Option<Live> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut j = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        j.push(b'\n');
        fsx::write_atomic(path, &j, 0o644)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_a_round_trip_and_knows_bad_releases() {
        let d = tempfile::tempdir().unwrap();
        let p = Paths::new(d.path(), "/boot/efi");
        assert_eq!(UpdateState::load(&p).unwrap(), UpdateState::default());
        let mut s = UpdateState {
            pending: Some(Pending {
                release: "3".try_into().unwrap(),
                slot: "a".into(),
                from_release: "2".try_into().unwrap(),
                from_slot: "b".into(),
                started: 5,
                ticket: Some(serde_json::json!({"lease": "7"})),
                failure: None,
                written_only: false,
            }),
            ..Default::default()
        };
        s.mark_bad(&"3".try_into().unwrap(), "panic");
        s.mark_bad(&"3".try_into().unwrap(), "again");
        s.save(&p).unwrap();
        let back = UpdateState::load(&p).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.bad.len(), 1);
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(p.host(STATE_FILE)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
    }
}
