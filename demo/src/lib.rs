//! A real tonic gRPC service and client for exercising grpc-guard end to end.
//!
//! Every call tells the server which gRPC status to answer with (`fail_code`),
//! how long to take (`delay_ms`) and how big to reply (`reply_padding`), so a
//! test or `make run` can drive each branch of the filter's status mapping,
//! deadline policy and size accounting from the client side alone. The server
//! records what it saw in [`Observed`], so in-process tests can assert what the
//! upstream actually received and how many times it ran.
//!
//! This crate is test and demo tooling: it is never part of the `.wasm`.

pub mod bench;
mod duration;
pub mod envoy;
mod error;
pub mod etcd;
mod observed;
pub mod scenario;
mod service;
pub mod tour;

pub use duration::{parse_duration, DurationError};
pub use error::DemoError;
pub use observed::Observed;
pub use service::{DemoServer, EXECUTION_HEADER, MAX_MESSAGE_BYTES};

use std::future::Future;

use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};

/// Code generated from `proto/demo.proto` (package `grpcguard.demo.v1`).
pub mod pb {
    tonic::include_proto!("grpcguard.demo.v1");
}

/// How the demo server answers besides what each call asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeOptions {
    /// gzip-compress every answer to a client that accepts gzip.
    pub gzip: bool,
}

/// Serves the demo service on an already-bound listener until `shutdown`
/// resolves; binding is the caller's so tests can use port 0 and read the
/// address back before the first call.
pub async fn serve(
    listener: TcpListener,
    observed: Observed,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DemoError> {
    serve_with(listener, observed, ServeOptions::default(), shutdown).await
}

/// [`serve`], with `options`.
pub async fn serve_with(
    listener: TcpListener,
    observed: Observed,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DemoError> {
    let mut service = DemoServer::new(observed).into_service();
    if options.gzip {
        service = service.send_compressed(CompressionEncoding::Gzip);
    }
    Server::builder()
        .add_service(service.accept_compressed(CompressionEncoding::Gzip))
        // Without TCP_NODELAY small answers wait for the peer's delayed ACK.
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown)
        .await
        .map_err(DemoError::Serve)
}

/// Connects to `uri` now, failing if nothing answers there.
pub async fn connect(uri: &str) -> Result<pb::demo_client::DemoClient<Channel>, DemoError> {
    let channel =
        endpoint(uri)?.connect().await.map_err(|source| DemoError::Connect { uri: uri.to_owned(), source })?;
    Ok(client(channel))
}

/// A channel that connects on first use, so an unreachable target surfaces as
/// an `Unavailable` status on each call rather than as one connect error;
/// that is what the `down` scenario asserts.
pub fn lazy_channel(uri: &str) -> Result<Channel, DemoError> {
    Ok(endpoint(uri)?.connect_lazy())
}

/// A client that accepts replies as large as the server may send, so
/// `reply_padding` size tests are not cut short by tonic's 4 MiB default.
pub fn client(channel: Channel) -> pb::demo_client::DemoClient<Channel> {
    pb::demo_client::DemoClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

fn endpoint(uri: &str) -> Result<Endpoint, DemoError> {
    let endpoint = Endpoint::from_shared(uri.to_owned())
        .map_err(|source| DemoError::InvalidUri { uri: uri.to_owned(), source })?;
    // A bare `host:port` parses as a URI too, but every call on it would fail
    // with an opaque transport error; say what is wrong before the first call.
    if endpoint.uri().scheme().is_none() || endpoint.uri().authority().is_none() {
        return Err(DemoError::NotAbsolute { uri: uri.to_owned() });
    }
    Ok(endpoint)
}
