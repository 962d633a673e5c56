//! The benchmark's floor: a proxy-wasm HTTP filter that does no work of its own.
//!
//! Configuration (plugin `configuration` string): `{"read_bodies": false}` (default) returns
//! Continue from every callback: it measures what Envoy + V8 charge for any wasm filter
//! (context creation, one call per callback). `{"read_bodies": true}` also does what every
//! sluice body filter must do before its own logic: hold the request until the whole body is
//! buffered, copy it into the VM, and copy each response body chunk into the VM.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(NoopRoot { read_bodies: false }) });
}}

struct NoopRoot {
    read_bodies: bool,
}

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&config);
        self.read_bodies = text.replace(' ', "").contains("\"read_bodies\":true");
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop { read_bodies: self.read_bodies }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Noop {
    read_bodies: bool,
}

impl Context for Noop {}

impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        if self.read_bodies && !end_of_stream {
            Action::Pause // needs allow_on_headers_stop_iteration: true
        } else {
            Action::Continue
        }
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !self.read_bodies {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        std::hint::black_box(self.get_http_request_body(0, size));
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, _end_of_stream: bool) -> Action {
        if self.read_bodies {
            std::hint::black_box(self.get_http_response_body(0, size));
        }
        Action::Continue
    }
}
