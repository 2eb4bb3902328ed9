//! The `auth_file` (`[pool] auth_file`), in PgBouncer's userlist format:
//! one user per line, `"user" "secret"`, each field in double quotes, `""`
//! for a quote inside a field, anything after the second field ignored;
//! blank lines and lines starting with `;` or `#` are comments.
//!
//! The secret is either
//! - a SCRAM secret, `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`:
//!   PostgreSQL's `pg_authid.rolpassword` and CockroachDB's
//!   `system.users."hashedPassword"` hold it in this same form. Server
//!   sessions then use the ClientKey recovered from the client's proof, which
//!   works only while the cluster holds the identical secret; or
//! - a password: sqlgate derives its own SCRAM secret for clients (random
//!   salt, 4096 iterations) and logs in to the cluster with the password.
//!
//! Skipped with a warning (the user is not pooled; its sessions pass
//! through): md5 hashes (`md5` + 32 hex digits: no SCRAM with clients can be
//! checked against them, and CockroachDB has no md5), bcrypt hashes
//! (`$2a$`…, CockroachDB's older `hashedPassword` form) and empty secrets.
//! A secret that starts like a SCRAM secret but is malformed is an error, not
//! a password. Errors and warnings name the file and line, never the secret.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::scram_client::Credential;
use super::secret::{ClientKey, Password, SCRAM_PREFIX, ScramSecret};

/// An `auth_file` that cannot be used: the file, the line when known, and
/// what is wrong (shown as `file:line: message`, as config errors are).
#[derive(Debug, thiserror::Error)]
pub struct UserlistError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for UserlistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.path.display(), line, self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

/// Why a user in the file is not pooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skipped {
    Md5,
    Bcrypt,
    Empty,
}

impl Skipped {
    fn reason(self) -> &'static str {
        match self {
            Skipped::Md5 => {
                "has an md5 hash; sqlgate pools only users with a SCRAM-SHA-256 secret or a password"
            }
            Skipped::Bcrypt => {
                "has a bcrypt hash; set a SCRAM-SHA-256 password on the cluster and copy its secret"
            }
            Skipped::Empty => "has an empty secret",
        }
    }
}

/// A user the file names but sqlgate cannot pool, with where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserlistWarning {
    pub path: PathBuf,
    pub line: usize,
    pub user: String,
    pub skipped: Skipped,
}

impl fmt::Display for UserlistWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: user {:?} {}: not pooled",
            self.path.display(),
            self.line,
            self.user,
            self.skipped.reason()
        )
    }
}

/// What the file holds for one user.
#[derive(Clone, Debug)]
pub enum UserSecret {
    /// The cluster's SCRAM secret.
    Scram(ScramSecret),
    /// A password, and the secret sqlgate derived from it for clients.
    Password {
        password: Password,
        derived: ScramSecret,
    },
}

/// One pooled user.
#[derive(Clone, Debug)]
pub struct UserEntry {
    pub line: usize,
    pub secret: UserSecret,
}

impl UserEntry {
    /// The secret clients are checked against ([`super::ScramServer::new`]).
    pub fn client_secret(&self) -> &ScramSecret {
        match &self.secret {
            UserSecret::Scram(secret) => secret,
            UserSecret::Password { derived, .. } => derived,
        }
    }

    /// How server sessions log in, given the ClientKey recovered from this
    /// user's client: with it (and the file's secret) for a SCRAM entry, with
    /// the password for a password entry.
    pub fn upstream_credential(&self, client_key: ClientKey) -> Credential {
        match &self.secret {
            UserSecret::Scram(secret) => Credential::ClientKey {
                client_key,
                secret: secret.clone(),
            },
            UserSecret::Password { password, .. } => Credential::Password(password.clone()),
        }
    }
}

/// The parsed `auth_file`.
#[derive(Clone, Debug, Default)]
pub struct Userlist {
    users: HashMap<String, UserEntry>,
    skipped: HashMap<String, Skipped>,
    warnings: Vec<UserlistWarning>,
}

impl Userlist {
    /// Reads and parses `path`. Passwords cost one PBKDF2 run each (4096
    /// iterations): call it off the async workers.
    ///
    /// # Errors
    /// A [`UserlistError`] naming the file (and line) of the first problem.
    pub fn load(path: &Path) -> Result<Userlist, UserlistError> {
        let text = std::fs::read_to_string(path).map_err(|e| UserlistError {
            path: path.to_owned(),
            line: None,
            message: format!("cannot read auth_file: {e}"),
        })?;
        Userlist::parse(&text, path)
    }

