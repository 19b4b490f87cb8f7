//! The host calls the filter makes, each returning `Result`.
//!
//! The SDK's own wrappers `panic!` on any status they did not expect, and
//! its `String` header getter unwraps UTF-8 (a header with a byte >= 0x80
//! would abort the VM). A panic kills the VM and turns the worker into a 503
//! machine, so the few calls used here are declared again with a plain `u32`
//! status (no enum that an unknown value could make invalid), and every
//! status other than success is an error value.

#![allow(clashing_extern_declarations)]

use std::ptr::{null, null_mut};

/// A host status other than `Ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u32);

pub const NOT_FOUND: Status = Status(1);
pub const CAS_MISMATCH: Status = Status(8);
/// A shared queue with nothing in it.
pub const EMPTY: Status = Status(7);

pub const LOG_INFO: u32 = 2;
pub const LOG_WARN: u32 = 3;
pub const LOG_ERROR: u32 = 4;
pub const LOG_CRITICAL: u32 = 5;

const MAP_REQUEST_HEADERS: u32 = 0;
const MAP_RESPONSE_HEADERS: u32 = 2;
const MAP_RESPONSE_TRAILERS: u32 = 3;
const MAP_HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
const BUFFER_HTTP_RESPONSE_BODY: u32 = 1;
const BUFFER_HTTP_CALL_RESPONSE_BODY: u32 = 4;
const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
const METRIC_COUNTER: u32 = 0;
const METRIC_GAUGE: u32 = 1;
const STREAM_HTTP_REQUEST: u32 = 0;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_register_shared_queue(
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_enqueue_shared_queue(queue_id: u32, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_dequeue_shared_queue(
        queue_id: u32,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_done() -> u32;
}

// WASI, which Envoy's Wasm host implements: the clocks and randomness.
#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn clock_time_get(clock_id: u32, precision: u64, time: *mut u64) -> u32;
    fn random_get(buf: *mut u8, len: usize) -> u32;
}

const CLOCK_REALTIME: u32 = 0;
const CLOCK_MONOTONIC: u32 = 1;

fn check(status: u32) -> Result<(), Status> {
    if status == 0 {
        Ok(())
    } else {
        Err(Status(status))
    }
}

/// Takes ownership of a buffer the host allocated through the SDK's
/// `proxy_on_memory_allocate` (a boxed slice of exactly `size` bytes).
///
/// # Safety
/// `data` must be null or come from the host with `size` as its length.
unsafe fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

pub fn log(level: u32, message: &str) {
    // Logging must never fail a request; a refused log line is dropped.
    let _ = unsafe { proxy_log(level, message.as_ptr(), message.len()) };
}

/// The filter's clock: Envoy's monotonic clock, in nanoseconds. Everything
/// timed inside one Envoy process (local counters, the deny cache, metric
/// flushes, log throttling) uses it, so a wall-clock step (NTP) can neither
/// lock keys out nor hand them a fresh burst. It is one clock for every
/// worker of the process, and shared data lives no longer than the process.
/// Global mode decides on Redis `TIME` instead.
pub fn now_nanos() -> Result<u64, Status> {
    let mut now = 0u64;
    match unsafe { clock_time_get(CLOCK_MONOTONIC, 1, &mut now) } {
        0 => Ok(now),
        errno => Err(Status(errno)),
    }
}

/// The wall clock, Unix nanoseconds: only where the calendar places a
/// quota's periods (local mode, and a quota's period length in the deny
/// cache's headers). A step of it moves a quota's boundary, never its count.
pub fn wall_nanos() -> Result<u64, Status> {
    let mut now = 0u64;
    match unsafe { clock_time_get(CLOCK_REALTIME, 1, &mut now) } {
        0 => Ok(now),
        errno => Err(Status(errno)),
    }
}

/// `N` random bytes from the host.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], Status> {
    let mut out = [0u8; N];
    match unsafe { random_get(out.as_mut_ptr(), N) } {
        0 => Ok(out),
        errno => Err(Status(errno)),
    }
}

fn buffer(buffer_type: u32, max_size: usize) -> Result<Vec<u8>, Status> {
    let mut data = null_mut();
    let mut size = 0;
    let status = unsafe { proxy_get_buffer_bytes(buffer_type, 0, max_size, &mut data, &mut size) };
    if Status(status) == NOT_FOUND {
        return Ok(Vec::new());
    }
    check(status)?;
    Ok(unsafe { owned(data, size) })
}

pub fn plugin_configuration() -> Result<Vec<u8>, Status> {
    buffer(BUFFER_PLUGIN_CONFIGURATION, usize::MAX)
}

/// The body of the HTTP call being answered (in `on_http_call_response`).
pub fn http_call_response_body(size: usize) -> Result<Vec<u8>, Status> {
    buffer(BUFFER_HTTP_CALL_RESPONSE_BODY, size)
}

/// The first value of a header in a map; `Ok(None)` when absent.
fn header_value(map_type: u32, name: &[u8]) -> Result<Option<Vec<u8>>, Status> {
    let mut data = null_mut();
    let mut size = 0;
    let status = unsafe {
        proxy_get_header_map_value(map_type, name.as_ptr(), name.len(), &mut data, &mut size)
    };
    if Status(status) == NOT_FOUND {
        return Ok(None);
    }
    check(status)?;
    Ok(Some(unsafe { owned(data, size) }))
}

/// A request header (its first value: for a pseudo-header such as `:path`,
/// the only one).
pub fn request_header(name: &[u8]) -> Result<Option<Vec<u8>>, Status> {
    header_value(MAP_REQUEST_HEADERS, name)
}

