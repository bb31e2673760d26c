//! Argument parsing for the `TIERCACHE.*` commands, with Redis's wording for errors.
//!
//! Parsers take the arguments after the key (and value) as byte slices, so they are binary-safe and
//! never allocate per argument beyond the tag list.

use std::fmt;

use crate::entry::{Encoding, NO_DEADLINE};
use crate::num::parse_i64;

/// Why a command's arguments were refused. `Display` gives the full Redis error line, `ERR` included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgError {
    Syntax,
    NotInteger,
    InvalidExpire(&'static str),
    InvalidStale(&'static str),
    StaleNeedsExpire,
    NumTagsRange,
    NumTagsMismatch,
    TooManyTags { max: usize },
    EmptyTag,
    UnknownEncoding,
    InvalidCreated,
    InvalidLeaseToken,
    InvalidLease,
    InvalidWait,
    InvalidBeta,
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::Syntax => f.write_str("ERR syntax error"),
            ArgError::NotInteger => f.write_str("ERR value is not an integer or out of range"),
            ArgError::InvalidExpire(cmd) => write!(f, "ERR invalid expire time in '{cmd}' command"),
            ArgError::InvalidStale(cmd) => write!(f, "ERR invalid stale time in '{cmd}' command"),
            ArgError::StaleNeedsExpire => f.write_str("ERR STALE needs a fresh period: add EX, PX, EXAT or PXAT"),
            ArgError::NumTagsRange => f.write_str("ERR numtags must be a non-negative integer"),
            ArgError::NumTagsMismatch => f.write_str("ERR numtags is larger than the number of tags given"),
            ArgError::TooManyTags { max } => {
                write!(f, "ERR too many tags: at most {max} per entry (see tiercache.max-tags)")
            }
            ArgError::EmptyTag => f.write_str("ERR tags must not be empty strings"),
            ArgError::UnknownEncoding => f.write_str("ERR unknown encoding: expected raw or lz4"),
            ArgError::InvalidCreated => f.write_str("ERR invalid CREATED time"),
            ArgError::InvalidLeaseToken => f.write_str("ERR invalid lease token"),
            ArgError::InvalidLease => f.write_str("ERR LEASE must be a positive number of milliseconds"),
            ArgError::InvalidWait => f.write_str("ERR WAIT must be a positive number of milliseconds"),
            ArgError::InvalidBeta => f.write_str("ERR BETA must be a positive number"),
        }
    }
}

impl std::error::Error for ArgError {}

/// The fresh period as given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreshPeriod {
    /// No EX/PX/EXAT/PXAT: fresh forever.
    Forever,
    /// EX or PX, in milliseconds from now.
    Relative(i64),
    /// EXAT or PXAT, in unix milliseconds.
    At(i64),
}

/// How the value is to be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Compress when worth it (the default).
    Auto,
    /// NOCOMPRESS, or ENCODING: store the bytes as given, in that encoding.
    Verbatim(Encoding),
}

/// Parsed `TIERCACHE.SET` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetArgs<'a> {
    pub fresh: FreshPeriod,
    pub keep_ttl: bool,
    /// The stale window in milliseconds (STALE is given in seconds).
    pub stale_ms: i64,
    /// The tag arguments, borrowed from the options (no copy).
    pub tags: &'a [&'a [u8]],
    /// Where `numtags` stands in the options given (so a caller can reuse the original arguments).
    pub tags_at: Option<usize>,
    pub compression: Compression,
    pub created: Option<i64>,
    /// LEASE token: this SET is the fill of a lease (fenced if the lease is no longer valid).
    pub lease: Option<u64>,
}

/// Absolute times derived from [`SetArgs`] at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// End of the fresh period, unix ms, or [`NO_DEADLINE`].
    pub fresh_until: i64,
    /// When the key expires (fresh + stale), unix ms, or [`NO_DEADLINE`].
    pub expire_at: i64,
}

const SET: &str = "tiercache.set";

fn int(arg: Option<&&[u8]>) -> Result<i64, ArgError> {
    let arg = arg.ok_or(ArgError::Syntax)?;
    parse_i64(arg).ok_or(ArgError::NotInteger)
}

