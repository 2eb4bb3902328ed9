//! libpq connection strings, read the way libpq reads them: the URL form
//! (`postgresql://user:pw@h1:p1,[::1]:p2/db?key=value&…`) and the key=value form
//! (`host=h1,h2 port=p1,p2 options='--cluster=x'`).
//!
//! This is syntax only: the result is the ordered list of parameters libpq would
//! see (later ones win), with the URL's authority turned into `host` and `port`
//! lists and every value decoded. What the parameters mean for sqlgate is decided
//! in [`super`]. The password is dropped here and never stored: only the fact
//! that one was given is kept.
//!
//! References: libpq's `conninfo_uri_parse_options` and `conninfo_parse` in
//! `src/interfaces/libpq/fe-connect.c`, and "Connection Strings" in the
//! PostgreSQL manual (section 34.1.1).

/// What is wrong with a connection string. Messages name the offending part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxError {
    #[error("the connection string is empty")]
    Empty,
    #[error(
        "{0:?} is neither a connection URL (postgresql://…) nor a key=value string (host=… port=…)"
    )]
    UnknownForm(String),
    #[error("invalid percent-encoding {0:?} in the URL (expected % and two hex digits)")]
    BadPercent(String),
    #[error("the URL decodes {0:?} to a NUL byte, which no parameter may hold")]
    NulByte(String),
    #[error("unmatched '[' in the host list of the URL: an IPv6 host is written [::1]:5432")]
    UnclosedBracket,
    #[error("empty IPv6 address \"[]\" in the host list of the URL")]
    EmptyBracket,
    #[error("unexpected {found:?} after the IPv6 host [{host}] (expected ':port', ',' or '/')")]
    AfterBracket { host: String, found: char },
    #[error("IPv6 host {0:?} in the URL must be in brackets, e.g. [::1]:5432")]
    UnbracketedIpv6(String),
    #[error("URL parameter {0:?} has no '=' (write key=value, joined with '&')")]
    QueryMissingEquals(String),
    #[error("URL parameter with an empty name in {0:?}")]
    QueryEmptyKey(String),
    #[error("missing '=' after {0:?} in the key=value string")]
    KvMissingEquals(String),
    #[error("unterminated quoted value for {0:?} in the key=value string")]
    KvUnterminatedQuote(String),
}

/// Parameters in the order libpq applies them. The password is not among them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    entries: Vec<(String, String)>,
    /// A password was present (in the URL's user part or as `password=`).
    pub had_password: bool,
}

impl Params {
    fn set(&mut self, key: &str, value: String) {
        if key == "password" {
            self.had_password = true;
            return;
        }
        self.entries.push((key.to_owned(), value));
    }

    /// The value of `key` that libpq would use (the last one given).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every distinct key, in first-seen order.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = Vec::new();
        for (k, _) in &self.entries {
            if !keys.contains(&k.as_str()) {
                keys.push(k);
            }
        }
        keys
    }
}

/// Parses a libpq connection URL or key=value string.
///
/// A string that starts with `postgresql://` or `postgres://` (or a JDBC
/// `jdbc:postgresql://`) is a URL; anything else with an `=` is key=value.
///
/// # Errors
/// A [`SyntaxError`] naming the offending part.
pub fn parse(input: &str) -> Result<Params, SyntaxError> {
    let input = input.trim();
    if input.is_empty() {
        return Err(SyntaxError::Empty);
    }
    let lower = input.to_ascii_lowercase();
    let lower = lower.strip_prefix("jdbc:").unwrap_or(&lower);
    for scheme in ["postgresql://", "postgres://"] {
        if lower.starts_with(scheme) {
            let skip = input.len() - lower.len() + scheme.len();
            return parse_url(&input[skip..]);
        }
    }
    if input.contains('=') && !input.contains("://") {
        return parse_key_values(input);
    }
    Err(SyntaxError::UnknownForm(redact(input)))
}

/// `input` cut short and with anything between `:` and `@` hidden, for messages.
fn redact(input: &str) -> String {
    let start = input.find("://").map_or(0, |s| s + 3);
    let shown: String = match input[start..].rfind('@') {
        Some(at) => {
            let at = start + at;
            let user = input[start..at].split(':').next().unwrap_or_default();
            format!("{}{user}:…{}", &input[..start], &input[at..])
        }
        None => input.to_owned(),
    };
    if shown.chars().count() > 60 {
        let cut: String = shown.chars().take(57).collect();
        format!("{cut}…")
    } else {
        shown
    }
}

