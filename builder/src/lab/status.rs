//! One row of `clutch lab status` per node: the node's live `/run/clutch/status.json` (read
//! over the lab's access channel) when the node answers, else its latest console phase line,
//! and which of the two the row came from.

use clutch_config::Phase;
use serde::Serialize;

use super::console::PhaseLine;
use super::plan::NodeSpec;

/// Where a row's phase, role and members came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The node's `/run/clutch/status.json`, just read.
    StatusJson,
    /// The last `clutch: phase=` line of the node's current boot (the node did not answer);
    /// members are as of that line, which may be old.
    Console,
    /// Neither: the node printed no phase line in this boot and does not answer yet.
    None,
}

/// What a node's status.json says (the keys `lab status` shows; others are ignored, so a
/// newer clutch-firstboot's extra keys do not break an older `clutch`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Live {
    pub phase: Option<Phase>,
    pub hostname: String,
    pub role: String,
    pub members: Vec<String>,
    pub release: Option<String>,
    /// The root slot the node runs (`a`, `b`; A/B images only).
    pub slot: Option<String>,
    pub update: Option<LiveUpdate>,
    pub error: Option<String>,
}

/// The `update` object of status.json: what the node's last or current update is doing.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct LiveUpdate {
    /// `checking`, `waiting`, `rebooting`, `trying`, `committed`, `rolled-back`, `refused`, ...
    pub state: String,
    /// The release it is about.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub release: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// Parses `/run/clutch/status.json`.
pub fn parse_status_json(text: &str) -> Result<Live, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("status.json: {e}"))?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let phase_word = s("phase").ok_or("status.json: no `phase`")?;
    Ok(Live {
        phase: Phase::parse(&phase_word),
        hostname: s("hostname").unwrap_or_default(),
        role: s("role").unwrap_or_default(),
        members: v
            .get("members")
            .and_then(|m| m.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        release: s("release").filter(|r| !r.is_empty()),
        slot: s("slot").filter(|r| !r.is_empty()),
        update: v.get("update").and_then(|u| {
            let f = |k: &str| u.get(k).and_then(|x| x.as_str()).unwrap_or_default();
            (!f("state").is_empty()).then(|| LiveUpdate {
                state: f("state").to_string(),
                release: f("release").to_string(),
                reason: f("reason").to_string(),
            })
        }),
        error: s("error").filter(|e| !e.is_empty()),
    })
}

/// One node's row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub address: String,
    /// Its QEMU process is alive.
    pub running: bool,
    /// 1 for the first power-on, 2 after the first `lab start`, ...
    pub boot: usize,
    pub source: Source,
    pub phase: Option<Phase>,
    pub host: String,
    pub role: String,
    pub members: Option<usize>,
    /// Member host names (status.json only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub member_names: Vec<String>,
    pub release: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update: Option<LiveUpdate>,
    pub error: Option<String>,
    /// Why status.json could not be read, when the row comes from the console.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreachable: Option<String>,
}

impl NodeStatus {
    /// The row for `n` from what could be read: the live status when there is one, else the
    /// console line.
    pub fn new(
        n: &NodeSpec,
        running: bool,
        boot: usize,
        live: Result<Live, String>,
        console: Option<&PhaseLine>,
    ) -> NodeStatus {
        let mut r = NodeStatus {
            node: n.name.clone(),
            address: n.ip.clone(),
            running,
            boot,
            source: Source::None,
            phase: None,
            host: String::new(),
            role: String::new(),
            members: None,
            member_names: Vec::new(),
            release: None,
            slot: None,
            update: None,
            error: None,
            unreachable: None,
        };
        match (live, console) {
            (Ok(l), _) => {
                r.source = Source::StatusJson;
                r.phase = l.phase;
                r.host = l.hostname;
                r.role = l.role;
                r.members = Some(l.members.len());
                r.member_names = l.members;
                r.release = l.release;
                r.slot = l.slot;
                r.update = l.update;
                r.error = l.error;
            }
            (Err(why), Some(p)) => {
                r.source = Source::Console;
                r.phase = p.phase;
                r.host = p.host.clone();
                r.role = p.role.clone();
                r.members = p.members;
                r.error = p.error.clone();
                r.unreachable = Some(why);
            }
            (Err(why), None) => r.unreachable = Some(why),
        }
        r
    }

