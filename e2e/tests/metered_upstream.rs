//! The upstream's `/metered` endpoint through the real Envoy running the
//! shipped `envoy/local.yaml` (filter included): a client sees the usage
//! figure in every channel, the trailer included, which HTTP/1.1 loses
//! unless the config enables trailers on both of Envoy's sides and the
//! client sends `TE: trailers` (Envoy forwards it; hyper, the upstream's
//! server, sends trailers only when the request has it).

use std::process::Command;

use e2e::http::Conn;
use e2e::topology::OneEnvoy;

/// High enough that no request here is throttled.
const PLUGIN: &str = r#"{"limits": ["1000/s"], "key_sources": [{"query": "api_key"}]}"#;

const SSE_BODY: &str = "data: {\"delta\":\"Hello\"}\n\n\
                        data: {\"delta\":\" from\"}\n\n\
                        data: {\"delta\":\" upstream\"}\n\n\
                        data: {\"usage\":{\"total_tokens\":14}}\n\n\
                        data: [DONE]\n\n";

#[test]
fn a_client_through_envoy_sees_the_usage_in_every_channel() {
    let one = OneEnvoy::local(PLUGIN, 1);
    let mut conn = Conn::connect(&one.addr()).unwrap();
    let te: &[(&str, &[u8])] = &[("TE", b"trailers")];
    let get = |conn: &mut Conn, query: &str| {
        let target = format!("/metered?api_key=k1&{query}");
        let resp = conn.request("GET", target.as_bytes(), te).unwrap();
        assert_eq!(resp.status, 200, "{query}: {resp:?}");
        resp
    };

    let resp = get(&mut conn, "tokens=11");
    assert_eq!(resp.header("x-usage-tokens"), Some("11"), "{resp:?}");
    assert_eq!(resp.body_str(), "\"ok\"");

    let resp = get(&mut conn, "tokens=12&via=trailer");
    assert_eq!(resp.trailer("x-usage-tokens"), Some("12"), "{resp:?}");
    assert_eq!(resp.body_str(), "\"ok\"");

    let resp = get(&mut conn, "tokens=13&via=json");
    assert_eq!(resp.body_str(), r#"{"usage":{"total_tokens":13}}"#);

    let resp = get(&mut conn, "tokens=14&via=sse");
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    assert_eq!(resp.body_str(), SSE_BODY);

    // Upstream 400s pass through as they are.
    let target = b"/metered?api_key=k1&via=bogus";
    let resp = conn.request("GET", target, te).unwrap();
    assert_eq!(resp.status, 400, "{resp:?}");
    assert!(resp.body_str().starts_with(r#"{"detail":"via: "#));

    assert!(!conn.is_closed());
    assert_eq!(one.metric("allowed"), 5);
}

#[test]
fn an_http2_client_through_envoy_sees_the_trailer() {
    let one = OneEnvoy::local(PLUGIN, 1);
    let url = format!(
        "http://{}/metered?api_key=k2&tokens=21&via=trailer",
        one.addr()
    );
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10"])
        .args(["--http2-prior-knowledge", "--header", "te: trailers"])
        .args(["--output", "/dev/null", "--dump-header", "-", &url])
        .output()
        .unwrap_or_else(|e| panic!("cannot run curl ({e}): `make apt PKG=curl` installs it"));
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // curl writes the trailer after the head's empty line.
    let (head, trailers) = dump.split_once("\r\n\r\n").unwrap_or((&dump, ""));
    assert!(head.starts_with("HTTP/2 200"), "{dump}");
    assert!(!head.contains("x-usage-tokens: "), "{dump}");
    assert_eq!(trailers.trim(), "x-usage-tokens: 21", "{dump}");
}
