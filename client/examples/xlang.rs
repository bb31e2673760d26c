//! A line-driven helper over tiercache-client, for the Python client's cross-language tests
//! (`python/tests/test_xlang.py`): it writes entries Python must read, reads entries Python wrote, and
//! keeps an L1 whose coherence with Python's writes and invalidations the tests observe.
//!
//! ```text
//! cargo run -p tiercache-client --example xlang -- redis://127.0.0.1:6379/ <namespace>
//! ```
//!
//! Reads one command per line on stdin and answers one line on stdout:
//!
//! | command | answer |
//! |---|---|
//! | `set <key> <id> <name> <tag> [big]` | `OK`; stores a `Profile` (big: a 4 KB name, so the client lz4-frames it) |
//! | `get <key>` | `VALUE <id> <active> <score> <tags,comma-separated> <name>` or `NONE` (L1, then a plain Redis read) |
//! | `load <key> <tag>` | `VALUE ...`: `get_or_load`, whose loader returns id 0, name `rust-loaded` |
//! | `setraw <key> <hex>` / `getraw <key>` | `OK` / `RAW <hex>` or `NONE`: bytes stored verbatim (`Raw`) |
//! | `invalidate <tag>` | `COUNT <n>` |
//! | `delete <key>` | `OK` |
//! | `l1 <key>` | `L1 yes` if the next read of the key would be an L1 hit, else `L1 no` (counts a read) |
//! | `metrics` | `METRICS l1_hits=.. l2_hits=.. loads=.. invalidations_received=.. l1_resets=..` |
//! | `quit` | exits |

use std::io::{BufRead, Write};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tiercache_client::{Opts, Raw, TierCache};

/// What both languages exchange: a MessagePack map with named fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Profile {
    id: u64,
    name: String,
    tags: Vec<String>,
    active: bool,
    score: f64,
}

fn show(p: &Profile) -> String {
    format!("VALUE {} {} {} {} {}", p.id, p.active, p.score, p.tags.join(","), p.name)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap_or(0)).collect()
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "redis://127.0.0.1:6379/".into());
    let ns = args.next().unwrap_or_else(|| "app".into());
    let cache = TierCache::builder(url)
        .namespace(ns)
        .l1_ttl(Duration::from_secs(60))
        .default_ttl(Duration::from_secs(300))
        .build()
        .await
        .expect("connect");
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["set", key, id, name, tag, rest @ ..] => {
                let name =
                    if rest.first() == Some(&"big") { name.repeat(4096 / name.len().max(1) + 1) } else { (*name).to_owned() };
                let p = Profile { id: id.parse().unwrap_or(0), name, tags: vec![(*tag).to_owned()], active: true, score: 1.5 };
                match cache.set(key, &p, &Opts::default().tag(*tag)).await {
                    Ok(()) => "OK".to_owned(),
                    Err(e) => format!("ERR {e}"),
                }
            }
            ["get", key] => match cache.get::<Profile>(key).await {
                Ok(Some(p)) => show(&p),
                Ok(None) => "NONE".to_owned(),
                Err(e) => format!("ERR {e}"),
            },
            ["load", key, tag] => {
                let r = cache
                    .get_or_load(key, &Opts::default().tag(*tag), || async {
                        Ok::<_, std::convert::Infallible>(Profile {
                            id: 0,
                            name: "rust-loaded".into(),
                            tags: vec![],
                            active: false,
                            score: 0.0,
                        })
                    })
                    .await;
                match r {
                    Ok(p) => show(&p),
                    Err(e) => format!("ERR {e}"),
                }
            }
            ["setraw", key, h] => match cache.set(key, &Raw(unhex(h)), &Opts::default()).await {
                Ok(()) => "OK".to_owned(),
                Err(e) => format!("ERR {e}"),
            },
            ["getraw", key] => match cache.get::<Raw>(key).await {
                Ok(Some(Raw(b))) => format!("RAW {}", hex(&b)),
                Ok(None) => "NONE".to_owned(),
                Err(e) => format!("ERR {e}"),
            },
            ["invalidate", tag] => match cache.invalidate_tags(&[tag]).await {
                Ok(n) => format!("COUNT {n}"),
                Err(e) => format!("ERR {e}"),
            },
            ["delete", key] => match cache.delete(key).await {
                Ok(()) => "OK".to_owned(),
                Err(e) => format!("ERR {e}"),
            },
            ["l1", key] => {
                let before = cache.metrics().l1_hits;
                let _ = cache.get::<Profile>(key).await;
                format!("L1 {}", if cache.metrics().l1_hits > before { "yes" } else { "no" })
            }
            ["metrics"] => {
                let m = cache.metrics();
                format!(
                    "METRICS l1_hits={} l2_hits={} loads={} invalidations_received={} l1_resets={}",
                    m.l1_hits, m.l2_hits, m.loads, m.invalidations_received, m.l1_resets
                )
            }
            ["quit"] => break,
            _ => format!("ERR unknown command: {line}"),
        };
        if writeln!(out, "{answer}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
}
