//! The argument parsers: `TIERCACHE.SET` and `TIERCACHE.GET` options, lease tokens and Redis integers.
//!
//! Input: one byte for `tiercache.max-tags` (0..=63), then the arguments separated by `\n`. Every
//! parser runs on every input. Besides "never panics", each result is checked against what the
//! parser promises (COMMANDS.md): an accepted SET has at most `max_tags` non-empty tags that stand
//! where `tags_at` says, a STALE window only with a fresh period, deadlines that never overflow into
//! a panic; an accepted GET has positive LEASE/WAIT and a finite positive BETA, WAIT/BETA/WITHTTL only
//! with LEASE; tokens and integers agree with independent reference parsers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiercache_core::args::{parse_get, parse_set, parse_token, FreshPeriod};
use tiercache_core::num::{parse_i64, parse_u64};
use tiercache_core::NO_DEADLINE;

/// Redis's `string2ll` accepts exactly the canonical decimal form of an i64.
fn reference_i64(s: &[u8]) -> Option<i64> {
    let v: i64 = std::str::from_utf8(s).ok()?.parse().ok()?;
    (v.to_string().as_bytes() == s).then_some(v)
}

/// A lease token: one or more ASCII digits (leading zeros allowed) whose value is in 1..2^64.
fn reference_token(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let digits = {
        let t = s.iter().position(|&b| b != b'0').map_or(&s[s.len()..], |i| &s[i..]);
        t
    };
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    let v: u128 = std::str::from_utf8(digits).unwrap().parse().unwrap();
    u64::try_from(v).ok().filter(|&t| t != 0)
}

fn check_numbers(arg: &[u8]) {
    assert_eq!(parse_i64(arg), reference_i64(arg), "parse_i64({arg:?})");
    assert_eq!(parse_u64(arg), reference_i64(arg).and_then(|v| u64::try_from(v).ok()), "parse_u64({arg:?})");
    assert_eq!(parse_token(arg), reference_token(arg), "parse_token({arg:?})");
}

fn check_set(opts: &[&[u8]], max_tags: usize) {
    let parsed = match parse_set(opts, max_tags) {
        Ok(p) => p,
        Err(e) => {
            assert!(e.to_string().starts_with("ERR "), "{e:?}");
            return;
        }
    };
    assert!(parsed.tags.len() <= max_tags);
    assert!(parsed.tags.iter().all(|t| !t.is_empty()));
    match parsed.tags_at {
        Some(at) => {
            assert!(parsed.tags.is_empty() || at + 1 + parsed.tags.len() <= opts.len());
            assert_eq!(parse_i64(opts[at]), Some(parsed.tags.len() as i64), "numtags at {at}");
            assert_eq!(&opts[at + 1..at + 1 + parsed.tags.len()], &parsed.tags[..]);
            assert!(opts[at - 1].eq_ignore_ascii_case(b"TAGS"));
        }
        None => assert!(parsed.tags.is_empty()),
    }
    assert!(parsed.stale_ms >= 0 && parsed.stale_ms % 1000 == 0);
    if parsed.stale_ms > 0 {
        assert_ne!(parsed.fresh, FreshPeriod::Forever);
        assert!(!parsed.keep_ttl);
    }
    match parsed.fresh {
        FreshPeriod::Forever => {}
        FreshPeriod::Relative(ms) | FreshPeriod::At(ms) => assert!(ms > 0),
    }
    assert!(parsed.created.is_none_or(|c| c >= 0));
    assert!(parsed.lease.is_none_or(|t| t > 0));
    for now in [0, 1, 1_700_000_000_000, i64::MAX / 2, i64::MAX - 1, i64::MAX, -1, i64::MIN] {
        if let Ok(d) = parsed.deadlines(now) {
            if parsed.fresh == FreshPeriod::Forever {
                assert_eq!((d.fresh_until, d.expire_at), (NO_DEADLINE, NO_DEADLINE));
            } else {
                assert_eq!(d.expire_at, d.fresh_until + parsed.stale_ms);
            }
        }
    }
}

fn check_get(opts: &[&[u8]]) {
    let g = match parse_get(opts) {
        Ok(g) => g,
        Err(e) => {
            assert!(e.to_string().starts_with("ERR "), "{e:?}");
            return;
        }
    };
    match g.lease {
        Some(l) => {
            assert!(l.lease_ms > 0);
            assert!(l.wait_ms.is_none_or(|w| w > 0));
            assert!(l.beta.is_none_or(|b| b.is_finite() && b > 0.0));
        }
        None => assert!(!g.with_ttl),
    }
    // Every option is a known word or the value right after one, so at most 8 arguments
    // (ENCODED, WITHTTL, LEASE ms, WAIT ms, BETA number).
    assert!(opts.len() <= 8, "{opts:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let max_tags = usize::from(first & 63);
    let opts: Vec<&[u8]> = if rest.is_empty() { Vec::new() } else { rest.split(|&b| b == b'\n').collect() };
    check_set(&opts, max_tags);
    check_get(&opts);
    for arg in &opts {
        check_numbers(arg);
    }
});