    /// One line of `clutch lab status`.
    pub fn line(&self) -> String {
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.to_string()
            }
        };
        let mut l = format!(
            "{}\t{}\t{}\tphase={} host={} role={} members={} release={} source={}",
            self.node,
            if self.running { "running" } else { "stopped" },
            self.address,
            self.phase.map(|p| p.as_str()).unwrap_or("(booting)"),
            dash(&self.host),
            dash(&self.role),
            self.members
                .map(|m| m.to_string())
                .unwrap_or_else(|| "-".into()),
            self.release.as_deref().unwrap_or("-"),
            match self.source {
                Source::StatusJson => "status.json",
                Source::Console => "console",
                Source::None => "-",
            }
        );
        if let Some(slot) = &self.slot {
            l += &format!(" slot={slot}");
        }
        if let Some(u) = &self.update {
            l += &format!(" update={}", u.state);
            if !u.release.is_empty() {
                l += &format!("({})", u.release);
            }
        }
        if let Some(e) = &self.error {
            l += &format!(" error=\"{e}\"");
        }
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::console::phase_lines;
    use crate::lab::plan::plan;
    use crate::lab::vm::Accel;
    use std::path::Path;

    const LIVE: &str = r#"{"phase":"ready","hostname":"lab-aaaaaa","node_id":"0123","role":"server",
        "leader":"lab-aaaaaa","members":["lab-aaaaaa","lab-bbbbbb","lab-cccccc"],"storage":[],
        "release":"2026.12.1","error":null,"future_key":{"x":1}}"#;

    #[test]
    fn status_json_wins_over_the_stale_console_line() {
        let s = plan(Path::new("/x"), Path::new("/i.img"), 1, 768, Accel::Tcg).unwrap();
        let console = phase_lines("clutch: phase=ready host=lab-aaaaaa role=server members=1\n");
        let r = NodeStatus::new(
            &s.nodes[0],
            true,
            1,
            parse_status_json(LIVE),
            console.last(),
        );
        assert_eq!(r.source, Source::StatusJson);
        assert_eq!(r.members, Some(3));
        assert_eq!(r.release.as_deref(), Some("2026.12.1"));
        assert_eq!(
            r.line(),
            "node0\trunning\t10.77.0.11\tphase=ready host=lab-aaaaaa role=server members=3 release=2026.12.1 source=status.json"
        );
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["source"], "status_json");
        assert_eq!(j["phase"], "ready");
        assert_eq!(j["members"], 3);
        assert_eq!(j["member_names"][2], "lab-cccccc");
        assert!(j.get("slot").is_none() && j.get("update").is_none(), "{j}");

        // An A/B node: its slot and what its update is doing.
        let ab = LIVE.replace(
            r#""error":null"#,
            r#""slot":"b","update":{"state":"refused","release":"3","reason":"release 3 was found bad by lab-bbbbbb","progress":null},"error":null"#,
        );
        let r = NodeStatus::new(&s.nodes[0], true, 1, parse_status_json(&ab), None);
        assert!(
            r.line()
                .ends_with("source=status.json slot=b update=refused(3)"),
            "{}",
            r.line()
        );
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["slot"], "b");
        assert_eq!(j["update"]["state"], "refused");
        assert_eq!(
            j["update"]["reason"],
            "release 3 was found bad by lab-bbbbbb"
        );

        // Unreachable: the console line, said so.
        let r = NodeStatus::new(
            &s.nodes[0],
            true,
            2,
            Err("ssh: connect timed out".into()),
            console.last(),
        );
        assert_eq!((r.source, r.members), (Source::Console, Some(1)));
        assert!(r.line().ends_with("source=console"), "{}", r.line());
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["unreachable"], "ssh: connect timed out");
        let r = NodeStatus::new(&s.nodes[0], false, 1, Err("off".into()), None);
        assert_eq!((r.source, r.phase), (Source::None, None));
        assert!(r.line().contains("stopped\t10.77.0.11\tphase=(booting)"));
    }

    #[test]
    fn status_json_errors_and_failed_nodes() {
        let l = parse_status_json(
            r#"{"phase":"failed","hostname":"","role":"none","members":[],"error":"clutch.toml:4:1: unknown key `bogus`"}"#,
        )
        .unwrap();
        assert_eq!(l.phase, Some(Phase::Failed));
        assert_eq!(
            l.error.as_deref(),
            Some("clutch.toml:4:1: unknown key `bogus`")
        );
        assert_eq!(l.release, None);
        assert_eq!((l.slot, l.update), (None, None));
        assert!(parse_status_json("{").is_err());
        assert!(parse_status_json("{}").unwrap_err().contains("phase"));
    }
}
