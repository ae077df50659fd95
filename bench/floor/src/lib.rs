//! The floor of `make bench`: a Rust proxy-wasm HTTP filter that does
//! nothing. Envoy still enters its VM for every callback of every stream and
//! the SDK still dispatches them, so what this costs is what any Rust wasm
//! filter pays before it does any work; grpc-guard's cost is measured against
//! it. It is built for wasm32 only; on other targets the crate is empty.

#[cfg(target_arch = "wasm32")]
mod filter {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::ContextType;

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
    }}

    struct Root;

    impl Context for Root {}

    impl RootContext for Root {
        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Stream))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    /// Every callback is the SDK's default: continue.
    struct Stream;

    impl Context for Stream {}

    impl HttpContext for Stream {}
}
