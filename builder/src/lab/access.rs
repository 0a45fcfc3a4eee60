//! Root access to lab nodes without anything in the user's image config.
//!
//! `lab up` makes two ed25519 key pairs in `DIR/access/` (mode 0700): a client key and a host
//! key. Each VM gets, as systemd credentials through SMBIOS type 11 (read from 0600 files, so
//! nothing secret is on a command line):
//! - `clutch.lab.authorized_keys`: the client's public key;
//! - `clutch.lab.host_key`: the host key's private half;
//! - `systemd.extra-unit.clutch-lab-ssh.service`: a unit that runs a second sshd on
//!   [`ACCESS_PORT`] with exactly that key and host key, root login by key only;
//! - `systemd.unit-dropin.multi-user.target`: `Wants=` that unit.
//!
//! systemd (>= 256; Debian trixie has 257) writes the last two into its generator folder at
//! boot (systemd-debug-generator) and hands the first two to the unit (`LoadCredential=`).
//! The image's own sshd is left alone: images built by clutch say `PermitRootLogin no`
//! (and may have `[ssh] enabled = false`), so systemd's `ssh.authorized_keys.root` credential
//! would give a key nobody can log in with. The host side pins the host key
//! (`StrictHostKeyChecking=yes` against `DIR/access/known_hosts`), so `lab exec` talks to the
//! lab's VM or fails; it runs `ssh` inside the lab's namespace, the only place the nodes'
//! addresses exist. Everything in `DIR/access/` goes with `lab down`.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::plan::{LabState, NodeSpec, argv};

/// The port of the lab's own sshd on every node.
pub const ACCESS_PORT: u16 = 2222;
/// The unit the credentials add.
pub const UNIT: &str = "clutch-lab-ssh.service";
/// Names of the credentials the unit loads.
pub const CRED_KEYS: &str = "clutch.lab.authorized_keys";
pub const CRED_HOST_KEY: &str = "clutch.lab.host_key";

/// The lab's key files (all under `DIR/access/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessFiles {
    pub dir: PathBuf,
    /// The client's private key (`.pub` beside it).
    pub client_key: PathBuf,
    /// The nodes' host key (private; `.pub` beside it).
    pub host_key: PathBuf,
    pub known_hosts: PathBuf,
    /// The name the host key is pinned under (every node shares the key).
    pub host_alias: String,
}

impl AccessFiles {
    pub fn in_dir(lab_dir: &Path, namespace: &str) -> AccessFiles {
        let dir = lab_dir.join("access");
        AccessFiles {
            client_key: dir.join("id_ed25519"),
            host_key: dir.join("host_ed25519"),
            known_hosts: dir.join("known_hosts"),
            host_alias: namespace.to_string(),
            dir,
        }
    }

    /// The credential files handed to every VM, in the order of [`credentials`].
    pub fn credential_files(&self) -> Vec<PathBuf> {
        (0..4)
            .map(|i| self.dir.join(format!("credential{i}.smbios")))
            .collect()
    }
}

/// `ssh-keygen` commands that make the two key pairs (the files must not exist yet).
pub fn keygen_cmds(a: &AccessFiles) -> Vec<Vec<String>> {
    [
        (&a.client_key, "clutch-lab-client"),
        (&a.host_key, "clutch-lab-host"),
    ]
    .into_iter()
    .map(|(f, comment)| {
        let mut v = argv(&[
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            comment,
            "-f",
        ]);
        v.push(f.display().to_string());
        v
    })
    .collect()
}