/// The part of a URL after `postgresql://`.
fn parse_url(rest: &str) -> Result<Params, SyntaxError> {
    let mut params = Params::default();

    // user[:password]@ — up to the last '@' before the query, so that a
    // password with unencoded '@', '/' or ':' still parses (libpq stops at the
    // first '@' or '/', and would have failed on such a string).
    let before_query = rest.find('?').unwrap_or(rest.len());
    let rest = match rest[..before_query].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                params.set("user", decode(user)?);
            }
            if password.is_some() {
                params.had_password = true;
            }
            &rest[at + 1..]
        }
        None => rest,
    };

    // host[:port][,host[:port]…]
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (hostspec, rest) = rest.split_at(end);
    let (hosts, ports) = parse_host_list(hostspec)?;
    if !hosts.is_empty() {
        params.set("host", hosts.join(","));
        if ports.iter().any(|p| !p.is_empty()) {
            params.set("port", ports.join(","));
        }
    }

    // /dbname
    let rest = match rest.strip_prefix('/') {
        Some(path) => {
            let end = path.find('?').unwrap_or(path.len());
            if end > 0 {
                params.set("dbname", decode(&path[..end])?);
            }
            &path[end..]
        }
        None => rest,
    };

    // ?key=value&…
    if let Some(query) = rest.strip_prefix('?') {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(SyntaxError::QueryMissingEquals(pair.to_owned()));
            };
            let key = decode(key)?;
            if key.is_empty() {
                return Err(SyntaxError::QueryEmptyKey(pair.to_owned()));
            }
            let value = if key == "password" {
                String::new()
            } else {
                decode(value)?
            };
            params.set(&key, value);
        }
    }
    Ok(params)
}

/// Splits `h1:p1,[::1]:p2,h3` into decoded hosts and ports (empty when absent).
fn parse_host_list(spec: &str) -> Result<(Vec<String>, Vec<String>), SyntaxError> {
    let mut hosts = Vec::new();
    let mut ports = Vec::new();
    if spec.is_empty() {
        return Ok((hosts, ports));
    }
    for item in split_host_items(spec)? {
        let (host, port) = if let Some(inner) = item.strip_prefix('[') {
            let close = inner.find(']').ok_or(SyntaxError::UnclosedBracket)?;
            let host = &inner[..close];
            if host.is_empty() {
                return Err(SyntaxError::EmptyBracket);
            }
            let after = &inner[close + 1..];
            let port = match after.chars().next() {
                None => "",
                Some(':') => &after[1..],
                Some(found) => {
                    return Err(SyntaxError::AfterBracket {
                        host: host.to_owned(),
                        found,
                    });
                }
            };
            (host, port)
        } else if item.matches(':').count() > 1 {
            return Err(SyntaxError::UnbracketedIpv6(item.to_owned()));
        } else {
            match item.rsplit_once(':') {
                Some((h, p)) => (h, p),
                None => (item, ""),
            }
        };
        hosts.push(decode(host)?);
        ports.push(decode(port)?);
    }
    Ok((hosts, ports))
}

