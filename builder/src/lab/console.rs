//! Reading a node's serial console log: the `clutch: phase=` lines clutch-firstboot prints on
//! every phase change, and the marker lines `lab start` writes between boots.

use clutch_config::Phase;

/// One `clutch: phase=... host=... role=... members=N [error="..."]` console line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseLine {
    /// `None` when the phase word is not one clutch knows.
    pub phase: Option<Phase>,
    pub host: String,
    pub role: String,
    pub members: Option<usize>,
    /// The reason a `failed` line gives.
    pub error: Option<String>,
    /// The whole line from `clutch: phase=` on.
    pub line: String,
}

/// Every `clutch: phase=` line of a console log, in order.
pub fn phase_lines(console: &str) -> Vec<PhaseLine> {
    console
        .split(['\n', '\r'])
        .filter_map(|l| {
            let i = l.find("clutch: phase=")?;
            let line: String = l[i..].chars().filter(|c| !c.is_control()).collect();
            let line = line.trim_end().to_string();
            let field = |k: &str| -> Option<String> {
                line.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                    .map(str::to_string)
            };
            let word = field("phase")?;
            let error = line
                .find(" error=\"")
                .map(|j| &line[j + " error=\"".len()..])
                .map(|e| e.strip_suffix('"').unwrap_or(e).to_string());
            Some(PhaseLine {
                phase: Phase::parse(&word),
                host: field("host").unwrap_or_default(),
                role: field("role").unwrap_or_default(),
                members: field("members").and_then(|m| m.parse().ok()),
                error,
                line,
            })
        })
        .collect()
}

/// Starts the line that `lab start` writes into a node's console log before powering the
/// node on again, so one log keeps every boot and readers can tell the boots apart.
pub const BOOT_MARKER: &str = "----- clutch lab: powered on again";

/// The marker line for node `name`'s `boot`-th power-on (2 for the first `lab start`).
pub fn boot_marker(name: &str, boot: usize) -> String {
    format!("\n{BOOT_MARKER}: {name} boot {boot} -----\n")
}

/// How many times the node in this console log was powered on (markers + 1).
pub fn boots(console: &str) -> usize {
    console.matches(BOOT_MARKER).count() + 1
}

/// The part of a console log that belongs to the latest power-on.
pub fn current_boot(console: &str) -> &str {
    match console.rfind(BOOT_MARKER) {
        Some(i) => &console[i..],
        None => console,
    }
}

/// The console log split into boots (the first power-on, then one per `lab start`), each
/// boot after the first starting with its marker line.
pub fn boots_of(text: &str) -> Vec<&str> {
    let mut cuts: Vec<usize> = text.match_indices(BOOT_MARKER).map(|(i, _)| i).collect();
    cuts.insert(0, 0);
    cuts.push(text.len());
    cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect()
}

/// The last `n` lines of `text`, without control characters other than newlines (a raw
/// console has escape sequences and carriage returns).
pub fn tail(text: &str, n: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.chars().filter(|c| !c.is_control()).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_lines_parse_the_console() {
        let log = "[  OK  ] Started foo\r\nclutch: phase=configuring host=lab-1 role=pending members=0\r\n\
                   noise clutch: phase=discovering host=lab-1 role=pending members=0\r\n\
                   clutch: phase=ready host=lab-1 role=server members=3\r\n\
                   clutch: phase=failed host=lab-1 role=none members=0 error=\"clutch.toml:3:1: bad key\"\n\
                   clutch: phase=dancing host=- role=- members=x\n";
        let v = phase_lines(log);
        assert_eq!(v.len(), 5);
        assert_eq!(v[1].phase, Some(Phase::Discovering));
        assert_eq!(
            v[1].line,
            "clutch: phase=discovering host=lab-1 role=pending members=0"
        );
        let r = &v[2];
        assert_eq!(
            (r.phase, r.host.as_str(), r.role.as_str(), r.members),
            (Some(Phase::Ready), "lab-1", "server", Some(3))
        );
        assert_eq!(r.error, None);
        assert_eq!(v[3].phase, Some(Phase::Failed));
        assert_eq!(v[3].error.as_deref(), Some("clutch.toml:3:1: bad key"));
        assert_eq!((v[4].phase, v[4].members), (None, None));
        assert!(phase_lines("nothing here\n").is_empty());
    }

    #[test]
    fn boots_split_at_the_marker() {
        let log = format!(
            "a\nclutch: phase=configuring host=lab-1 role=pending members=0\r\n\
             clutch: phase=joining host=lab-1 role=server members=2\n{}\
             clutch: phase=ready host=lab-1 role=server members=3\n{}booting\n",
            boot_marker("node1", 2),
            boot_marker("node1", 3)
        );
        let b = boots_of(&log);
        assert_eq!(b.len(), 3, "{b:?}");
        assert_eq!(b.concat(), log);
        assert_eq!(boots(&log), 3);
        assert_eq!(phase_lines(b[0]).len(), 2);
        assert_eq!(phase_lines(b[1])[0].phase, Some(Phase::Ready));
        assert!(phase_lines(current_boot(&log)).is_empty());
        assert_eq!(boots_of("no marker").len(), 1);
        assert_eq!(tail("a\nb\x1b[0m\nc", 2), "b[0m\nc");
    }
}
