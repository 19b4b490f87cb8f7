//! Memory stays bounded whatever keys clients mint.
//!
//! Envoy never frees a shared-data key, so a limiter keeping one entry per
//! API key grows without bound under a flood of fresh keys. Ours keeps a
//! fixed table of slots made at start-up. Here 200,000 distinct keys flood
//! an Envoy in two waves of 100,000: its memory after the second wave is
//! what it was after the first (within the noise of allocator and stats
//! growth), and a throttled hot key stays throttled throughout, because the
//! flood's keys carry one request of debt each and eviction takes the least
//! indebted state first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use e2e::http::Conn;
use e2e::topology::OneEnvoy;

const WAVE: usize = 100_000;
const THREADS: usize = 8;
const MIB: u64 = 1024 * 1024;

/// Sends `WAVE` requests, each with a key never seen before, over
/// keep-alive connections; returns how many were admitted.
fn flood(addr: &str, wave: usize) -> usize {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || {
                    let mut conn = Conn::connect(addr).unwrap();
                    let mut admitted = 0;
                    for i in (t..WAVE).step_by(THREADS) {
                        let target = format!("/?api_key=flood-{wave}-{i}");
                        let r = match conn.get(&target) {
                            Ok(r) => r,
                            Err(_) => {
                                conn = Conn::connect(addr).unwrap();
                                conn.get(&target).unwrap()
                            }
                        };
                        assert_ne!(r.status, 503, "{r:?}");
                        admitted += usize::from(r.status == 200);
                    }
                    admitted
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    })
}

#[test]
fn a_flood_of_distinct_keys_keeps_memory_bounded_and_the_hot_key_throttled() {
    // Every fresh key may send 10/min (one request of debt: 6 s); the hot
    // key's override is 10/hour, so once throttled it carries ~an hour of
    // debt and is the last state any collision would evict.
    let local = OneEnvoy::local(
        r#"{"limits": ["10/min"], "overrides": [{"key": "hot", "limits": ["10/hour"]}]}"#,
        2,
    );
    let addr = local.addr();
    let hot = |conn: &mut Conn| conn.get("/?api_key=hot").unwrap().status;
    let mut conn = Conn::connect(&addr).unwrap();
    let first: Vec<u16> = (0..11).map(|_| hot(&mut conn)).collect();
    assert_eq!(first, [vec![200; 10], vec![429]].concat());

    let rss = || local.envoy.rss_bytes().unwrap();
    let at_start = rss();
    let stop = AtomicBool::new(false);
    let (admitted, hot_statuses, rss_after) = std::thread::scope(|s| {
        let prober = s.spawn(|| {
            let mut conn = Conn::connect(&addr).unwrap();
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                seen.push(hot(&mut conn));
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        });
        let started = Instant::now();
        let mut admitted = Vec::new();
        let mut rss_after = Vec::new();
        for wave in 0..2 {
            admitted.push(flood(&addr, wave));
            rss_after.push(rss());
        }
        stop.store(true, Ordering::Relaxed);
        eprintln!("flood of {} keys took {:?}", 2 * WAVE, started.elapsed());
        (admitted, prober.join().unwrap(), rss_after)
    });
    eprintln!(
        "Envoy RSS: {} MiB at start, {} MiB after {WAVE} keys, {} MiB after {}",
        at_start / MIB,
        rss_after[0] / MIB,
        rss_after[1] / MIB,
        2 * WAVE
    );

    // Every fresh key is admitted: the table never refuses a newcomer.
    assert_eq!(admitted, vec![WAVE, WAVE]);
    assert!(
        hot_statuses.len() > 50,
        "the prober ran {} times",
        hot_statuses.len()
    );
    assert!(
        hot_statuses.iter().all(|s| *s == 429),
        "the hot key got through during the flood: {hot_statuses:?}"
    );
    // Bounded: the second wave of 100,000 new keys adds (next to) nothing.
    // The documented bound (docs/design.md) is 16 MiB for the table's values,
    // stats and allocator slack, whatever the number of keys.
    let growth_first = rss_after[0].saturating_sub(at_start);
    let growth_second = rss_after[1].saturating_sub(rss_after[0]);
    assert!(
        growth_first < 16 * MIB,
        "first wave grew RSS by {} MiB",
        growth_first / MIB
    );
    assert!(
        growth_second < 4 * MIB,
        "second wave grew RSS by {} MiB",
        growth_second / MIB
    );
    assert_eq!(
        local.metric_at_least("allowed", (2 * WAVE + 10) as u64),
        (2 * WAVE + 10) as u64
    );
    eprintln!(
        "slot evictions (least-indebted flood keys): {}",
        local.metric("slot_evictions")
    );
}
