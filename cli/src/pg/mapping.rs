//! The mapping file of `tiercache pg install` (TOML): which tables invalidate which tags.
//!
//! ```toml
//! # Prepended to every tag (default ""). The Rust and Python clients send tags verbatim (only keys get
//! # the `<namespace>:v<version>:` prefix), so leave it empty unless the application prefixes its tags.
//! tag_prefix = ""
//! # Where the outbox table and the trigger functions live (default "tiercache").
//! schema = "tiercache"
//! # The NOTIFY channel that wakes the bridge (default "tiercache_outbox").
//! channel = "tiercache_outbox"
//!
//! [tables.users]                      # or "app.users"; unqualified names are looked up in `public`
//! tags = ["user:{id}", "org:{org_id}"]
//! ```
//!
//! A template is literal text with `{column}` placeholders (`{{` and `}}` stand for braces). Both the
//! old row (UPDATE, DELETE) and the new row (INSERT, UPDATE) produce tags; a tag whose column is NULL
//! is dropped.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    #[serde(default)]
    pub tag_prefix: String,
    #[serde(default = "default_schema")]
    pub schema: String,
    #[serde(default = "default_channel")]
    pub channel: String,
    #[serde(default)]
    pub tables: BTreeMap<String, Table>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    pub tags: Vec<String>,
}

fn default_schema() -> String {
    "tiercache".into()
}

fn default_channel() -> String {
    "tiercache_outbox".into()
}

/// One piece of a tag template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Lit(String),
    Col(String),
}

/// Parses `user:{id}` into `[Lit("user:"), Col("id")]`.
pub fn parse_template(t: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut lit = String::new();
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                lit.push('}');
            }
            '{' => {
                let mut col = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => col.push(c),
                        None => return Err(format!("template {t:?}: unclosed {{")),
                    }
                }
                let col = col.trim().to_string();
                if col.is_empty() {
                    return Err(format!("template {t:?}: empty {{}}"));
                }
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                parts.push(Part::Col(col));
            }
            '}' => return Err(format!("template {t:?}: unmatched }} (write }}}} for a brace)")),
            c => lit.push(c),
        }
    }
    if !lit.is_empty() {
        parts.push(Part::Lit(lit));
    }
    if parts.is_empty() {
        return Err("empty tag template".into());
    }
    Ok(parts)
}

impl Mapping {
    pub fn parse(text: &str) -> Result<Mapping, String> {
        let m: Mapping = toml::from_str(text).map_err(|e| format!("mapping: {e}"))?;
        if m.schema.is_empty() || m.channel.is_empty() {
            return Err("mapping: schema and channel must not be empty".into());
        }
        for (name, t) in &m.tables {
            if t.tags.is_empty() {
                return Err(format!("mapping: table {name} has no tags"));
            }
            for tpl in &t.tags {
                parse_template(tpl).map_err(|e| format!("mapping: table {name}: {e}"))?;
            }
            split_table(name)?;
        }
        Ok(m)
    }

    pub fn load(path: &str) -> Result<Mapping, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        Mapping::parse(&text)
    }
}

/// `users` -> ("public", "users"); `app.users` -> ("app", "users").
pub fn split_table(name: &str) -> Result<(String, String), String> {
    match name.split_once('.') {
        Some((s, t)) if !s.is_empty() && !t.is_empty() && !t.contains('.') => Ok((s.into(), t.into())),
        None if !name.is_empty() => Ok(("public".into(), name.into())),
        _ => Err(format!("mapping: bad table name {name:?} (table or schema.table)")),
    }
}

/// A quoted SQL identifier.
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A quoted SQL string literal (standard_conforming_strings, the default since PostgreSQL 9.1).
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The SQL expression of one template over `row` (`OLD` or `NEW`): NULL when a column is NULL.
pub fn template_sql(prefix: &str, parts: &[Part], row: &str) -> String {
    let mut out = vec![literal(prefix)];
    for p in parts {
        out.push(match p {
            Part::Lit(s) => literal(s),
            Part::Col(c) => format!("{row}.{}::text", ident(c)),
        });
    }
    format!("({})", out.join(" || "))
}

/// The name of the trigger function of a table (one per table, in the mapping's schema).
pub fn function_name(schema: &str, table: &str) -> String {
    let name = format!("invalidate__{schema}__{table}");
    if name.len() <= 63 {
        return name;
    }
    // PostgreSQL truncates identifiers to 63 bytes: keep long names unique and untruncated.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    let mut cut = 40;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}_{h:016x}", &name[..cut])
}

pub const TRIGGER_NAME: &str = "tiercache_invalidate";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse() {
        assert_eq!(parse_template("user:{id}").unwrap(), vec![Part::Lit("user:".into()), Part::Col("id".into())]);
        assert_eq!(
            parse_template("{a}-{ b }{{x}}").unwrap(),
            vec![Part::Col("a".into()), Part::Lit("-".into()), Part::Col("b".into()), Part::Lit("{x}".into())]
        );
        assert!(parse_template("user:{id").is_err());
        assert!(parse_template("user:}").is_err());
        assert!(parse_template("{}").is_err());
        assert!(parse_template("").is_err());
    }

    #[test]
    fn sql_is_quoted() {
        let parts = parse_template("o'k:{we\"ird}").unwrap();
        assert_eq!(template_sql("p:", &parts, "NEW"), "('p:' || 'o''k:' || NEW.\"we\"\"ird\"::text)");
    }

    #[test]
    fn long_function_names_fit_postgres_identifiers() {
        assert_eq!(function_name("tiercache", "users"), "invalidate__tiercache__users");
        let a = function_name("tiercache", &"t".repeat(80));
        let b = function_name("tiercache", &format!("{}x", "t".repeat(79)));
        assert!(a.len() <= 63 && b.len() <= 63 && a != b);
        assert!(function_name("é".repeat(30).as_str(), "t").len() <= 63);
    }

    #[test]
    fn mapping_parses_and_rejects() {
        let m = Mapping::parse("[tables.users]\ntags = [\"user:{id}\", \"org:{org_id}\"]\n").unwrap();
        assert_eq!(m.schema, "tiercache");
        assert_eq!(m.tag_prefix, "");
        assert_eq!(m.tables["users"].tags.len(), 2);
        assert!(Mapping::parse("[tables.users]\ntags = []\n").is_err());
        assert!(Mapping::parse("[tables.users]\ntags = [\"x\"]\nbogus = 1\n").is_err());
        assert!(Mapping::parse("[tables.\"a.b.c\"]\ntags = [\"x\"]\n").is_err());
    }
}
