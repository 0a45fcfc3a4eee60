//! Fault injection for power-cut tests: with the systemd credential `clutch.hold` set to one
//! of the [`HoldPoint`]s, the plan gets an [`crate::plan::Action::Hold`] at that point, and
//! the real [`crate::sys::Sys`] prints `clutch: hold=<point>` on the consoles and sleeps
//! forever there, so a test can cut the power (kill QEMU) at a known place. Without the
//! credential nothing changes.
//!
//! The unit imports it (`ImportCredential=clutch.hold`); QEMU passes it with
//! `-smbios type=11,value=io.systemd.credential:clutch.hold=grow`.

use std::fmt;
use std::io;
use std::path::Path;

/// The credential's name.
pub const CREDENTIAL: &str = "clutch.hold";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldPoint {
    /// In the identity step, after the node id (and machine id, host keys) are written,
    /// before the host name is written and set.
    Hostname,
    /// In the root grow, after the partition table is grown, before the file system is.
    Grow,
    /// In loop setup, after the backing file is made (or extended), before it is attached
    /// and `/dev/clutch/<name>` points at it.
    Loop,
}

impl HoldPoint {
    pub const ALL: [HoldPoint; 3] = [HoldPoint::Hostname, HoldPoint::Grow, HoldPoint::Loop];

    pub fn as_str(self) -> &'static str {
        match self {
            HoldPoint::Hostname => "hostname",
            HoldPoint::Grow => "grow",
            HoldPoint::Loop => "loop",
        }
    }

    /// The console line printed when holding.
    pub fn console_line(self) -> String {
        format!("clutch: hold={self}")
    }

    /// Parses a credential value (surrounding white space ignored).
    pub fn parse(s: &str) -> Result<HoldPoint, String> {
        let t = s.trim();
        HoldPoint::ALL
            .into_iter()
            .find(|p| p.as_str() == t)
            .ok_or_else(|| {
                format!(
                    "credential {CREDENTIAL}: unknown hold point `{t}` (one of: {})",
                    HoldPoint::ALL.map(HoldPoint::as_str).join(", ")
                )
            })
    }
}

impl fmt::Display for HoldPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reads credential `name` from `dir` (`$CREDENTIALS_DIRECTORY`); `None` when there is no
/// directory or no such credential.
pub fn read_credential(dir: Option<&Path>, name: &str) -> io::Result<Option<String>> {
    let Some(dir) = dir else {
        return Ok(None);
    };
    let p = dir.join(name);
    match std::fs::read(&p) {
        Ok(b) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", p.display()))),
    }
}

/// The hold point asked for through `sys`, if any. A credential that cannot be read or
/// names no hold point is logged and ignored: fault injection never breaks a node.
pub fn requested(sys: &dyn crate::sys::Sys) -> Option<HoldPoint> {
    match sys.credential(CREDENTIAL) {
        Ok(None) => None,
        Ok(Some(v)) => match HoldPoint::parse(&v) {
            Ok(p) => {
                tracing::warn!("fault injection: will hold at `{p}` ({CREDENTIAL})");
                Some(p)
            }
            Err(e) => {
                tracing::warn!("{e}; ignored");
                None
            }
        },
        Err(e) => {
            tracing::warn!("credential {CREDENTIAL}: {e}; ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::FakeSys;

    #[test]
    fn parse_names_and_rejects_others() {
        assert_eq!(HoldPoint::parse("grow\n"), Ok(HoldPoint::Grow));
        assert_eq!(HoldPoint::parse(" hostname "), Ok(HoldPoint::Hostname));
        assert_eq!(HoldPoint::parse("loop"), Ok(HoldPoint::Loop));
        let e = HoldPoint::parse("cluster").unwrap_err();
        assert!(
            e.contains("`cluster`") && e.contains("hostname, grow, loop"),
            "{e}"
        );
        assert_eq!(HoldPoint::Loop.console_line(), "clutch: hold=loop");
    }

    #[test]
    fn credential_is_read_from_the_directory() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_credential(None, CREDENTIAL).unwrap(), None);
        assert_eq!(read_credential(Some(d.path()), CREDENTIAL).unwrap(), None);
        std::fs::write(d.path().join(CREDENTIAL), "loop").unwrap();
        assert_eq!(
            read_credential(Some(d.path()), CREDENTIAL).unwrap(),
            Some("loop".into())
        );
    }

    #[test]
    fn requested_through_the_fake() {
        assert_eq!(requested(&FakeSys::new()), None);
        let s = FakeSys::new().with_credential(CREDENTIAL, "grow\n");
        assert_eq!(requested(&s), Some(HoldPoint::Grow));
        let s = FakeSys::new().with_credential(CREDENTIAL, "nonsense");
        assert_eq!(requested(&s), None, "unknown points are ignored");
    }
}
