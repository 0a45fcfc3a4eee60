//! Update coordination on k3s: Kubernetes `coordination.k8s.io/v1` Leases in `kube-system`
//! (the object kured's lease lock uses), taken and renewed with `kubectl replace` on the
//! version read (so two nodes cannot both take one), the quorum check from the control-plane
//! nodes' `Ready` condition, bad releases in a ConfigMap. Only tested at the command and
//! manifest level: no k3s binary can be had where clutch is tested.
//!
//! Leases: `clutch-update-voters` (one holder), `clutch-update-agent-<n>` for n below the
//! agent budget. A lease whose `renewTime` is older than its `leaseDurationSeconds` is free.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clutch_config::Release;
use serde_json::{Value, json};

use super::{BadRelease, Coordinator, Me, RolloutError, Ticket, Turn, safe_without_me};
use crate::engine::k3s::K3S_BIN;
use crate::id::Role;
use crate::sys::CommandRunner;

pub const NAMESPACE: &str = "kube-system";
pub const VOTERS: &str = "clutch-update-voters";
pub const BAD: &str = "clutch-bad-releases";

pub struct K3sCoordinator {
    pub runner: Arc<dyn CommandRunner>,
    /// Where manifests for `kubectl replace -f` are written (root only).
    pub scratch: PathBuf,
    pub ttl: Duration,
    pub agent_budget: usize,
    /// The clock (a parameter, so golden tests are stable).
    pub now: Arc<dyn Fn() -> SystemTime + Send + Sync>,
}

/// RFC 3339 with microseconds, UTC, as Kubernetes writes `MicroTime`.
pub fn micro_time(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

fn parse_micro_time(s: &str) -> Option<SystemTime> {
    // YYYY-MM-DDTHH:MM:SS(.ffffff)Z
    let (date, time) = s.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, dd) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<u64>());
    let (h, mi, se) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let micros: u64 = format!("{frac:0<6}")[..6].parse().ok()?;
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + mi * 60 + se;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros))
}

/// A Lease manifest held by `holder` (none: free), at `version` (none: create).
pub fn lease_manifest(
    name: &str,
    holder: Option<&str>,
    ttl: Duration,
    now: SystemTime,
    version: Option<&str>,
) -> Value {
    let mut meta = json!({"name": name, "namespace": NAMESPACE});
    if let Some(v) = version {
        meta["resourceVersion"] = json!(v);
    }
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": meta,
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": ttl.as_secs(),
            "acquireTime": micro_time(now),
            "renewTime": micro_time(now),
        }
    })
}

impl K3sCoordinator {
    fn kubectl(&self, args: &[&str]) -> Result<crate::sys::CmdOutput, RolloutError> {
        let mut a = vec!["kubectl".to_string()];
        a.extend(args.iter().map(|s| s.to_string()));
        self.runner
            .run(K3S_BIN, &a, &[])
            .map_err(|e| RolloutError::Command {
                command: format!("k3s kubectl {}", args.join(" ")),
                detail: e.to_string(),
            })
    }

    fn ok(&self, args: &[&str]) -> Result<String, RolloutError> {
        let out = self.kubectl(args)?;
        if out.ok() {
            Ok(out.stdout)
        } else {
            Err(RolloutError::Command {
                command: format!("k3s kubectl {}", args.join(" ")),
                detail: out.stderr.trim().to_string(),
            })
        }
    }

    /// The lease as stored: (holder if it still holds, resourceVersion); None if absent.
    fn read(&self, name: &str) -> Result<Option<(Option<String>, String)>, RolloutError> {
        let out = self.kubectl(&["get", "lease", "-n", NAMESPACE, name, "-o", "json"])?;
        if !out.ok() {
            if out.stderr.contains("NotFound") || out.stderr.contains("not found") {
                return Ok(None);
            }
            return Err(RolloutError::Command {
                command: format!("k3s kubectl get lease {name}"),
                detail: out.stderr.trim().to_string(),
            });
        }
        let v: Value = serde_json::from_str(&out.stdout).map_err(|e| RolloutError::Parse {
            what: "kubectl get lease",
            detail: e.to_string(),
        })?;
        let version = v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let spec = &v["spec"];
        let live = spec["renewTime"]
            .as_str()
            .and_then(parse_micro_time)
            .zip(spec["leaseDurationSeconds"].as_u64())
            .is_some_and(|(renew, ttl)| renew + Duration::from_secs(ttl) > (self.now)());
        let holder = spec["holderIdentity"]
            .as_str()
            .filter(|_| live)
            .map(str::to_string);
        Ok(Some((holder, version)))
    }

