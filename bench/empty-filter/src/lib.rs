//! The Wasm floor: the cheapest useful proxy-wasm filter. It reads `:path`
//! (as any limiter must, to find `?api_key=`) and lets every request
//! through. `make bench` compares our filter with this, so the ratio shows
//! what the filter itself costs beyond simply being a Wasm filter.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MapType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request;

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let path = proxy_wasm::hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, ":path");
        std::hint::black_box(path.ok());
        Action::Continue
    }
}