    /// Parses the file's `text`; `path` is for messages.
    ///
    /// # Errors
    /// A [`UserlistError`] naming the file and line of the first problem.
    pub fn parse(text: &str, path: &Path) -> Result<Userlist, UserlistError> {
        let mut list = Userlist::default();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let err = |message: String| UserlistError {
                path: path.to_owned(),
                line: Some(line),
                message,
            };
            let trimmed = raw.trim_start_matches([' ', '\t']);
            if trimmed.trim().is_empty() || trimmed.starts_with([';', '#']) {
                continue;
            }
            let (user, rest) = quoted(trimmed).map_err(|e| err(format!("user name: {e}")))?;
            if user.is_empty() {
                return Err(err("empty user name".into()));
            }
            let rest = rest.trim_start_matches([' ', '\t']);
            if rest.is_empty() {
                return Err(err(format!(
                    "user {user:?} has no secret (expected \"user\" \"secret\")"
                )));
            }
            let (secret, _ignored) =
                quoted(rest).map_err(|e| err(format!("secret of user {user:?}: {e}")))?;
            if let Some(first) = seen.insert(user.clone(), line) {
                return Err(err(format!(
                    "user {user:?} is listed twice (first on line {first})"
                )));
            }
            match classify(&secret) {
                Kind::Scram => {
                    let parsed = ScramSecret::parse(&secret).map_err(|e| {
                        err(format!("SCRAM secret of user {user:?} is malformed: {e}"))
                    })?;
                    list.users.insert(
                        user,
                        UserEntry {
                            line,
                            secret: UserSecret::Scram(parsed),
                        },
                    );
                }
                Kind::Password => {
                    let password = Password::new(secret);
                    let derived = ScramSecret::generate(&password);
                    list.users.insert(
                        user,
                        UserEntry {
                            line,
                            secret: UserSecret::Password { password, derived },
                        },
                    );
                }
                Kind::Skip(skipped) => {
                    list.warnings.push(UserlistWarning {
                        path: path.to_owned(),
                        line,
                        user: user.clone(),
                        skipped,
                    });
                    list.skipped.insert(user, skipped);
                }
            }
        }
        Ok(list)
    }

    /// The entry of a pooled user.
    pub fn get(&self, user: &str) -> Option<&UserEntry> {
        self.users.get(user)
    }

    /// Why `user` is in the file but not pooled.
    pub fn skipped(&self, user: &str) -> Option<Skipped> {
        self.skipped.get(user).copied()
    }

    /// Users the file names but sqlgate cannot pool: log each once at load.
    pub fn warnings(&self) -> &[UserlistWarning] {
        &self.warnings
    }

    /// How many users are pooled.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

enum Kind {
    Scram,
    Password,
    Skip(Skipped),
}

fn classify(secret: &str) -> Kind {
    let b = secret.as_bytes();
    let is_md5 =
        b.len() == 35 && secret.starts_with("md5") && b[3..].iter().all(u8::is_ascii_hexdigit);
    let is_bcrypt = b.len() == 60
        && (secret.starts_with("$2a$") || secret.starts_with("$2b$") || secret.starts_with("$2y$"));
    if secret.is_empty() {
        Kind::Skip(Skipped::Empty)
    } else if secret.starts_with(SCRAM_PREFIX) {
        Kind::Scram
    } else if is_md5 {
        Kind::Skip(Skipped::Md5)
    } else if is_bcrypt {
        Kind::Skip(Skipped::Bcrypt)
    } else {
        Kind::Password
    }
}