    /// Write the lease as held by `holder` (None: free) over `version` (None: create).
    fn write(
        &self,
        name: &str,
        holder: Option<&str>,
        version: Option<&str>,
    ) -> Result<bool, RolloutError> {
        let m = lease_manifest(name, holder, self.ttl, (self.now)(), version);
        let path = self.scratch.join(format!("{name}.json"));
        clutch_os::fs::write_atomic(&path, m.to_string().as_bytes(), 0o600).map_err(|e| {
            RolloutError::Command {
                command: format!("writing {}", path.display()),
                detail: e.to_string(),
            }
        })?;
        let verb = if version.is_some() {
            "replace"
        } else {
            "create"
        };
        let out = self.kubectl(&[verb, "-f", &path.display().to_string()])?;
        // Lost a race: someone else wrote the object first.
        if !out.ok() && (out.stderr.contains("Conflict") || out.stderr.contains("AlreadyExists")) {
            return Ok(false);
        }
        if !out.ok() {
            return Err(RolloutError::Command {
                command: format!("k3s kubectl {verb} -f {}", path.display()),
                detail: out.stderr.trim().to_string(),
            });
        }
        Ok(true)
    }

    /// Take lease `name` for `me` if it is free (or already ours).
    fn take(&self, name: &str, me: &str) -> Result<Option<String>, RolloutError> {
        match self.read(name)? {
            None => Ok(self.write(name, Some(me), None)?.then_some(String::new())),
            Some((Some(h), _)) if h != me => Ok(None),
            Some((_, v)) => Ok(self.write(name, Some(me), Some(&v))?.then_some(v)),
        }
    }

    /// The leases a ticket of `role` may hold.
    fn leases(&self, role: Role) -> Vec<String> {
        if role == Role::Server {
            vec![VOTERS.to_string()]
        } else {
            (0..self.agent_budget.max(1))
                .map(|n| format!("clutch-update-agent-{n}"))
                .collect()
        }
    }

    /// Writes every lease `t` holds as held by `holder` (renewed) or by nobody (given back).
    fn rewrite_held(&self, t: &Ticket, holder: Option<&str>) -> Result<(), RolloutError> {
        for name in self.leases(t.role) {
            if let Some((Some(h), v)) = self.read(&name)? {
                if h == t.lease {
                    self.write(&name, holder, Some(&v))?;
                }
            }
        }
        Ok(())
    }

