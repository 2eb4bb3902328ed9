//! Who on this host may start sessions as which SQL user on a Unix-socket
//! listener (`[[listen]] peer_users`): the connecting process's OS user, from
//! SO_PEERCRED at accept, against a map of OS user → SQL users.
//!
//! The map is pure and part of the config snapshot; the uid's name is looked
//! up per session, only on listeners with `peer_users`: in `/etc/passwd`
//! first, then through NSS with `getent` (users that only NSS knows, such as
//! systemd's DynamicUser ones, which exist only while their service runs).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// How long a `getent passwd` lookup may take before the peer counts as unknown.
const GETENT_TIMEOUT: Duration = Duration::from_secs(2);

/// OS user (name, or uid in decimal) → the SQL users it may start sessions as.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerUsers {
    allowed: BTreeMap<String, BTreeSet<String>>,
}

/// The OS identity of a Unix-socket client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub uid: u32,
    /// `None` when no user database knows the uid.
    pub name: Option<String>,
}

impl PeerUsers {
    pub fn new(allowed: BTreeMap<String, Vec<String>>) -> Self {
        Self {
            allowed: allowed
                .into_iter()
                .map(|(os, sql)| (os, sql.into_iter().collect()))
                .collect(),
        }
    }

    /// Whether `peer` may start a session as SQL user `sql_user`. An entry
    /// may name the OS user or its uid.
    pub fn permits(&self, peer: &PeerIdentity, sql_user: &str) -> bool {
        let by_uid = self.allowed.get(&peer.uid.to_string());
        let by_name = peer.name.as_deref().and_then(|n| self.allowed.get(n));
        [by_uid, by_name]
            .into_iter()
            .flatten()
            .any(|users| users.contains(sql_user))
    }

    /// OS users named in the map, for `sqlgate check`.
    pub fn os_users(&self) -> impl Iterator<Item = &str> {
        self.allowed.keys().map(String::as_str)
    }
}

/// The name of `uid`: `/etc/passwd`, else `getent passwd` (NSS). `None` when
/// neither knows it (the peer is then allowed only by uid entries).
pub async fn user_name(uid: u32) -> Option<String> {
    if let Ok(passwd) = tokio::fs::read_to_string("/etc/passwd").await
        && let Some(name) = name_in_passwd(&passwd, uid)
    {
        return Some(name);
    }
    let lookup = tokio::process::Command::new("getent")
        .arg("passwd")
        .arg(uid.to_string())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(GETENT_TIMEOUT, lookup).await {
        Ok(Ok(out)) if out.status.success() => {
            name_in_passwd(&String::from_utf8_lossy(&out.stdout), uid)
        }
        Ok(Ok(_)) => None,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot run getent to name a Unix-socket peer");
            None
        }
        Err(_) => {
            tracing::warn!("getent passwd timed out naming a Unix-socket peer");
            None
        }
    }
}

/// The name on the `passwd(5)` line whose uid is `uid`.
fn name_in_passwd(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let line_uid = fields.nth(1)?;
        (line_uid.parse() == Ok(uid) && !name.is_empty()).then(|| name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> PeerUsers {
        PeerUsers::new(BTreeMap::from([
            ("www-data".to_owned(), vec!["app".to_owned()]),
            ("1001".to_owned(), vec!["report".to_owned()]),
        ]))
    }

    #[test]
    fn permits_mapped_os_users_only_as_their_sql_users() {
        let www = PeerIdentity {
            uid: 33,
            name: Some("www-data".into()),
        };
        let by_uid = PeerIdentity {
            uid: 1001,
            name: None,
        };
        let other = PeerIdentity {
            uid: 1002,
            name: Some("mallory".into()),
        };
        let cases = [
            (&www, "app", true),
            (&www, "report", false),
            (&by_uid, "report", true),
            (&by_uid, "app", false),
            (&other, "app", false),
        ];
        for (peer, user, expected) in cases {
            assert_eq!(map().permits(peer, user), expected, "{peer:?} as {user}");
        }
    }

    #[test]
    fn names_uids_from_passwd_lines() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      postgres:x:106:112::/var/lib/postgresql:/bin/sh\n\
                      broken\n";
        assert_eq!(name_in_passwd(passwd, 0).as_deref(), Some("root"));
        assert_eq!(name_in_passwd(passwd, 106).as_deref(), Some("postgres"));
        assert_eq!(name_in_passwd(passwd, 7), None);
    }
}
