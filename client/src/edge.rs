//! Response headers that tag a page at a CDN or a Varnish with the same tags as the cache entries it
//! was built from, so that `TIERCACHE.INVALIDATE` can purge the page too (the `tiercache purge`
//! subcommand of the `tiercache-cli` crate listens to the invalidation messages and purges the tags).
//!
//! | CDN | response header | separator | purge |
//! |---|---|---|---|
//! | Fastly | `Surrogate-Key` | space | `POST /service/{id}/purge` with a `Surrogate-Key` header |
//! | Cloudflare | `Cache-Tag` | comma | `POST /client/v4/zones/{zone}/purge_cache` `{"tags": [...]}` |
//! | Varnish + vmod xkey | `xkey` | space | `PURGE` with an `xkey-purge` header (the shipped VCL) |
//!
//! Tags are binary-safe in tiercache, header values are not: each tag becomes an *edge key* with
//! [`edge_key`]: bytes `0x21..=0x7E` other than `,` and `%` stay as they are (so `user:42` is `user:42`),
//! every other byte is written `%XX` (upper-case hex), and a key that would be longer than
//! [`MAX_KEY_LEN`] is replaced by `tc~` and the 16 hex digits of its tag's 64-bit FNV-1a hash. The
//! purger encodes the tags of each invalidation message the same way. (Cloudflare compares tags without
//! case: `User:1` and `user:1` purge each other there, which purges more, never less.)
//!
//! A header longer than its CDN takes is refused ([`TooLong`]) rather than cut: a page missing one of
//! its tags at the edge would never be purged by that tag. Serve such a page uncacheable at the edge,
//! or tag it with a coarser tag.

use std::borrow::Cow;
use std::fmt;

/// The longest edge key (Fastly and Cloudflare both take keys of up to 1024 bytes).
pub const MAX_KEY_LEN: usize = 1024;

/// Where the page is cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cdn {
    /// `Surrogate-Key: a b c` (at most 16 384 bytes).
    Fastly,
    /// `Cache-Tag: a,b,c` (at most 16 384 bytes in all).
    Cloudflare,
    /// `xkey: a b c`, read by vmod xkey (at most 8 000 bytes: Varnish refuses a response header longer
    /// than `http_resp_hdr_len`, 8 KiB by default, name included).
    Varnish,
}

impl Cdn {
    /// The response header the CDN reads the keys from.
    pub fn header_name(self) -> &'static str {
        match self {
            Cdn::Fastly => "Surrogate-Key",
            Cdn::Cloudflare => "Cache-Tag",
            Cdn::Varnish => "xkey",
        }
    }

    /// What goes between two keys.
    pub fn separator(self) -> &'static str {
        match self {
            Cdn::Cloudflare => ",",
            Cdn::Fastly | Cdn::Varnish => " ",
        }
    }

    /// The longest header value this module writes for the CDN.
    pub fn max_header_len(self) -> usize {
        match self {
            Cdn::Fastly | Cdn::Cloudflare => 16_384,
            Cdn::Varnish => 8_000,
        }
    }
}

/// The header would be longer than the CDN takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TooLong {
    /// The CDN whose limit it passed.
    pub cdn: Cdn,
    /// The length the value would have had.
    pub len: usize,
}

impl fmt::Display for TooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} header of {} bytes is longer than the {} bytes {:?} takes",
            self.cdn.header_name(),
            self.len,
            self.cdn.max_header_len(),
            self.cdn
        )
    }
}

impl std::error::Error for TooLong {}

fn keeps(b: u8) -> bool {
    (0x21..=0x7E).contains(&b) && b != b',' && b != b'%'
}

/// 64-bit FNV-1a: stable across processes, versions and languages, which a std hasher is not.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The header-safe form of a tag (see the module docs). Borrowed when the tag needs no escaping.
pub fn edge_key(tag: &[u8]) -> Cow<'_, str> {
    let escapes = tag.iter().filter(|&&b| !keeps(b)).count();
    let len = tag.len() + 2 * escapes;
    if len > MAX_KEY_LEN || tag.is_empty() {
        return Cow::Owned(format!("tc~{:016x}", fnv1a64(tag)));
    }
    if escapes == 0 {
        // Every byte is ASCII, so this cannot fail.
        if let Ok(s) = std::str::from_utf8(tag) {
            return Cow::Borrowed(s);
        }
    }
    let mut s = String::with_capacity(len);
    for &b in tag {
        if keeps(b) {
            s.push(char::from(b));
        } else {
            s.push('%');
            s.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            s.push(char::from(b"0123456789ABCDEF"[usize::from(b & 15)]));
        }
    }
    Cow::Owned(s)
}