/// Parses the options of `TIERCACHE.SET key value [options...]`.
///
/// `max_tags` is `tiercache.max-tags`. Tags are checked (non-empty, count) but repeats are kept here;
/// the entry's tag list drops them.
pub fn parse_set<'a>(opts: &'a [&'a [u8]], max_tags: usize) -> Result<SetArgs<'a>, ArgError> {
    let mut fresh = None;
    let mut keep_ttl = false;
    let mut stale = None;
    let mut tags = None;
    let mut tags_at = None;
    let mut compression = None;
    let mut created = None;
    let mut lease = None;
    let mut i = 0;
    while i < opts.len() {
        let opt = opts[i];
        let is = |name: &str| opt.eq_ignore_ascii_case(name.as_bytes());
        if is("EX") || is("PX") || is("EXAT") || is("PXAT") {
            if fresh.is_some() {
                return Err(ArgError::Syntax);
            }
            let n = int(opts.get(i + 1))?;
            if n <= 0 {
                return Err(ArgError::InvalidExpire(SET));
            }
            let seconds = is("EX") || is("EXAT");
            let ms = if seconds { n.checked_mul(1000).ok_or(ArgError::InvalidExpire(SET))? } else { n };
            fresh = Some(if is("EX") || is("PX") { FreshPeriod::Relative(ms) } else { FreshPeriod::At(ms) });
            i += 2;
        } else if is("KEEPTTL") {
            if keep_ttl {
                return Err(ArgError::Syntax);
            }
            keep_ttl = true;
            i += 1;
        } else if is("STALE") {
            if stale.is_some() {
                return Err(ArgError::Syntax);
            }
            let n = int(opts.get(i + 1))?;
            if n < 0 {
                return Err(ArgError::InvalidStale(SET));
            }
            stale = Some(n.checked_mul(1000).ok_or(ArgError::InvalidStale(SET))?);
            i += 2;
        } else if is("TAGS") {
            if tags.is_some() {
                return Err(ArgError::Syntax);
            }
            let n = int(opts.get(i + 1))?;
            let n = usize::try_from(n).map_err(|_| ArgError::NumTagsRange)?;
            let start = i + 2;
            if n > opts.len() - start.min(opts.len()) {
                return Err(ArgError::NumTagsMismatch);
            }
            if n > max_tags {
                return Err(ArgError::TooManyTags { max: max_tags });
            }
            let list = &opts[start..start + n];
            if list.iter().any(|t| t.is_empty()) {
                return Err(ArgError::EmptyTag);
            }
            tags = Some(list);
            tags_at = Some(i + 1);
            i = start + n;
        } else if is("NOCOMPRESS") {
            if compression.is_some() {
                return Err(ArgError::Syntax);
            }
            compression = Some(Compression::Verbatim(Encoding::Raw));
            i += 1;
        } else if is("ENCODING") {
            if compression.is_some() {
                return Err(ArgError::Syntax);
            }
            let name = opts.get(i + 1).ok_or(ArgError::Syntax)?;
            compression = Some(Compression::Verbatim(Encoding::from_name(name).ok_or(ArgError::UnknownEncoding)?));
            i += 2;
        } else if is("CREATED") {
            if created.is_some() {
                return Err(ArgError::Syntax);
            }
            let n = int(opts.get(i + 1))?;
            if n < 0 {
                return Err(ArgError::InvalidCreated);
            }
            created = Some(n);
            i += 2;
        } else if is("LEASE") {
            if lease.is_some() {
                return Err(ArgError::Syntax);
            }
            let token = opts.get(i + 1).ok_or(ArgError::Syntax)?;
            lease = Some(parse_token(token).ok_or(ArgError::InvalidLeaseToken)?);
            i += 2;
        } else {
            return Err(ArgError::Syntax);
        }
    }
    let fresh = fresh.unwrap_or(FreshPeriod::Forever);
    if stale.is_some() && keep_ttl {
        return Err(ArgError::Syntax);
    }
    if stale.is_some_and(|s| s > 0) && fresh == FreshPeriod::Forever {
        return Err(ArgError::StaleNeedsExpire);
    }
    Ok(SetArgs {
        fresh,
        keep_ttl,
        stale_ms: stale.unwrap_or(0),
        tags: tags.unwrap_or_default(),
        tags_at,
        compression: compression.unwrap_or(Compression::Auto),
        created,
        lease,
    })
}

impl SetArgs<'static> {
    /// What [`parse_set`] returns for no options at all (a plain `TIERCACHE.SET key value`): a caller
    /// may take it without parsing.
    pub const NONE: SetArgs<'static> = SetArgs {
        fresh: FreshPeriod::Forever,
        keep_ttl: false,
        stale_ms: 0,
        tags: &[],
        tags_at: None,
        compression: Compression::Auto,
        created: None,
        lease: None,
    };
}