    fn control_plane_ready(&self, me: &Me) -> Result<(usize, usize), RolloutError> {
        let out = self.ok(&[
            "get",
            "nodes",
            "-l",
            "node-role.kubernetes.io/control-plane=true",
            "-o",
            "json",
        ])?;
        let v: Value = serde_json::from_str(&out).map_err(|e| RolloutError::Parse {
            what: "kubectl get nodes",
            detail: e.to_string(),
        })?;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        let ready_others = items
            .iter()
            .filter(|n| n["metadata"]["name"].as_str() != Some(me.hostname.as_str()))
            .filter(|n| {
                n["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
            .count();
        Ok((items.len(), ready_others))
    }
}

impl Coordinator for K3sCoordinator {
    fn name(&self) -> &'static str {
        "k3s"
    }
    fn bad(&self, release: &Release) -> Result<Option<BadRelease>, RolloutError> {
        let out = self.kubectl(&["get", "configmap", "-n", NAMESPACE, BAD, "-o", "json"])?;
        if !out.ok() {
            return Ok(None);
        }
        let v: Value = serde_json::from_str(&out.stdout).map_err(|e| RolloutError::Parse {
            what: "kubectl get configmap",
            detail: e.to_string(),
        })?;
        match v["data"][release.as_str()].as_str() {
            None => Ok(None),
            Some(s) => serde_json::from_str(s)
                .map(Some)
                .map_err(|e| RolloutError::Parse {
                    what: "a bad-release entry",
                    detail: e.to_string(),
                }),
        }
    }
    fn enqueue(&self, me: &Me, role: Role, release: &Release) -> Result<Ticket, RolloutError> {
        Ok(Ticket {
            release: release.clone(),
            role,
            node: me.node_id.clone(),
            lease: me.hostname.to_string(),
            key: String::new(),
        })
    }
    fn turn(&self, me: &Me, t: &Ticket) -> Result<Turn, RolloutError> {
        let names = self.leases(t.role);
        for name in &names {
            if self.take(name, &t.lease)?.is_some() {
                if t.role != Role::Server {
                    return Ok(Turn::Go);
                }
                let (voters, ready_others) = self.control_plane_ready(me)?;
                return Ok(match safe_without_me(voters, ready_others) {
                    Ok(()) => Turn::Go,
                    Err(why) => Turn::Wait(why),
                });
            }
        }
        Ok(Turn::Wait(format!(
            "{} held by other nodes",
            names.join(", ")
        )))
    }
    fn keep(&self, t: &Ticket) -> Result<(), RolloutError> {
        // Renew whichever lease this node holds; a node that only waits holds none (a
        // Lease has no queue), so there is nothing to keep.
        self.rewrite_held(t, Some(&t.lease))
    }
    fn release(&self, t: &Ticket) -> Result<(), RolloutError> {
        self.rewrite_held(t, None)
    }
    fn mark_bad(&self, me: &Me, release: &Release, why: &str) -> Result<(), RolloutError> {
        let entry = serde_json::to_string(&BadRelease {
            node: me.node_id.clone(),
            hostname: me.hostname.clone(),
            why: why.chars().take(500).collect(),
        })
        .expect("serialises");
        let _ = self.kubectl(&["create", "configmap", "-n", NAMESPACE, BAD]);
        let patch = json!({"data": {release.as_str(): entry}}).to_string();
        self.ok(&[
            "patch",
            "configmap",
            "-n",
            NAMESPACE,
            BAD,
            "--type",
            "merge",
            "-p",
            &patch,
        ])
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clutch_os::cmd::CmdOutput;
    use clutch_os::cmd::fake::FakeRunner;

    const T0: u64 = 1_796_000_000;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn kubernetes_micro_times_round_trip() {
        let t = at(T0) + Duration::from_micros(123_456);
        let s = micro_time(t);
        assert_eq!(s, "2026-11-30T00:53:20.123456Z");
        assert_eq!(parse_micro_time(&s), Some(t));
        assert_eq!(micro_time(at(0)), "1970-01-01T00:00:00.000000Z");
        assert_eq!(micro_time(at(951_782_400)), "2000-02-29T00:00:00.000000Z");
    }

    fn me() -> Me {
        Me {
            node_id: "aa".parse().unwrap(),
            hostname: "node-a".try_into().unwrap(),
            addr: "10.0.0.1".parse().unwrap(),
        }
    }

    fn lease_json(holder: &str, renew: u64) -> String {
        format!(
            r#"{{"metadata":{{"name":"clutch-update-voters","resourceVersion":"41"}},"spec":{{"holderIdentity":"{holder}","leaseDurationSeconds":600,"renewTime":"{}"}}}}"#,
            micro_time(at(renew))
        )
    }

    fn nodes(ready: &[(&str, bool)]) -> String {
        let items: Vec<String> = ready
            .iter()
            .map(|(n, r)| {
                format!(
                    r#"{{"metadata":{{"name":"{n}"}},"status":{{"conditions":[{{"type":"Ready","status":"{}"}}]}}}}"#,
                    if *r { "True" } else { "False" }
                )
            })
            .collect();
        format!(r#"{{"items":[{}]}}"#, items.join(","))
    }

    fn coordinator(
        dir: &std::path::Path,
        answer: impl Fn(&str) -> CmdOutput + Send + Sync + 'static,
    ) -> (K3sCoordinator, Arc<FakeRunner>) {
        let r = Arc::new(FakeRunner::new(move |c| answer(&c.args[1..].join(" "))));
        (
            K3sCoordinator {
                runner: r.clone(),
                scratch: dir.to_path_buf(),
                ttl: Duration::from_secs(600),
                agent_budget: 1,
                now: Arc::new(|| at(T0)),
            },
            r,
        )
    }

    fn ticket(role: Role) -> Ticket {
        Ticket {
            release: "2".try_into().unwrap(),
            role,
            node: "aa".parse().unwrap(),
            lease: "node-a".into(),
            key: String::new(),
        }
    }

    #[test]
    fn a_voter_takes_a_free_or_expired_lease_over_its_version_then_checks_quorum() {
        let d = tempfile::tempdir().unwrap();
        let (c, r) = coordinator(d.path(), |a| {
            if a.starts_with("get lease") {
                CmdOutput::success(&lease_json("node-b", T0 - 601))
            } else if a.starts_with("get nodes") {
                CmdOutput::success(&nodes(&[
                    ("node-a", true),
                    ("node-b", true),
                    ("node-c", true),
                ]))
            } else {
                CmdOutput::success("")
            }
        });
        assert_eq!(c.turn(&me(), &ticket(Role::Server)).unwrap(), Turn::Go);
        let lines = r.lines();
        assert_eq!(
            lines[1],
            format!(
                "/usr/local/bin/k3s kubectl replace -f {}/clutch-update-voters.json",
                d.path().display()
            )
        );
        let m: Value = serde_json::from_str(
            &std::fs::read_to_string(d.path().join("clutch-update-voters.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            m,
            lease_manifest(
                VOTERS,
                Some("node-a"),
                Duration::from_secs(600),
                at(T0),
                Some("41")
            )
        );
        assert_eq!(m["spec"]["holderIdentity"], "node-a");
        assert_eq!(m["metadata"]["resourceVersion"], "41");
    }

    #[test]
    fn a_held_lease_a_lost_race_or_a_missing_quorum_means_wait() {
        let d = tempfile::tempdir().unwrap();
        let (c, _) = coordinator(d.path(), |_| {
            CmdOutput::success(&lease_json("node-b", T0 - 10))
        });
        assert!(matches!(
            c.turn(&me(), &ticket(Role::Server)).unwrap(),
            Turn::Wait(_)
        ));
        let (c, _) = coordinator(d.path(), |a| {
            if a.starts_with("get lease") {
                CmdOutput::failure(
                    "Error from server (NotFound): leases.coordination.k8s.io \"clutch-update-voters\" not found",
                )
            } else {
                CmdOutput::failure("Error from server (AlreadyExists): leases ... already exists")
            }
        });
        assert!(matches!(
            c.turn(&me(), &ticket(Role::Server)).unwrap(),
            Turn::Wait(_)
        ));
        let (c, _) = coordinator(d.path(), |a| {
            if a.starts_with("get lease") {
                CmdOutput::success(&lease_json("node-a", T0 - 10))
            } else if a.starts_with("get nodes") {
                CmdOutput::success(&nodes(&[
                    ("node-a", true),
                    ("node-b", true),
                    ("node-c", false),
                ]))
            } else {
                CmdOutput::success("")
            }
        });
        match c.turn(&me(), &ticket(Role::Server)).unwrap() {
            Turn::Wait(w) => assert!(w.contains("quorum at risk"), "{w}"),
            t => panic!("{t:?}"),
        }
    }

    #[test]
    fn bad_releases_are_a_configmap_entry() {
        let d = tempfile::tempdir().unwrap();
        let (c, r) = coordinator(d.path(), |_| CmdOutput::success(""));
        c.mark_bad(
            &me(),
            &"3".try_into().unwrap(),
            "did not reach ready in 900 s",
        )
        .unwrap();
        let lines = r.lines();
        assert_eq!(
            lines[0],
            "/usr/local/bin/k3s kubectl create configmap -n kube-system clutch-bad-releases"
        );
        assert!(lines[1].starts_with("/usr/local/bin/k3s kubectl patch configmap -n kube-system clutch-bad-releases --type merge -p {\"data\":{\"3\":"), "{}", lines[1]);
        let (c, _) = coordinator(d.path(), |_| {
            CmdOutput::success(
                r#"{"data":{"3":"{\"node\":\"bb\",\"hostname\":\"node-b\",\"why\":\"boot failed\"}"}}"#,
            )
        });
        assert_eq!(
            c.bad(&"3".try_into().unwrap()).unwrap().unwrap().why,
            "boot failed"
        );
        assert_eq!(c.bad(&"4".try_into().unwrap()).unwrap(), None);
    }
}