/// The header value that tags a response with `tags` at `cdn`: their edge keys, without repeats, in
/// the order given.
pub fn header_value<I, T>(cdn: Cdn, tags: I) -> Result<String, TooLong>
where
    I: IntoIterator<Item = T>,
    T: AsRef<[u8]>,
{
    let mut out = String::new();
    let mut seen = std::collections::HashSet::new();
    for t in tags {
        let k = edge_key(t.as_ref()).into_owned();
        if !seen.insert(k.clone()) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(cdn.separator());
        }
        out.push_str(&k);
    }
    if out.len() > cdn.max_header_len() {
        return Err(TooLong { cdn, len: out.len() });
    }
    Ok(out)
}

/// `Surrogate-Key` value (Fastly).
pub fn surrogate_key<I: IntoIterator<Item = T>, T: AsRef<[u8]>>(tags: I) -> Result<String, TooLong> {
    header_value(Cdn::Fastly, tags)
}

/// `Cache-Tag` value (Cloudflare).
pub fn cache_tag<I: IntoIterator<Item = T>, T: AsRef<[u8]>>(tags: I) -> Result<String, TooLong> {
    header_value(Cdn::Cloudflare, tags)
}

/// `xkey` value (Varnish with vmod xkey).
pub fn xkey<I: IntoIterator<Item = T>, T: AsRef<[u8]>>(tags: I) -> Result<String, TooLong> {
    header_value(Cdn::Varnish, tags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_tags_pass_unchanged() {
        assert!(matches!(edge_key(b"user:42"), Cow::Borrowed("user:42")));
        assert_eq!(edge_key(b"ns:app:v3"), "ns:app:v3");
        assert_eq!(edge_key(b"a-b_c.d/e~!\"#$&'()*+;<=>?@[\\]^`{|}"), "a-b_c.d/e~!\"#$&'()*+;<=>?@[\\]^`{|}");
    }

    #[test]
    fn separators_escape_and_binary_are_escaped() {
        assert_eq!(edge_key(b"a b"), "a%20b");
        assert_eq!(edge_key(b"a,b"), "a%2Cb");
        assert_eq!(edge_key(b"50%"), "50%25");
        assert_eq!(edge_key(b"\0\xff\n"), "%00%FF%0A");
        assert_eq!(edge_key("é".as_bytes()), "%C3%A9");
        // Escaping is injective: distinct tags never share a key (below the length limit).
        assert_ne!(edge_key(b"a%2Cb"), edge_key(b"a,b"));
    }

    #[test]
    fn long_and_empty_tags_are_hashed() {
        let long = vec![b'x'; MAX_KEY_LEN + 1];
        let k = edge_key(&long);
        assert_eq!(k.len(), 3 + 16);
        assert!(k.starts_with("tc~"));
        assert_eq!(k, edge_key(&long), "stable");
        assert_eq!(edge_key(&vec![b'x'; MAX_KEY_LEN]).len(), MAX_KEY_LEN);
        // 400 spaces escape to 1200 bytes: hashed too.
        assert!(edge_key(&[b' '; 400]).starts_with("tc~"));
        assert_eq!(edge_key(b""), format!("tc~{:016x}", 0xcbf2_9ce4_8422_2325u64));
        // Reference values of FNV-1a 64.
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn header_values_per_cdn() {
        let tags = ["user:42", "team 7", "user:42", "ns:app:v1"];
        assert_eq!(surrogate_key(tags).unwrap(), "user:42 team%207 ns:app:v1");
        assert_eq!(cache_tag(tags).unwrap(), "user:42,team%207,ns:app:v1");
        assert_eq!(xkey(tags).unwrap(), "user:42 team%207 ns:app:v1");
        assert_eq!(Cdn::Fastly.header_name(), "Surrogate-Key");
        assert_eq!(Cdn::Cloudflare.header_name(), "Cache-Tag");
        assert_eq!(Cdn::Varnish.header_name(), "xkey");
        assert_eq!(xkey(Vec::<&[u8]>::new()).unwrap(), "");
        let bytes: Vec<Vec<u8>> = vec![b"\x01".to_vec(), b"ok".to_vec()];
        assert_eq!(xkey(&bytes).unwrap(), "%01 ok");
    }

    #[test]
    fn too_long_is_refused_not_cut() {
        // 1000 keys of 9 bytes + separators: 9999 bytes, over Varnish's 8000, under the CDNs' 16384.
        let tags: Vec<String> = (0..1000).map(|i| format!("tag:{i:05}")).collect();
        let e = xkey(&tags).unwrap_err();
        assert_eq!(e, TooLong { cdn: Cdn::Varnish, len: 9999 });
        assert!(e.to_string().contains("xkey header of 9999 bytes"));
        assert_eq!(surrogate_key(&tags).unwrap().len(), 9999);
        let more: Vec<String> = (0..2000).map(|i| format!("tag:{i:05}")).collect();
        assert!(cache_tag(&more).is_err());
        assert!(surrogate_key(&more).is_err());
    }
}