impl SetArgs<'_> {
    /// Turns the relative periods into absolute deadlines at `now_ms`.
    pub fn deadlines(&self, now_ms: i64) -> Result<Deadlines, ArgError> {
        let fresh_until = match self.fresh {
            FreshPeriod::Forever => return Ok(Deadlines { fresh_until: NO_DEADLINE, expire_at: NO_DEADLINE }),
            FreshPeriod::Relative(ms) => now_ms.checked_add(ms).ok_or(ArgError::InvalidExpire(SET))?,
            FreshPeriod::At(at) => at,
        };
        let expire_at = fresh_until.checked_add(self.stale_ms).ok_or(ArgError::InvalidStale(SET))?;
        Ok(Deadlines { fresh_until, expire_at })
    }
}

/// Parses a lease token as the module prints it (a positive decimal u64).
pub fn parse_token(s: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(s).ok()?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u64>().ok().filter(|&t| t != 0)
}

/// `LEASE ms [WAIT ms] [BETA number]` of a lease read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeaseArgs {
    pub lease_ms: i64,
    /// Park up to this long when another caller holds the lease.
    pub wait_ms: Option<i64>,
    /// XFetch: refresh early with probability growing as the deadline nears.
    pub beta: Option<f64>,
}

/// Parsed `TIERCACHE.GET` options.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GetArgs {
    /// ENCODED: reply `[encoding, stored bytes]` instead of the decoded value.
    pub encoded: bool,
    /// WITHTTL (lease form only): one more reply element, the entry's fresh time left in ms.
    pub with_ttl: bool,
    pub lease: Option<LeaseArgs>,
}

fn positive_ms(arg: Option<&&[u8]>, err: ArgError) -> Result<i64, ArgError> {
    let n = int(arg)?;
    if n <= 0 {
        return Err(err);
    }
    Ok(n)
}

