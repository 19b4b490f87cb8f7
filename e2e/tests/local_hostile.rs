//! Hostile inputs never break a worker. A panic in the filter would kill
//! that worker's Wasm VM and turn it into a 503 machine until restart, so
//! after a barrage of odd requests every worker must still answer normally.

use e2e::http::{self, Conn};
use e2e::topology::OneEnvoy;

const WORKERS: u32 = 4;

/// Raw requests no well-behaved client sends. Envoy itself refuses some
/// (400, 431); the rest reach the filter.
fn hostile_requests() -> Vec<Vec<u8>> {
    let mut requests: Vec<Vec<u8>> = Vec::new();
    let mut get = |target: &[u8], headers: &[(&str, &[u8])]| {
        let mut r = b"GET ".to_vec();
        r.extend_from_slice(target);
        r.extend_from_slice(b" HTTP/1.1\r\nHost: t\r\n");
        for (name, value) in headers {
            r.extend_from_slice(name.as_bytes());
            r.extend_from_slice(b": ");
            r.extend_from_slice(value);
            r.extend_from_slice(b"\r\n");
        }
        r.extend_from_slice(b"Connection: close\r\n\r\n");
        requests.push(r);
    };
    for target in [
        &b"/?api_key=%"[..],
        b"/?api_key=%%",
        b"/?api_key=%0",
        b"/?api_key=%00",
        b"/?api_key=%00%00%00",
        b"/?api_key=%C0%AF",
        b"/?api_key=%ED%A0%80",
        b"/?api_key=%F4%90%80%80",
        b"/?api_key=\xff\xfe",
        b"/?api_key=a&api_key=",
        b"/?api_key=a&&&&api_key=b",
        b"/?api_key&api_key&api_key",
        b"/?=&=&=",
        b"/?&&&&",
        b"/??api_key=x",
        b"/?api_key=x#frag",
        b"/%2F%2E%2E/?api_key=../../etc",
        b"/?api_key=+++",
        b"/?api_key=%2B%2B",
        b"/?api_key=key%0D%0AX-Injected:%201",
        b"/?api%5Fkey=x&api_key=y",
        b"/?x=1;api_key=k",
        b"/?;;;;api_key=;;;&api_key",
        b"/?api_key=a;api%5fkey=b%3B;",
        b"*",
        b"http://evil.example/?api_key=abs",
    ] {
        get(target, &[]);
    }
    let huge_query = format!("/?api_key={}", "A".repeat(40_000));
    get(huge_query.as_bytes(), &[]);
    let huge_escaped = format!("/?api_key={}", "%41".repeat(10_000));
    get(huge_escaped.as_bytes(), &[]);
    let many_params = format!("/?{}api_key=last", "a=1&".repeat(5_000));
    get(many_params.as_bytes(), &[]);
    let big_header = vec![b'k'; 50_000];
    get(b"/", &[("x-api-key", &big_header)]);
    get(b"/", &[("x-api-key", b"\x80\x81\x82")]);
    get(b"/", &[("x-api-key", b"")]);
    get(
        b"/",
        &[
            ("x-api-key", b"a"),
            ("x-api-key", b"a"),
            ("x-api-key", b"a"),
        ],
    );
    get(b"/?api_key=q", &[("x-api-key", b"h")]);
    for method in [
        "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND", "BREW", "get",
    ] {
        requests.push(
            format!("{method} /?api_key=method-{method} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .into_bytes(),
        );
    }
    requests.push(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n".to_vec());
    requests.push(
        b"POST /?api_key=chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            .to_vec(),
    );
    requests.push(b"GET /?api_key=http10 HTTP/1.0\r\n\r\n".to_vec());
    requests.push(b"\x16\x03\x01\x00\x05hello".to_vec());
    requests.push(b"GET / HTTP/1.1\r\nHost: t\r\nx-api-key: a\r\n".to_vec()); // never finished
    requests
}

#[test]
fn after_hostile_inputs_every_worker_still_answers_normally() {
    let local = OneEnvoy::local(r#"{"limits": ["1000/s"]}"#, WORKERS);
    let addr = local.addr();
    let requests = hostile_requests();
    // Each request goes on a fresh connection, several times over, so the
    // kernel spreads the barrage across all the workers.
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..WORKERS * 2 {
        for request in &requests {
            let status =
                match http::send_raw_timeout(&addr, request, std::time::Duration::from_millis(500))
                {
                    Ok(Some(r)) => r.status,
                    Ok(None) | Err(_) => 0,
                };
            *statuses.entry(status).or_insert(0) += 1;
        }
    }
    eprintln!("status codes from the hostile barrage: {statuses:?}");
    for bad in [500, 502, 503, 504] {
        assert!(
            !statuses.contains_key(&bad),
            "a hostile request got {bad}: {statuses:?}"
        );
    }

    // Now ordinary traffic: 200 fresh connections reach every worker, and
    // every answer is the upstream's `ok`.
    let before = local.connections_per_worker();
    for i in 0..200 {
        let r = http::get(&addr, &format!("/?api_key=after-{i}")).unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body_str(), "\"ok\"");
    }
    let after = local.connections_per_worker();
    assert_eq!(after.len(), WORKERS as usize);
    for (worker, (b, a)) in before.iter().zip(&after).enumerate() {
        assert!(
            a > b,
            "worker {worker} served no ordinary request ({before:?} -> {after:?})"
        );
    }
    // And no VM died on the way: the filter still counts on every worker.
    let mut conn = Conn::connect(&addr).unwrap();
    assert_eq!(conn.get("/?api_key=%zz").unwrap().status, 400);
    let log = local.envoy.proc().log();
    for sign in [
        "panicked",
        "Wasm VM failed",
        "wasm trap",
        "Function: proxy_on",
    ] {
        assert!(!log.contains(sign), "Envoy log shows {sign:?}:\n{log}");
    }
    assert!(local.metric_at_least("invalid_key", 1) > 0);
}