/// The `:status` of the HTTP call being answered, if it parses.
pub fn http_call_response_status() -> Option<u32> {
    let value = header_value(MAP_HTTP_CALL_RESPONSE_HEADERS, b":status").ok()??;
    std::str::from_utf8(&value).ok()?.parse().ok()
}

/// Lets a paused request go on to the upstream.
pub fn resume_request() -> Result<(), Status> {
    check(unsafe { proxy_continue_stream(STREAM_HTTP_REQUEST) })
}

fn header_pairs(map_type: u32) -> Result<Vec<u8>, Status> {
    let mut data = null_mut();
    let mut size = 0;
    check(unsafe { proxy_get_header_map_pairs(map_type, &mut data, &mut size) })?;
    Ok(unsafe { owned(data, size) })
}

/// All request headers, serialized (see `ratelimit_core::header_map`).
pub fn request_header_pairs() -> Result<Vec<u8>, Status> {
    header_pairs(MAP_REQUEST_HEADERS)
}

/// All response headers, serialized (in `on_http_response_headers`).
pub fn response_header_pairs() -> Result<Vec<u8>, Status> {
    header_pairs(MAP_RESPONSE_HEADERS)
}

/// All response trailers, serialized (in `on_http_response_trailers`).
pub fn response_trailer_pairs() -> Result<Vec<u8>, Status> {
    header_pairs(MAP_RESPONSE_TRAILERS)
}

/// The response body chunk at hand (in `on_http_response_body`).
pub fn response_body(size: usize) -> Result<Vec<u8>, Status> {
    buffer(BUFFER_HTTP_RESPONSE_BODY, size)
}

pub fn add_response_header(name: &str, value: &str) -> Result<(), Status> {
    check(unsafe {
        proxy_add_header_map_value(
            MAP_RESPONSE_HEADERS,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Answers the request here. `headers` are serialized by the caller;
/// `grpc_status` is used by Envoy for a gRPC request only (`-1`: none).
pub fn send_local_response(
    status: u32,
    headers: &[u8],
    body: &[u8],
    grpc_status: i32,
) -> Result<(), Status> {
    check(unsafe {
        proxy_send_local_response(
            status,
            null(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            grpc_status,
        )
    })
}

/// A shared-data value and its CAS token; `Ok(None)` when the key is absent.
pub fn get_shared_data(key: &[u8]) -> Result<Option<(Vec<u8>, u32)>, Status> {
    let mut data = null_mut();
    let mut size = 0;
    let mut cas = 0;
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    if Status(status) == NOT_FOUND {
        return Ok(None);
    }
    check(status)?;
    Ok(Some((unsafe { owned(data, size) }, cas)))
}

/// Writes a shared-data value if its CAS token is still `cas` (0 writes
/// unconditionally). `Err(CAS_MISMATCH)` on a conflict.
pub fn set_shared_data(key: &[u8], value: &[u8], cas: u32) -> Result<(), Status> {
    check(unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    })
}

/// A host property such as `plugin_name`; `Ok(None)` when absent.
pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
    let mut serialized = Vec::new();
    for part in path {
        serialized.extend_from_slice(part.as_bytes());
        serialized.push(0);
    }
    let mut data = null_mut();
    let mut size = 0;
    let status =
        unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size) };
    if Status(status) == NOT_FOUND {
        return Ok(None);
    }
    check(status)?;
    Ok(Some(unsafe { owned(data, size) }))
}

pub fn define_counter(name: &str) -> Result<u32, Status> {
    define_metric(METRIC_COUNTER, name)
}

/// A gauge; Envoy sums what every VM adds to it.
pub fn define_gauge(name: &str) -> Result<u32, Status> {
    define_metric(METRIC_GAUGE, name)
}

fn define_metric(metric_type: u32, name: &str) -> Result<u32, Status> {
    let mut id = 0;
    check(unsafe { proxy_define_metric(metric_type, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

/// Asks for `on_tick` on the root context every `millis`.
pub fn set_tick_period(millis: u32) -> Result<(), Status> {
    check(unsafe { proxy_set_tick_period_milliseconds(millis) })
}

pub fn increment_metric(id: u32, by: i64) {
    // A metric that cannot be bumped must not fail the request.
    let _ = unsafe { proxy_increment_metric(id, by) };
}

/// Makes `context_id` the one later calls act on (a request, from the
/// root). `BadArgument` if the host has deleted it.
pub fn set_effective_context(context_id: u32) -> Result<(), Status> {
    check(unsafe { proxy_set_effective_context(context_id) })
}

/// Registers a shared queue under `name` for the current (root) context:
/// what is enqueued wakes it with `on_queue_ready`.
pub fn register_shared_queue(name: &str) -> Result<u32, Status> {
    let mut id = 0;
    check(unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn enqueue_shared_queue(queue_id: u32, value: &[u8]) -> Result<(), Status> {
    check(unsafe { proxy_enqueue_shared_queue(queue_id, value.as_ptr(), value.len()) })
}

/// The next item of a shared queue; `Ok(None)` when it is empty.
pub fn dequeue_shared_queue(queue_id: u32) -> Result<Option<Vec<u8>>, Status> {
    let mut data = null_mut();
    let mut size = 0;
    let status = unsafe { proxy_dequeue_shared_queue(queue_id, &mut data, &mut size) };
    if Status(status) == EMPTY {
        return Ok(None);
    }
    check(status)?;
    Ok(Some(unsafe { owned(data, size) }))
}

/// Tells the host a root context that delayed its `on_done` is finished.
pub fn done() -> Result<(), Status> {
    check(unsafe { proxy_done() })
}
