//! The static token file (`--auth-tokens`): one line per token, `ROLE TOKEN [node=NAME]`.
//!
//! ROLE is `agent` (which needs `node=`: an agent token speaks for one node) or `reader`.
//! TOKEN is the token itself (at least 16 characters) or `sha256:<64 hex digits>` of it, so the
//! file need not hold the secrets. A `#` at the start of a line or after whitespace starts a
//! comment; a `#` inside a token is part of it (a token with one is warned about, since shells
//! and older gpulse releases read the rest as a comment). Tokens are kept and looked up by their
//! SHA-256 only: a lookup compares digests, never the secret itself.
use std::collections::HashMap;

use super::{Identity, Role};

/// Shortest plain token accepted (a guessable token is no authentication).
pub const MIN_TOKEN: usize = 16;
/// Largest token file read.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

pub type Digest = [u8; 32];

#[derive(Debug, Default)]
pub struct TokenTable {
    by_digest: HashMap<Digest, Identity>,
    /// What the operator should know about the file that does not refuse it (logged on load).
    pub warnings: Vec<String>,
}

pub fn digest(token: &str) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl TokenTable {
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// Who `token` is, if the file lists it.
    pub fn lookup(&self, token: &str) -> Option<&Identity> {
        self.by_digest.get(&digest(token))
    }

    /// Parses a whole file; any bad line refuses the file (naming the line), so a typo never
    /// silently drops a token or widens one.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut t = Self::default();
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = strip_comment(raw).trim();
            if line.is_empty() {
                continue;
            }
            if line.contains('#') {
                t.warnings.push(format!(
                    "line {n}: '#' inside a token is part of it (a comment starts only at the \
                     start of a line or after whitespace)"
                ));
            }
            let (d, id) = parse_line(line, n).map_err(|e| format!("line {n}: {e}"))?;
            if t.by_digest.insert(d, id).is_some() {
                return Err(format!("line {n}: the same token is listed twice"));
            }
        }
        Ok(t)
    }

    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = crate::reload::read_bounded(path, MAX_FILE_BYTES)?;
        let t = Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        for w in &t.warnings {
            tracing::warn!(file = %path.display(), "token file: {w}");
        }
        Ok(t)
    }
}

/// The line without its comment: from a `#` that starts the line or follows whitespace.
fn strip_comment(line: &str) -> &str {
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        if c == '#' && prev_space {
            return &line[..i];
        }
        prev_space = c.is_whitespace();
    }
    line
}

fn parse_line(line: &str, n: usize) -> Result<(Digest, Identity), String> {
    let mut parts = line.split_whitespace();
    let role = match parts.next() {
        Some("agent") => Role::Agent,
        Some("reader") => Role::Reader,
        Some(r) => return Err(format!("role {r:?} is neither agent nor reader")),
        None => return Err("empty".into()),
    };
    let token = parts.next().ok_or("no token after the role")?;
    let d = match token.strip_prefix("sha256:") {
        Some(hex) => parse_hex(hex).ok_or("sha256: needs 64 hex digits")?,
        None if token.len() < MIN_TOKEN => {
            return Err(format!("a token must be at least {MIN_TOKEN} characters"));
        }
        None => digest(token),
    };
    let mut node = None;
    for opt in parts {
        match opt.strip_prefix("node=") {
            Some(name) => {
                crate::labels::node(name)?;
                node = Some(name.to_string());
            }
            None => return Err(format!("unknown option {opt:?} (expected node=NAME)")),
        }
    }
    match (role, &node) {
        (Role::Agent, None) => return Err("an agent token needs node=NAME".into()),
        (Role::Reader, Some(_)) => return Err("a reader token takes no node=".into()),
        _ => {}
    }
    let name = format!("token on line {n}");
    Ok((d, Identity { role, node, name }))
}

fn parse_hex(s: &str) -> Option<Digest> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn hex(d: &Digest) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn parses_roles_nodes_plain_and_hashed_tokens() {
        let text = format!(
            "# agents\nagent node-a-secret-token-1 node=node-a\n\nreader sha256:{}  # dashboards\n",
            hex(&digest("reader-secret-token-2"))
        );
        let t = TokenTable::parse(&text).unwrap();
        assert_eq!(t.len(), 2);
        let a = t.lookup("node-a-secret-token-1").unwrap();
        assert_eq!((a.role, a.node.as_deref()), (Role::Agent, Some("node-a")));
        let r = t.lookup("reader-secret-token-2").unwrap();
        assert_eq!((r.role, r.node.as_deref()), (Role::Reader, None));
        assert!(t.lookup("node-a-secret-token-2").is_none());
        assert!(t.lookup("").is_none());
    }

    #[test]
    fn a_hash_inside_a_token_is_part_of_it() {
        // Issue 27 #15: `#` inside a token cut it to its prefix, which then authenticated.
        let text =
            "agent abcdefghijklmnop#qrstuvwxyz node=a\n#x\nreader reader-token-0123456#7 # c\n";
        let t = TokenTable::parse(text).unwrap();
        assert_eq!(t.len(), 2);
        assert!(t.lookup("abcdefghijklmnop#qrstuvwxyz").is_some());
        assert!(t.lookup("abcdefghijklmnop").is_none());
        assert!(t.lookup("reader-token-0123456#7").is_some());
        assert_eq!(t.warnings.len(), 2, "{:?}", t.warnings);
        assert!(t.warnings[0].starts_with("line 1:"), "{:?}", t.warnings);
        // A comment after whitespace or at the start of a line still is one, and warns nothing.
        let t = TokenTable::parse("# all\nreader tok-tok-tok-tok-tok\t# dashboards\n").unwrap();
        assert!(t.lookup("tok-tok-tok-tok-tok").is_some());
        assert!(t.warnings.is_empty());
    }

    #[test]
    fn refuses_bad_lines_naming_them() {
        for (text, want) in [
            ("admin tok-tok-tok-tok-tok", "line 1: role \"admin\""),
            ("agent tok-tok-tok-tok-tok", "needs node="),
            ("reader tok-tok-tok-tok-tok node=a", "takes no node="),
            ("reader short", "at least 16"),
            ("reader sha256:abc", "64 hex"),
            (
                "agent tok-tok-tok-tok-tok node=bad{name}",
                "not a node name",
            ),
            ("agent tok-tok-tok-tok-tok nod=a", "unknown option"),
            (
                "reader tok-tok-tok-tok-tok\nreader tok-tok-tok-tok-tok",
                "line 2: the same token",
            ),
            ("reader", "no token"),
        ] {
            let e = TokenTable::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