/// A double-quoted field at the start of `s` (`""` is a quote inside it);
/// returns its value and what follows.
fn quoted(s: &str) -> Result<(String, &str), &'static str> {
    let body = s
        .strip_prefix('"')
        .ok_or("expected a double-quoted field")?;
    let mut value = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        if c != '"' {
            value.push(c);
            continue;
        }
        if body[i + 1..].starts_with('"') {
            value.push('"');
            chars.next();
            continue;
        }
        let rest = &body[i + 1..];
        if !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
            return Err("expected a space after the closing quote");
        }
        return Ok((value, rest));
    }
    Err("missing closing double quote")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::test_vectors as rfc;

    const FILE: &str = "/etc/sqlgate/userlist.txt";

    fn parse(text: &str) -> Result<Userlist, UserlistError> {
        Userlist::parse(text, Path::new(FILE))
    }

    #[test]
    fn reads_scram_secrets_passwords_and_comments() {
        let text = format!(
            "; PgBouncer-style comment\n\
             # another\n\
             \n\
             \"app\" \"{}\"\n\
             \t\"we\"\"ird\" \"pass word\" trailing fields are ignored\r\n\
             \"cluster\" \"{}\" \"\"\n",
            rfc::SECRET,
            "SCRAM-SHA-256$119680:D1nWfUQfRP2HWbVuK19Ntw==$ulRLI4fp/bvJN/oBC3x6Q8daLnPit2eWLvm2sex9vyc=:XHVeRmT8iboSn0KMbIx3nMRrebR2gIbi+qEMnHfJi+I=",
        );
        let list = parse(&text).expect("parses");
        assert_eq!(list.len(), 3);
        assert!(list.warnings().is_empty());
        let app = list.get("app").expect("app");
        assert_eq!(app.line, 4);
        assert!(matches!(&app.secret, UserSecret::Scram(s) if s.to_secret_string() == rfc::SECRET));
        let weird = list.get("we\"ird").expect("quote in a user name");
        assert_eq!(weird.line, 5);
        let UserSecret::Password { password, derived } = &weird.secret else {
            panic!("expected a password entry");
        };
        assert_eq!(password, &Password::new("pass word"));
        assert_eq!(derived.iterations(), 4096);
        assert_eq!(
            list.get("cluster")
                .expect("cluster")
                .client_secret()
                .iterations(),
            119_680
        );
    }

    #[test]
    fn skips_md5_bcrypt_and_empty_secrets_with_warnings() {
        let text = "\"old\" \"md545f2603610af569b6155c45067268c6b\"\n\
                    \"crdb\" \"$2a$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy\"\n\
                    \"none\" \"\"\n";
        let list = parse(text).expect("parses");
        assert!(list.is_empty());
        assert_eq!(list.skipped("old"), Some(Skipped::Md5));
        assert_eq!(list.skipped("crdb"), Some(Skipped::Bcrypt));
        assert_eq!(list.skipped("none"), Some(Skipped::Empty));
        let shown: Vec<String> = list.warnings().iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 3);
        assert!(
            shown[0].starts_with(&format!("{FILE}:1: user \"old\" has an md5 hash")),
            "{}",
            shown[0]
        );
        assert!(
            shown[1].starts_with(&format!("{FILE}:2: user \"crdb\"")),
            "{}",
            shown[1]
        );
        for line in &shown {
            assert!(line.ends_with("not pooled"), "{line}");
            assert!(
                !line.contains("45f26036") && !line.contains("N9qo8u"),
                "{line}"
            );
        }
    }

    #[test]
    fn md5_lookalikes_are_passwords() {
        let list = parse("\"a\" \"md5-is-my-password\"\n").expect("parses");
        assert!(matches!(
            list.get("a").expect("a").secret,
            UserSecret::Password { .. }
        ));
    }

    #[test]
    fn errors_name_file_and_line_without_the_secret() {
        let bad_scram = "SCRAM-SHA-256$4096:c2FsdA==$sekrit:sekrit";
        let cases: Vec<(String, usize, &str)> = vec![
            (
                "app \"x\"".into(),
                1,
                "user name: expected a double-quoted field",
            ),
            (
                "\n\"app".into(),
                2,
                "user name: missing closing double quote",
            ),
            (
                "\"app\"x \"y\"".into(),
                1,
                "user name: expected a space after the closing quote",
            ),
            ("\"\" \"y\"".into(), 1, "empty user name"),
            ("\"app\"".into(), 1, "user \"app\" has no secret"),
            ("\"app\"   ".into(), 1, "user \"app\" has no secret"),
            (
                "\"app\" secret".into(),
                1,
                "secret of user \"app\": expected a double-quoted field",
            ),
            (
                "\"app\" \"sekrit".into(),
                1,
                "secret of user \"app\": missing closing double quote",
            ),
            (
                "# c\n\"a\" \"x\"\n\"a\" \"y\"".into(),
                3,
                "user \"a\" is listed twice (first on line 2)",
            ),
            (
                format!("\"app\" \"{bad_scram}\""),
                1,
                "SCRAM secret of user \"app\" is malformed",
            ),
        ];
        assert!(!cases.is_empty());
        for (text, line, want) in cases {
            let err = parse(&text).expect_err(&text);
            assert_eq!(err.line, Some(line), "{text:?}: {err}");
            let shown = err.to_string();
            assert!(
                shown.starts_with(&format!("{FILE}:{line}: {want}")),
                "{text:?}: {shown}"
            );
            assert!(!shown.contains("sekrit"), "{shown}");
        }
    }

    #[test]
    fn an_unreadable_file_is_an_error_naming_it() {
        let err = Userlist::load(Path::new("/nonexistent/userlist.txt")).expect_err("no file");
        assert_eq!(err.line, None);
        assert!(
            err.to_string()
                .starts_with("/nonexistent/userlist.txt: cannot read auth_file")
        );
    }

    #[test]
    fn entries_give_the_right_upstream_credential() {
        let text = format!("\"s\" \"{}\"\n\"p\" \"pencil\"\n", rfc::SECRET);
        let list = parse(&text).expect("parses");
        let key = ClientKey::from_bytes([1; 32]);
        assert!(matches!(
            list.get("s").expect("s").upstream_credential(key.clone()),
            Credential::ClientKey { client_key, .. } if client_key == key
        ));
        assert!(matches!(
            list.get("p").expect("p").upstream_credential(key),
            Credential::Password(p) if p == Password::new("pencil")
        ));
    }

    #[test]
    fn debug_output_hides_passwords_and_secrets() {
        let text = format!("\"s\" \"{}\"\n\"p\" \"pencil\"\n", rfc::SECRET);
        let shown = format!("{:?}", parse(&text).expect("parses"));
        assert!(!shown.contains("pencil"), "{shown}");
        assert!(!shown.contains("WG5d8oPm"), "{shown}");
    }
}
