//! The user-name rule, one for `clutch check`, the builder and clutch-firstboot: whether the
//! configured `[user] name` can be a login user of a Debian root filesystem, decided from
//! that tree's `/etc/passwd` and `/etc/group`.
//!
//! - A name that a *system user* has (root, daemon, www-data, _apt, nobody, sshd,
//!   messagebus, etcd, ...: any uid outside Debian's 1000..=60000 range for people) is
//!   refused: useradd would fail, and an existing system account must never get keys,
//!   a shell or sudo.
//! - A name that only a *group* has (operator, staff, users, backup, video, ...) is given to
//!   a new user whose primary group is `users` (gid 100, Debian's group for people; Debian's
//!   useradd default). The user is not put into the same-named group: membership in
//!   `operator`, `staff`, `src`, `sasl`, ... grants access that nobody asked for.
//! - Names of privileged groups (root, adm, tty, disk, kmem, shadow, sudo, utmp,
//!   systemd-journal) are refused outright, so no script that does `chown $USER:$USER` or
//!   `usermod -aG $USER` hands them out; so are names starting with `_` or `systemd-`, which
//!   Debian and systemd keep for system accounts that packages create.
//!
//! `clutch check` has no root filesystem: it asks base-passwd's tables (copied from trixie's
//! base-passwd 3.6.7: `data/base-passwd/`, /usr/share/base-passwd/{passwd,group}.master)
//! together with the accounts that the packages of clutch's own trixie image add
//! (`data/image-accounts/`, taken from a real build). The builder asks the staged root
//! filesystem after its packages are installed, and firstboot the node's own files; they
//! have the final word.

use std::fmt;
use std::ops::RangeInclusive;

use crate::types::UserName;

const BASE_PASSWD: &str = include_str!("../data/base-passwd/passwd.master");
const BASE_GROUP: &str = include_str!("../data/base-passwd/group.master");
const IMAGE_PASSWD: &str = include_str!("../data/image-accounts/passwd");
const IMAGE_GROUP: &str = include_str!("../data/image-accounts/group");

/// Debian's login.defs: uids of people (UID_MIN..=UID_MAX); every other uid is a system one.
pub const LOGIN_UIDS: RangeInclusive<u32> = 1000..=60000;

/// Groups whose members read secrets or logs, write to others' terminals, or are root in
/// all but name.
pub const PRIVILEGED_GROUPS: &[&str] = &[
    "root",
    "adm",
    "tty",
    "disk",
    "kmem",
    "shadow",
    "sudo",
    "utmp",
    "systemd-journal",
];

/// Prefixes Debian (`_apt`, `_ssh`) and systemd (`systemd-network`) keep for system accounts.
pub const RESERVED_PREFIXES: &[&str] = &["_", "systemd-"];

/// The primary group of a user whose name a group already has.
pub const SHARED_GROUP: &str = "users";

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub gecos: String,
    pub home: String,
}

impl PasswdEntry {
    pub fn is_system(&self) -> bool {
        !LOGIN_UIDS.contains(&self.uid)
    }
}

fn records(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
}

/// The entries of an `/etc/passwd` text (lines that do not parse are skipped).
pub fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry> + '_ {
    records(passwd).filter_map(|f| {
        if f.len() < 7 {
            return None;
        }
        Some(PasswdEntry {
            name: f[0].to_string(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            gecos: f[4].to_string(),
            home: f[5].to_string(),
        })
    })
}

/// `name`'s entry in an `/etc/passwd` text.
pub fn find_user(passwd: &str, name: &str) -> Option<PasswdEntry> {
    passwd_entries(passwd).find(|e| e.name == name)
}

/// The group names of an `/etc/group` text.
pub fn group_names(group: &str) -> impl Iterator<Item = &str> {
    records(group).filter(|f| f.len() >= 3).map(|f| f[0])
}

/// How the login user comes to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Account {
    /// Nothing has the name: a new user with a group of its own.
    New,
    /// Only a group has the name: a new user whose primary group is [`SHARED_GROUP`].
    NewInSharedGroup,
    /// A login user of that name is there already (made by the builder, or at an earlier
    /// boot): it is used as it is.
    Existing(PasswdEntry),
}

