//! The longest single tag-index operation, measured in-process (no server, no network), for issue 9:
//!
//! 1. N entries attached under one tag (the namespace tag a client puts on every key): the longest
//!    single attach with the index's LinTable key sets, next to the longest single insert into a std
//!    `HashSet<Box<[u8]>>` (the key set before the change, which doubles and rehashes).
//! 2. One invalidation of 1024 tags x 300 entries: the index's per-tag sum, next to the distinct-entry
//!    count the index did before (every key of every set looked up in the larger sets).
//!
//! This machine kind is shared and a process can be descheduled for hundreds of milliseconds, so a
//! plain maximum measures the scheduler. Each operation is timed in every one of ROUNDS runs and its
//! fastest time kept; the figure is the largest of those: a rehash stall happens at the same insert in
//! every run, preemption does not. The invalidations keep their fastest run.
//!
//!   cargo run --release -p tiercache-core --example index_growth [N] [ROUNDS]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use ahash::RandomState;
use tiercache_core::index::Registry;
use tiercache_core::tags::TagList;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let rounds: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    let keys: Vec<Vec<u8>> = (0..n).map(|i| format!("g:{i}").into_bytes()).collect();

    let (mut old_ns, mut new_ns) = (vec![u64::MAX; n], vec![u64::MAX; n]);
    for _ in 0..rounds {
        let mut set: HashSet<Box<[u8]>, RandomState> = HashSet::default();
        for (k, best) in keys.iter().zip(old_ns.iter_mut()) {
            let t = Instant::now();
            set.insert(Box::from(&k[..]));
            *best = (*best).min(t.elapsed().as_nanos() as u64);
        }
        drop(set);

        let mut r = Registry::new();
        let mut lists = Vec::with_capacity(n);
        for (k, best) in keys.iter().zip(new_ns.iter_mut()) {
            let mut l = TagList::new(&[b"ns"]);
            let t = Instant::now();
            r.attach(0, k, &mut l);
            *best = (*best).min(t.elapsed().as_nanos() as u64);
            lists.push(l);
        }
        drop((r, lists));
    }
    let worst = |v: &[u64]| v.iter().enumerate().max_by_key(|(_, &t)| t).map(|(i, &t)| (i, t / 1000)).unwrap_or((0, 0));
    let (old_at, old_max) = worst(&old_ns);
    let (new_at, new_max) = worst(&new_ns);
    println!("| {n} entries under one tag | longest single insert (µs) | at insert number |");
    println!("|---|---|---|");
    println!("| std HashSet key set (before) | {old_max} | {old_at} |");
    println!("| LinTable key set, whole Registry::attach (after) | {new_max} | {new_at} |");

    // 1024 tags x 300 entries, entry i under tags i % 1024 and (i + 1) % 1024.
    let tags: Vec<Vec<u8>> = (0..1024).map(|t| format!("t{t}").into_bytes()).collect();
    let names: Vec<&[u8]> = tags.iter().map(|t| &t[..]).collect();
    let m = 1024 * 300 / 2;
    let (mut old_t, mut new_t) = (Duration::MAX, Duration::MAX);
    let (mut old_count, mut new_count) = (0, 0);
    for round in 0..rounds.max(2) {
        if round < 2 {
            old_count = old_distinct_count(m, &mut old_t);
        }
        let mut r = Registry::new();
        for i in 0..m {
            let mut l = TagList::new(&[names[i % 1024], names[(i + 1) % 1024]]);
            r.attach(0, format!("m:{i}").as_bytes(), &mut l);
        }
        let t = Instant::now();
        new_count = r.invalidate(0, &names, true);
        new_t = new_t.min(t.elapsed());
        drop(r);
    }
    println!();
    println!("| one invalidation of 1024 tags x 300 entries | count | time (µs) |");
    println!("|---|---|---|");
    println!("| distinct entries, looked up across sets (before) | {old_count} | {} |", old_t.as_micros());
    println!("| sum of the tags' set sizes (after) | {new_count} | {} |", new_t.as_micros());
}

/// The index's distinct count before the change, over 1024 sets of 300 keys (each key in two sets): every
/// key of every set looked up in all the larger sets. Keeps the fastest time in `best`.
fn old_distinct_count(m: usize, best: &mut Duration) -> usize {
    let mut sets: Vec<HashSet<Box<[u8]>, RandomState>> = (0..1024).map(|_| HashSet::default()).collect();
    for i in 0..m {
        let k: Box<[u8]> = format!("m:{i}").into_bytes().into();
        sets[i % 1024].insert(k.clone());
        sets[(i + 1) % 1024].insert(k);
    }
    let t = Instant::now();
    sets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut count = 0;
    for (i, set) in sets.iter().enumerate() {
        count += if i == 0 { set.len() } else { set.iter().filter(|k| !sets[..i].iter().any(|s| s.contains(*k))).count() };
    }
    *best = (*best).min(t.elapsed());
    drop(sets);
    count
}
