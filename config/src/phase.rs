//! The phases a node goes through: the `phase` of `/run/clutch/status.json` and of the
//! `clutch: phase=...` console line (SPEC). clutch-firstboot reports `configuring` while it
//! sets the node up; the cluster code moves it through the others.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Configuring,
    Discovering,
    Bootstrapping,
    Joining,
    Ready,
    Failed,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Configuring,
        Phase::Discovering,
        Phase::Bootstrapping,
        Phase::Joining,
        Phase::Ready,
        Phase::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Configuring => "configuring",
            Phase::Discovering => "discovering",
            Phase::Bootstrapping => "bootstrapping",
            Phase::Joining => "joining",
            Phase::Ready => "ready",
            Phase::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_json() {
        for p in Phase::ALL {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
        }
        assert_eq!(Phase::parse("Ready"), None);
    }
}