impl Account {
    /// useradd's options for the user's primary group (none for an existing user).
    pub fn useradd_group_args(&self) -> &'static [&'static str] {
        match self {
            Account::New => &["--user-group"],
            Account::NewInSharedGroup => &["--no-user-group", "--gid", SHARED_GROUP],
            Account::Existing(_) => &[],
        }
    }

    /// What happens, for a person: `clutch check`'s note, the build log.
    pub fn describe(&self, name: &str) -> String {
        match self {
            Account::New => format!("`{name}` is free: a new user with its own group `{name}`"),
            Account::NewInSharedGroup => format!(
                "a group `{name}` exists already: the new user `{name}` gets primary group \
                 `{SHARED_GROUP}` and is not a member of `{name}`"
            ),
            Account::Existing(e) => format!("`{name}` is already a login user (uid {})", e.uid),
        }
    }
}

/// Why a name cannot be the login user, and one that can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameRejected {
    pub name: String,
    pub reason: Reason,
    /// A name the same tree accepts for a new user.
    pub instead: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    SystemUser {
        uid: u32,
        gecos: String,
    },
    PrivilegedGroup,
    /// Starts with one of [`RESERVED_PREFIXES`].
    Reserved(&'static str),
    /// Only a group has the name, and the tree has no [`SHARED_GROUP`] group to put the
    /// user in instead.
    NoSharedGroup,
}

impl fmt::Display for NameRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = &self.name;
        match &self.reason {
            Reason::SystemUser { uid, gecos } => {
                write!(f, "`{name}` is a system account (uid {uid}")?;
                if !gecos.is_empty() && gecos != name {
                    write!(f, ", \"{gecos}\"")?;
                }
                write!(f, "), not a name for a login user")?;
            }
            Reason::PrivilegedGroup => write!(
                f,
                "`{name}` is a privileged group; a login user of that name invites handing its \
                 rights out by accident"
            )?,
            Reason::Reserved(prefix) => write!(
                f,
                "`{name}` starts with `{prefix}`, which Debian and systemd keep for system accounts"
            )?,
            Reason::NoSharedGroup => write!(
                f,
                "a group `{name}` exists and this root filesystem has no `{SHARED_GROUP}` group \
                 to make the user's primary group"
            )?,
        }
        write!(f, "; choose another, such as `{}`", self.instead)
    }
}

impl std::error::Error for NameRejected {}

/// The rule, given a tree's `/etc/passwd` and `/etc/group` texts.
pub fn decide(name: &UserName, passwd: &str, group: &str) -> Result<Account, NameRejected> {
    verdict(name.as_str(), passwd, group).map_err(|reason| NameRejected {
        name: name.to_string(),
        reason,
        instead: suggestion(passwd, group),
    })
}

/// The rule without a root filesystem (`clutch check`): base-passwd's tables and the
/// accounts of clutch's own trixie image.
pub fn decide_without_root(name: &UserName) -> Result<Account, NameRejected> {
    decide(
        name,
        &format!("{BASE_PASSWD}{IMAGE_PASSWD}"),
        &format!("{BASE_GROUP}{IMAGE_GROUP}"),
    )
}

/// Every user and group name in base-passwd's tables (trixie), users first.
pub fn base_passwd_names() -> Vec<String> {
    let mut v: Vec<String> = passwd_entries(BASE_PASSWD).map(|e| e.name).collect();
    v.extend(group_names(BASE_GROUP).map(str::to_string));
    v
}

fn verdict(name: &str, passwd: &str, group: &str) -> Result<Account, Reason> {
    if let Some(p) = RESERVED_PREFIXES.iter().find(|p| name.starts_with(*p)) {
        return Err(Reason::Reserved(p));
    }
    if PRIVILEGED_GROUPS.contains(&name) {
        return Err(Reason::PrivilegedGroup);
    }
    if let Some(e) = find_user(passwd, name) {
        return if e.is_system() {
            Err(Reason::SystemUser {
                uid: e.uid,
                gecos: e.gecos,
            })
        } else {
            Ok(Account::Existing(e))
        };
    }
    let has_group = |g: &str| group_names(group).any(|n| n == g);
    if !has_group(name) {
        return Ok(Account::New);
    }
    if has_group(SHARED_GROUP) {
        Ok(Account::NewInSharedGroup)
    } else {
        Err(Reason::NoSharedGroup)
    }
}