/// The unit that serves lab access. Its sshd ignores the image's `PermitRootLogin`,
/// `AuthorizedKeysFile` and host keys (command-line options come first, and sshd keeps the
/// first value it sees), writes no pidfile over the image's sshd's, and logs to the journal.
pub fn unit_text() -> String {
    format!(
        "# From `clutch lab up` (a systemd credential): root access for the lab, by the lab's key only.\n\
         [Unit]\n\
         Description=clutch lab access (sshd on port {ACCESS_PORT}, the lab's ephemeral key)\n\
         After=network.target\n\
         ConditionPathExists=/usr/sbin/sshd\n\
         \n\
         [Service]\n\
         LoadCredential={CRED_KEYS}\n\
         LoadCredential={CRED_HOST_KEY}\n\
         ExecStartPre=/usr/bin/mkdir -p -m 0755 /run/sshd\n\
         ExecStart=/usr/sbin/sshd -D -e -p {ACCESS_PORT} -h %d/{CRED_HOST_KEY} \
         -o AuthorizedKeysFile=%d/{CRED_KEYS} -o PermitRootLogin=prohibit-password \
         -o AuthenticationMethods=publickey -o PasswordAuthentication=no \
         -o KbdInteractiveAuthentication=no -o PidFile=none\n\
         Restart=always\n\
         RestartSec=2\n"
    )
}

/// `multi-user.target` pulls the unit in (generators do not read `[Install]`).
pub fn dropin_text() -> String {
    format!("[Unit]\nWants={UNIT}\n")
}

/// One systemd credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub name: String,
    pub value: Vec<u8>,
}

/// The credentials every lab VM gets, from the client's public key line and the host key's
/// private half.
pub fn credentials(client_pub: &str, host_private: &str) -> Vec<Credential> {
    let c = |name: &str, value: &str| Credential {
        name: name.to_string(),
        value: value.as_bytes().to_vec(),
    };
    vec![
        c(CRED_KEYS, &format!("{}\n", client_pub.trim())),
        c(CRED_HOST_KEY, host_private),
        c(&format!("systemd.extra-unit.{UNIT}"), &unit_text()),
        c("systemd.unit-dropin.multi-user.target", &dropin_text()),
    ]
}

/// The SMBIOS type 11 string of a credential (base64: any bytes, no QEMU option escaping).
pub fn credential_file_text(c: &Credential) -> String {
    format!(
        "io.systemd.credential.binary:{}={}",
        c.name,
        base64::engine::general_purpose::STANDARD.encode(&c.value)
    )
}

/// The known_hosts line that pins the nodes' host key under [`AccessFiles::host_alias`].
pub fn known_hosts_line(alias: &str, host_pub: &str) -> String {
    let mut f = host_pub.split_whitespace();
    let (kind, key) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
    format!("{alias} {kind} {key}\n")
}

/// One argument for a POSIX shell: as it is when it is plainly safe, else single-quoted.
pub fn shell_quote(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

/// How long to wait for a node's sshd to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SshOpts {
    pub connect_timeout_secs: u32,
}

impl Default for SshOpts {
    fn default() -> Self {
        SshOpts {
            connect_timeout_secs: 10,
        }
    }
}