/// Parses the options of `TIERCACHE.GET key [ENCODED] [LEASE ms [WAIT ms] [BETA number]]`.
pub fn parse_get(opts: &[&[u8]]) -> Result<GetArgs, ArgError> {
    let mut args = GetArgs::default();
    let (mut lease, mut wait, mut beta) = (None, None, None);
    let mut i = 0;
    while i < opts.len() {
        let opt = opts[i];
        let is = |name: &str| opt.eq_ignore_ascii_case(name.as_bytes());
        if is("ENCODED") && !args.encoded {
            args.encoded = true;
            i += 1;
        } else if is("WITHTTL") && !args.with_ttl {
            args.with_ttl = true;
            i += 1;
        } else if is("LEASE") && lease.is_none() {
            lease = Some(positive_ms(opts.get(i + 1), ArgError::InvalidLease)?);
            i += 2;
        } else if is("WAIT") && wait.is_none() {
            wait = Some(positive_ms(opts.get(i + 1), ArgError::InvalidWait)?);
            i += 2;
        } else if is("BETA") && beta.is_none() {
            let raw = opts.get(i + 1).ok_or(ArgError::Syntax)?;
            let b = std::str::from_utf8(raw).ok().and_then(|s| s.parse::<f64>().ok());
            match b {
                Some(b) if b.is_finite() && b > 0.0 => beta = Some(b),
                _ => return Err(ArgError::InvalidBeta),
            }
            i += 2;
        } else {
            return Err(ArgError::Syntax);
        }
    }
    match lease {
        Some(lease_ms) => args.lease = Some(LeaseArgs { lease_ms, wait_ms: wait, beta }),
        None if wait.is_some() || beta.is_some() || args.with_ttl => return Err(ArgError::Syntax),
        None => {}
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(args: &[&'static str]) -> Result<SetArgs<'static>, ArgError> {
        let v: Vec<&'static [u8]> = args.iter().map(|s| s.as_bytes()).collect();
        let leaked: &'static [&'static [u8]] = Box::leak(v.into_boxed_slice());
        parse_set(leaked, 4)
    }

    #[test]
    fn defaults() {
        let a = set(&[]).unwrap();
        assert_eq!(a.fresh, FreshPeriod::Forever);
        assert_eq!(a.stale_ms, 0);
        assert!(a.tags.is_empty());
        assert_eq!(a.compression, Compression::Auto);
        assert_eq!(a.deadlines(1000).unwrap(), Deadlines { fresh_until: NO_DEADLINE, expire_at: NO_DEADLINE });
        // The module takes SetArgs::NONE instead of parsing an empty option list: it must be the same.
        assert_eq!(a, SetArgs::NONE);
        assert_ne!(set(&["NOCOMPRESS"]).unwrap(), SetArgs::NONE);
    }

    #[test]
    fn periods_and_deadlines() {
        let a = set(&["ex", "10", "STALE", "5"]).unwrap();
        assert_eq!(a.deadlines(1_000).unwrap(), Deadlines { fresh_until: 11_000, expire_at: 16_000 });
        let a = set(&["PX", "250"]).unwrap();
        assert_eq!(a.deadlines(1_000).unwrap(), Deadlines { fresh_until: 1_250, expire_at: 1_250 });
        let a = set(&["PXAT", "5000", "STALE", "1"]).unwrap();
        assert_eq!(a.deadlines(1_000).unwrap(), Deadlines { fresh_until: 5_000, expire_at: 6_000 });
        let a = set(&["EXAT", "5"]).unwrap();
        assert_eq!(a.deadlines(1_000).unwrap().fresh_until, 5_000);
        let a = set(&["PX", "9223372036854775807"]).unwrap();
        assert_eq!(a.deadlines(1_000), Err(ArgError::InvalidExpire("tiercache.set")));
    }

    #[test]
    fn tags_compression_and_internal_options() {
        let a = set(&["TAGS", "2", "a", "b", "NOCOMPRESS", "CREATED", "77", "KEEPTTL"]).unwrap();
        assert_eq!(a.tags, vec![&b"a"[..], b"b"]);
        assert_eq!(a.tags_at, Some(1));
        assert_eq!(a.compression, Compression::Verbatim(Encoding::Raw));
        assert_eq!(a.created, Some(77));
        assert!(a.keep_ttl);
        let a = set(&["ENCODING", "LZ4", "TAGS", "0"]).unwrap();
        assert_eq!(a.compression, Compression::Verbatim(Encoding::Lz4));
        assert!(a.tags.is_empty());
    }

    #[test]
    fn bad_input_gets_redis_style_errors() {
        let cases: &[(&[&str], ArgError)] = &[
            (&["EX"], ArgError::Syntax),
            (&["EX", "ten"], ArgError::NotInteger),
            (&["EX", "0"], ArgError::InvalidExpire("tiercache.set")),
            (&["PX", "-5"], ArgError::InvalidExpire("tiercache.set")),
            (&["EX", "9223372036854775807"], ArgError::InvalidExpire("tiercache.set")),
            (&["EX", "1", "PX", "1"], ArgError::Syntax),
            (&["EX", "1", "EX", "1"], ArgError::Syntax),
            (&["STALE", "5"], ArgError::StaleNeedsExpire),
            (&["EX", "1", "STALE", "-1"], ArgError::InvalidStale("tiercache.set")),
            (&["EX", "1", "STALE", "1", "STALE", "1"], ArgError::Syntax),
            (&["EX", "1", "STALE", "1", "KEEPTTL"], ArgError::Syntax),
            (&["TAGS", "3", "a", "b"], ArgError::NumTagsMismatch),
            (&["TAGS", "1", "a", "b"], ArgError::Syntax),
            (&["TAGS", "-1"], ArgError::NumTagsRange),
            (&["TAGS", "x"], ArgError::NotInteger),
            (&["TAGS", "5", "a", "b", "c", "d", "e"], ArgError::TooManyTags { max: 4 }),
            (&["TAGS", "1", ""], ArgError::EmptyTag),
            (&["TAGS", "1", "a", "TAGS", "1", "b"], ArgError::Syntax),
            (&["NOCOMPRESS", "NOCOMPRESS"], ArgError::Syntax),
            (&["NOCOMPRESS", "ENCODING", "raw"], ArgError::Syntax),
            (&["ENCODING", "gzip"], ArgError::UnknownEncoding),
            (&["CREATED", "-1"], ArgError::InvalidCreated),
            (&["BOGUS"], ArgError::Syntax),
        ];
        for (args, want) in cases {
            assert_eq!(set(args).as_ref().err(), Some(want), "{args:?}");
        }
        assert_eq!(ArgError::InvalidExpire("tiercache.set").to_string(), "ERR invalid expire time in 'tiercache.set' command");
    }

    #[test]
    fn get_options() {
        assert_eq!(parse_get(&[]).unwrap(), GetArgs { encoded: false, with_ttl: false, lease: None });
        assert_eq!(parse_get(&[b"encoded"]).unwrap(), GetArgs { encoded: true, with_ttl: false, lease: None });
        assert!(parse_get(&[b"WITHTTL", b"LEASE", b"10"]).unwrap().with_ttl);
        assert_eq!(parse_get(&[b"WITHTTL"]), Err(ArgError::Syntax), "WITHTTL needs LEASE");
        assert_eq!(parse_get(&[b"ENCODED", b"ENCODED"]), Err(ArgError::Syntax));
        assert_eq!(parse_get(&[b"x"]), Err(ArgError::Syntax));
        let g = parse_get(&[b"LEASE", b"5000", b"wait", b"200", b"BETA", b"1.5"]).unwrap();
        assert_eq!(g.lease, Some(LeaseArgs { lease_ms: 5000, wait_ms: Some(200), beta: Some(1.5) }));
        assert_eq!(parse_get(&[b"WAIT", b"5"]), Err(ArgError::Syntax), "WAIT needs LEASE");
        assert_eq!(parse_get(&[b"LEASE", b"0"]), Err(ArgError::InvalidLease));
        assert_eq!(parse_get(&[b"LEASE"]), Err(ArgError::Syntax));
        assert_eq!(parse_get(&[b"LEASE", b"x"]), Err(ArgError::NotInteger));
        assert_eq!(parse_get(&[b"LEASE", b"10", b"WAIT", b"-1"]), Err(ArgError::InvalidWait));
        assert_eq!(parse_get(&[b"LEASE", b"10", b"BETA", b"0"]), Err(ArgError::InvalidBeta));
        assert_eq!(parse_get(&[b"LEASE", b"10", b"BETA", b"nan"]), Err(ArgError::InvalidBeta));
        assert_eq!(parse_get(&[b"LEASE", b"10", b"LEASE", b"10"]), Err(ArgError::Syntax));
    }

    #[test]
    fn lease_tokens() {
        assert_eq!(parse_token(b"12345"), Some(12345));
        for bad in [&b""[..], b"0", b"-1", b"+1", b"1x", b"99999999999999999999"] {
            assert_eq!(parse_token(bad), None, "{bad:?}");
        }
        let v: Vec<&'static [u8]> = vec![b"LEASE", b"77"];
        assert_eq!(parse_set(&v, 4).unwrap().lease, Some(77));
        let v: Vec<&'static [u8]> = vec![b"LEASE", b"zz"];
        assert_eq!(parse_set(&v, 4), Err(ArgError::InvalidLeaseToken));
    }
}