/// A name the rule accepts for a new user in this tree.
fn suggestion(passwd: &str, group: &str) -> String {
    ["admin", "clutch-admin", "node-admin"]
        .into_iter()
        .find(|n| matches!(verdict(n, passwd, group), Ok(Account::New)))
        .unwrap_or("admin")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> UserName {
        UserName::try_from(s).unwrap()
    }

    #[test]
    fn base_passwd_tables_are_trixies() {
        let users: Vec<_> = passwd_entries(BASE_PASSWD).map(|e| e.name).collect();
        assert_eq!(users.len(), 18, "{users:?}");
        assert!(
            users.iter().all(|u| u != "gnats"),
            "gnats left base-passwd in 3.6"
        );
        assert_eq!(group_names(BASE_GROUP).count(), 38);
        assert!(passwd_entries(BASE_PASSWD).all(|e| e.is_system()));
        assert!(passwd_entries(IMAGE_PASSWD).all(|e| e.is_system()));
        assert_eq!(base_passwd_names().len(), 18 + 38);
    }

    #[test]
    fn system_users_are_refused_with_another_name() {
        for n in [
            "daemon",
            "www-data",
            "nobody",
            "sshd",
            "messagebus",
            "etcd",
            "backup",
        ] {
            let e = decide_without_root(&name(n)).unwrap_err();
            assert!(matches!(e.reason, Reason::SystemUser { .. }), "{n}: {e}");
            let m = e.to_string();
            assert!(
                m.contains("system account") && m.contains("such as `admin`"),
                "{m}"
            );
        }
        let m = decide_without_root(&name("messagebus"))
            .unwrap_err()
            .to_string();
        assert!(m.contains("\"System Message Bus\""), "{m}");
    }

    #[test]
    fn group_only_names_get_the_users_group() {
        for n in [
            "operator", "staff", "users", "video", "plugdev", "nogroup", "kvm", "src",
        ] {
            let a = decide_without_root(&name(n)).unwrap();
            assert_eq!(a, Account::NewInSharedGroup, "{n}");
            assert_eq!(
                a.useradd_group_args(),
                ["--no-user-group", "--gid", "users"]
            );
        }
        let a = decide_without_root(&name("alice")).unwrap();
        assert_eq!(a, Account::New);
        assert_eq!(a.useradd_group_args(), ["--user-group"]);
    }

    #[test]
    fn privileged_and_reserved_names_are_refused() {
        for n in PRIVILEGED_GROUPS.iter().filter(|n| **n != "root") {
            let e = decide(&name(n), "", "").unwrap_err();
            assert!(
                matches!(e.reason, Reason::PrivilegedGroup | Reason::Reserved(_)),
                "{n}: {e}"
            );
        }
        let e = decide(&name("systemd-foo"), "", "").unwrap_err();
        assert!(e.to_string().contains("starts with `systemd-`"), "{e}");
        assert!(decide(&name("_me"), "", "").is_err());
    }

    #[test]
    fn an_existing_login_user_is_used() {
        let p = "root:x:0:0:root:/root:/bin/bash\npi:x:1000:1000::/home/pi:/bin/bash\n";
        match decide(&name("pi"), p, "pi:x:1000:\n").unwrap() {
            Account::Existing(e) => assert_eq!((e.uid, e.home.as_str()), (1000, "/home/pi")),
            a => panic!("{a:?}"),
        }
        // A uid beyond UID_MAX (nobody's 65534) is a system one.
        let p = "nfs:x:65533:65533::/:/bin/false\n";
        assert!(decide(&name("nfs"), p, "").is_err());
    }

    #[test]
    fn no_users_group_means_no_place_for_a_group_only_name() {
        let e = decide(&name("operator"), "", "operator:x:37:\n").unwrap_err();
        assert_eq!(e.reason, Reason::NoSharedGroup, "{e}");
    }

    #[test]
    fn the_suggestion_is_itself_accepted() {
        let p = "admin:x:5:5::/:/usr/sbin/nologin\n";
        let e = decide(&name("daemon"), &format!("daemon:x:1:1::/:/x\n{p}"), "").unwrap_err();
        assert!(e.to_string().contains("such as `clutch-admin`"), "{e}");
    }
}