/// Splits a host list at commas that are not inside `[…]`.
fn split_host_items(spec: &str) -> Result<Vec<&str>, SyntaxError> {
    let mut items = Vec::new();
    let mut depth = false;
    let mut start = 0;
    for (i, c) in spec.char_indices() {
        match c {
            '[' => depth = true,
            ']' => depth = false,
            ',' if !depth => {
                items.push(&spec[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth {
        return Err(SyntaxError::UnclosedBracket);
    }
    items.push(&spec[start..]);
    Ok(items)
}

/// Percent-decodes `s` as libpq does: `%XX` only (`+` stays `+`), no NUL.
fn decode(s: &str) -> Result<String, SyntaxError> {
    if !s.contains('%') {
        return Ok(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            let Some(byte) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                let shown: String = s[i..].chars().take(3).collect();
                return Err(SyntaxError::BadPercent(shown));
            };
            if byte == 0 {
                return Err(SyntaxError::NulByte(s.to_owned()));
            }
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Percent-encodes `s` for a URL's user or path part (RFC 3986 unreserved kept).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `key = value` pairs separated by whitespace; values unquoted (backslash
/// escapes) or in single quotes (`\'` and `\\` escapes).
fn parse_key_values(input: &str) -> Result<Params, SyntaxError> {
    let mut params = Params::default();
    let mut chars = input.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(SyntaxError::KvMissingEquals(key));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(SyntaxError::KvUnterminatedQuote(key)),
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(SyntaxError::KvUnterminatedQuote(key)),
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        params.set(&key, value);
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &Params) -> Vec<(&str, &str)> {
        p.entries
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn parses_urls_and_key_value_strings_into_libpq_parameters() {
        type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, bool);
        let cases: Vec<Case> = vec![
            (
                "postgresql://maxroach:pw@my-cluster-7tc.aws-us-east-1.cockroachlabs.cloud:26257/defaultdb?sslmode=verify-full&options=--cluster%3Dmy-cluster-123",
                vec![
                    ("user", "maxroach"),
                    ("host", "my-cluster-7tc.aws-us-east-1.cockroachlabs.cloud"),
                    ("port", "26257"),
                    ("dbname", "defaultdb"),
                    ("sslmode", "verify-full"),
                    ("options", "--cluster=my-cluster-123"),
                ],
                true,
            ),
            (
                "postgres://h1:5433,h2,[::1]:5435,[fe80::1]/db",
                vec![
                    ("host", "h1,h2,::1,fe80::1"),
                    ("port", "5433,,5435,"),
                    ("dbname", "db"),
                ],
                false,
            ),
            ("postgresql://h", vec![("host", "h")], false),
            (
                "postgresql://u%40corp@h/my%20db?application_name=a+b",
                vec![
                    ("user", "u@corp"),
                    ("host", "h"),
                    ("dbname", "my db"),
                    ("application_name", "a+b"),
                ],
                false,
            ),
            (
                "postgresql://u:p@ss/w:rd@h:26257/db",
                vec![
                    ("user", "u"),
                    ("host", "h"),
                    ("port", "26257"),
                    ("dbname", "db"),
                ],
                true,
            ),
            (
                "postgresql:///db?host=h1,h2&port=1,2&password=x",
                vec![("dbname", "db"), ("host", "h1,h2"), ("port", "1,2")],
                true,
            ),
            (
                "JDBC:PostgreSQL://h:26257/db?sslmode=verify-ca",
                vec![
                    ("host", "h"),
                    ("port", "26257"),
                    ("dbname", "db"),
                    ("sslmode", "verify-ca"),
                ],
                false,
            ),
            (
                "host=h1,h2 port = 26257 user=app password='s e\\'cret' options='--cluster=c -c x=y' sslrootcert=/a\\ b.crt",
                vec![
                    ("host", "h1,h2"),
                    ("port", "26257"),
                    ("user", "app"),
                    ("options", "--cluster=c -c x=y"),
                    ("sslrootcert", "/a b.crt"),
                ],
                true,
            ),
        ];
        assert!(!cases.is_empty());
        for (input, expected, had_password) in cases {
            let params = parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(pairs(&params), expected, "{input}");
            assert_eq!(params.had_password, had_password, "{input}");
        }
    }

    #[test]
    fn names_what_is_wrong_in_a_malformed_string() {
        let cases: Vec<(&str, SyntaxError)> = vec![
            ("", SyntaxError::Empty),
            (
                "mysql://h/db",
                SyntaxError::UnknownForm("mysql://h/db".into()),
            ),
            (
                "postgresql://h/d%zzb",
                SyntaxError::BadPercent("%zz".into()),
            ),
            (
                "postgresql://h/db?x=%4",
                SyntaxError::BadPercent("%4".into()),
            ),
            ("postgresql://h/d%00", SyntaxError::NulByte("d%00".into())),
            ("postgresql://[::1:5432/db", SyntaxError::UnclosedBracket),
            ("postgresql://[]:5432/db", SyntaxError::EmptyBracket),
            (
                "postgresql://::1:5432/db",
                SyntaxError::UnbracketedIpv6("::1:5432".into()),
            ),
            (
                "postgresql://[::1]x/db",
                SyntaxError::AfterBracket {
                    host: "::1".into(),
                    found: 'x',
                },
            ),
            (
                "postgresql://h/db?sslmode",
                SyntaxError::QueryMissingEquals("sslmode".into()),
            ),
            ("host=h port", SyntaxError::KvMissingEquals("port".into())),
            (
                "host=h options='--cluster=x",
                SyntaxError::KvUnterminatedQuote("options".into()),
            ),
        ];
        assert!(!cases.is_empty());
        for (input, expected) in cases {
            assert_eq!(parse(input), Err(expected), "{input}");
        }
    }

    #[test]
    fn error_messages_never_show_the_password() {
        for input in [
            "mysql://maxroach:hunter2@h/db",
            "maxroach:hunter2@h:26257/db",
        ] {
            let shown = parse(input)
                .expect_err("not a connection string")
                .to_string();
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("maxroach:…@h"), "{shown}");
        }
        let p = parse("postgresql://u:hunter2@h/db?password=hunter3").expect("valid");
        assert!(!format!("{p:?}").contains("hunter"), "{p:?}");
    }

    #[test]
    fn later_parameters_win_as_in_libpq() {
        let p =
            parse("postgresql://h1/db?host=h2&sslmode=require&sslmode=verify-full").expect("valid");
        assert_eq!(p.get("host"), Some("h2"));
        assert_eq!(p.get("sslmode"), Some("verify-full"));
        assert_eq!(p.keys(), vec!["host", "dbname", "sslmode"]);
    }

    #[test]
    fn encodes_user_and_database_names_for_a_url() {
        assert_eq!(encode("app"), "app");
        assert_eq!(encode("u@corp:x/y z"), "u%40corp%3Ax%2Fy%20z");
        assert_eq!(encode("é"), "%C3%A9");
    }
}
