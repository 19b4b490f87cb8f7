//! gRPC clients get gRPC statuses, not HTTP ones mapped by Envoy: a throttled
//! call is `RESOURCE_EXHAUSTED` (8), with the quota headers and the retry
//! delay, instead of the `UNAVAILABLE` that gRPC clients retry at once; a
//! missing key `UNAUTHENTICATED` (16), a bad one `INVALID_ARGUMENT` (3), a
//! store failure under `deny` `UNAVAILABLE` (14). Over h2c through the real
//! Envoy, with curl speaking HTTP/2 with prior knowledge, as a gRPC client
//! does on a plaintext channel.

use std::process::Command;

use e2e::topology::{GlobalEnvoy, OneEnvoy};

/// The response head of one gRPC call, lower-cased header names; the status
/// line first. The request ends with its headers: the filter decides on
/// them, and a body still on its way when Envoy answers would have Envoy
/// reset the stream under curl.
fn grpc_call(addr: &str, api_key: Option<&str>) -> Vec<(String, String)> {
    let mut curl = Command::new("curl");
    curl.args([
        "--silent",
        "--show-error",
        "--max-time",
        "10",
        "--http2-prior-knowledge",
        "--output",
        "/dev/null",
        "--dump-header",
        "-",
        "--request",
        "POST",
        "--header",
        "content-type: application/grpc",
        "--header",
        "te: trailers",
    ]);
    if let Some(key) = api_key {
        curl.args(["--header", &format!("x-api-key: {key}")]);
    }
    curl.arg(format!("http://{addr}/demo.Echo/Say"));
    let out = curl
        .output()
        .unwrap_or_else(|e| panic!("cannot run curl ({e}): `make apt PKG=curl` installs it"));
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let line = line.trim_end();
            match line.split_once(": ") {
                Some((name, value)) => Some((name.to_ascii_lowercase(), value.to_string())),
                None => line
                    .strip_prefix("HTTP/2 ")
                    .map(|status| (":status".to_string(), status.to_string())),
            }
        })
        .collect()
}

fn header<'a>(head: &'a [(String, String)], name: &str) -> Option<&'a str> {
    head.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn throttled_missing_and_bad_keys_get_grpc_statuses() {
    let local = OneEnvoy::local(
        r#"{"limits": ["1/min"], "max_key_length": 8,
            "key_sources": [{"header": "x-api-key"}]}"#,
        2,
    );
    let addr = local.addr();
    let first = grpc_call(&addr, Some("k1"));
    assert_eq!(
        header(&first, "grpc-status"),
        None,
        "let through: {first:?}"
    );

    let throttled = grpc_call(&addr, Some("k1"));
    // Trailers-only: HTTP 200, the status and the quota beside it.
    assert_eq!(header(&throttled, ":status"), Some("200"), "{throttled:?}");
    assert_eq!(
        header(&throttled, "grpc-status"),
        Some("8"),
        "{throttled:?}"
    );
    assert_eq!(header(&throttled, "retry-after"), Some("60"));
    assert_eq!(header(&throttled, "ratelimit"), Some("\"1/min\";r=0;t=60"));
    assert!(header(&throttled, "grpc-message").is_some_and(|m| m.contains("throttled")));

    let missing = grpc_call(&addr, None);
    assert_eq!(header(&missing, "grpc-status"), Some("16"), "{missing:?}");
    let bad = grpc_call(&addr, Some("much-too-long"));
    assert_eq!(header(&bad, "grpc-status"), Some("3"), "{bad:?}");
    assert_eq!(local.metric_at_least("throttled", 1), 1);
}

#[test]
fn a_store_failure_under_deny_is_unavailable() {
    let global = GlobalEnvoy::start(
        Some(
            r#"{"limits": ["1/min"], "failure_mode": "deny",
                "store": {"webdis": {"cluster": "no_such_cluster"}}}"#,
        ),
        1,
    );
    let failed = grpc_call(&global.addr(), Some("k1"));
    assert_eq!(header(&failed, "grpc-status"), Some("14"), "{failed:?}");
}
