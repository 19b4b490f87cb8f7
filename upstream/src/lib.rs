//! The tutorial's Django endpoint (`return Response("ok")`) as a tiny
//! hyper 1 + tokio service. It sits behind Envoy in tests, demos and
//! benchmarks, so it is built to be boring: every request gets the same
//! cheap answer, and nothing a client sends can make it panic.
//!
//! * any method, any path: `200`, `content-type: application/json`,
//!   body `"ok"` (a JSON string, as DRF renders `Response("ok")`);
//! * `GET /healthz`: `200`, body `{"status":"healthy"}`;
//! * any method, `/metered?tokens=T&via=header|trailer|json|sse&delay_ms=D&status=S`:
//!   usage `T` (echoed as sent; absent: none) as header or trailer
//!   `x-usage-tokens`, as `{"usage":{"total_tokens":T}}`, or as the last SSE
//!   event before `data: [DONE]`; the trailer needs `TE: trailers` over
//!   HTTP/1.1 (hyper's rule). Details and 400s: `src/metered.rs`;
//! * `HEAD` gets the same headers and no body.
//!
//! HTTP/1.1 (with keep-alive) and h2c are both served on the same port.
//!
//! # Layout
//!
//! * `src/lib.rs`: crate docs and [`run`], the accept loop with graceful
//!   shutdown.
//! * `src/service.rs`: the request handler (what each path answers).
//! * `src/metered.rs`: `/metered`'s query, answers and streamed bodies.
//! * `src/main.rs`: the `upstream` binary: argument/env parsing, runtime,
//!   binding, signal handling.

// Nothing a client sends may make the upstream panic (tests may).
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![deny(clippy::panic, clippy::indexing_slicing)]

mod metered;
mod service;

use std::future::Future;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

pub use metered::{MAX_DELAY_MS, MAX_TOKENS_LEN, MAX_TOKENS_VALUES, METERED_PATH, USAGE_FIELD};
pub use service::{HEALTH_BODY, HEALTH_PATH, OK_BODY};

/// How long in-flight requests get to finish once shutdown starts. Idle
/// keep-alive connections close at once; this only bounds slow requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Pause after a failed `accept` (e.g. EMFILE), so the loop does not spin
/// while the process is out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves every connection accepted on `listener` until `shutdown` resolves,
/// then stops accepting, waits (at most a few seconds) for in-flight requests
/// and returns `Ok(())`.
///
/// Each connection runs in its own task. Accept errors are logged to stderr
/// and retried; a connection that sends garbage is simply closed.
pub async fn run(listener: TcpListener, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        let stream = tokio::select! {
            // Shutdown wins over a ready accept, so a stopping server takes
            // no new connections.
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(err) => {
                    eprintln!("upstream: accept failed: {err}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // Latency matters more than packet count for a benchmark upstream.
        let _ = stream.set_nodelay(true);

        let conn = builder
            .serve_connection(TokioIo::new(stream), service_fn(service::handle))
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // Resets and malformed requests are routine under load tests;
            // logging each one would only drown real problems.
            let _ = conn.await;
        });
    }

    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!(
            "upstream: connections still open after {}s, not waiting any longer",
            SHUTDOWN_GRACE.as_secs()
        );
    }
    Ok(())
}