/// `ssh` into node `n` as root from inside the lab's namespace, running `cmd` (each word
/// quoted, so the node's shell sees exactly these arguments; pass `sh -c SCRIPT` for a
/// pipeline). Its exit code is the command's, or 255 when ssh itself failed.
pub fn ssh_cmd(s: &LabState, n: &NodeSpec, cmd: &[String], o: SshOpts) -> Vec<String> {
    let a = &s.access;
    let mut v = argv(&[
        "ip",
        "netns",
        "exec",
        &s.namespace,
        "ssh",
        "-F",
        "/dev/null",
    ]);
    v.push("-i".into());
    v.push(a.client_key.display().to_string());
    for opt in [
        "IdentitiesOnly=yes".to_string(),
        "IdentityAgent=none".into(),
        "BatchMode=yes".into(),
        "StrictHostKeyChecking=yes".into(),
        format!("UserKnownHostsFile={}", a.known_hosts.display()),
        "GlobalKnownHostsFile=/dev/null".into(),
        format!("HostKeyAlias={}", a.host_alias),
        format!("ConnectTimeout={}", o.connect_timeout_secs),
        "ServerAliveInterval=5".into(),
        "ServerAliveCountMax=6".into(),
        "LogLevel=ERROR".into(),
    ] {
        v.push("-o".into());
        v.push(opt);
    }
    v.extend(argv(&[
        "-p",
        &ACCESS_PORT.to_string(),
        "-l",
        "root",
        &n.ip,
        "--",
    ]));
    v.push(
        cmd.iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" "),
    );
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::plan::plan;
    use crate::lab::vm::Accel;

    #[test]
    fn the_unit_gives_root_by_the_lab_key_only() {
        let u = unit_text();
        for want in [
            "-p 2222",
            "-h %d/clutch.lab.host_key",
            "-o AuthorizedKeysFile=%d/clutch.lab.authorized_keys",
            "-o PermitRootLogin=prohibit-password",
            "-o AuthenticationMethods=publickey",
            "-o PasswordAuthentication=no",
            "-o PidFile=none",
            "LoadCredential=clutch.lab.authorized_keys\n",
            "LoadCredential=clutch.lab.host_key\n",
        ] {
            assert!(u.contains(want), "{want} missing:\n{u}");
        }
        assert_eq!(dropin_text(), "[Unit]\nWants=clutch-lab-ssh.service\n");
    }

    #[test]
    fn credentials_are_base64_smbios_strings() {
        let c = credentials("ssh-ed25519 AAAA me\n", "-----BEGIN-----\nx\n");
        let names: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "clutch.lab.authorized_keys",
                "clutch.lab.host_key",
                "systemd.extra-unit.clutch-lab-ssh.service",
                "systemd.unit-dropin.multi-user.target"
            ]
        );
        let t = credential_file_text(&c[0]);
        let (head, b64) = t.split_once('=').unwrap();
        assert_eq!(
            head,
            "io.systemd.credential.binary:clutch.lab.authorized_keys"
        );
        let back = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(back, b"ssh-ed25519 AAAA me\n");
        assert!(!t.contains(',') && !t.contains('\n'));
    }

    #[test]
    fn ssh_runs_in_the_namespace_pinned_to_the_lab_host_key() {
        let s = plan(Path::new("/tmp/x"), Path::new("/i.img"), 2, 768, Accel::Tcg).unwrap();
        let cmd = ssh_cmd(
            &s,
            &s.nodes[1],
            &argv(&["etcdctl", "put", "k", "two words", "it's"]),
            SshOpts::default(),
        );
        assert_eq!(cmd[..4], ["ip", "netns", "exec", s.namespace.as_str()]);
        let j = cmd.join(" ");
        assert!(j.contains("-i /tmp/x/access/id_ed25519"), "{j}");
        assert!(j.contains("StrictHostKeyChecking=yes"), "{j}");
        assert!(
            j.contains("UserKnownHostsFile=/tmp/x/access/known_hosts"),
            "{j}"
        );
        assert!(j.contains(&format!("HostKeyAlias={}", s.namespace)), "{j}");
        assert!(j.contains("-p 2222 -l root 10.77.0.12 --"), "{j}");
        assert_eq!(cmd.last().unwrap(), "etcdctl put k 'two words' 'it'\\''s'");
        assert_eq!(
            known_hosts_line("lab", "ssh-ed25519 AAAAC3 clutch-lab-host\n"),
            "lab ssh-ed25519 AAAAC3\n"
        );
    }

    #[test]
    fn keys_are_made_without_a_passphrase_in_the_access_folder() {
        let a = AccessFiles::in_dir(Path::new("/tmp/x"), "ns");
        let k = keygen_cmds(&a);
        assert_eq!(k.len(), 2);
        assert!(
            k[0].join(" ")
                .ends_with("-N  -C clutch-lab-client -f /tmp/x/access/id_ed25519")
        );
        assert!(k[1].join(" ").ends_with("-f /tmp/x/access/host_ed25519"));
        assert_eq!(a.credential_files().len(), credentials("", "").len());
    }
}
