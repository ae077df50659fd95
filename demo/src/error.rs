use std::net::SocketAddr;

/// What can go wrong starting, serving or reaching the demo service.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot listen on {addr}: {source} (is another process using the port?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("demo server stopped with a transport error: {0}")]
    Serve(#[source] tonic::transport::Error),
    #[error("target {uri:?} is not a valid URI (expected e.g. http://127.0.0.1:50051): {source}")]
    InvalidUri {
        uri: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("target {uri:?} needs a scheme and a host, e.g. http://127.0.0.1:50051")]
    NotAbsolute { uri: String },
    #[error("cannot connect to {uri}: {source} (is the server running?)")]
    Connect {
        uri: String,
        #[source]
        source: tonic::transport::Error,
    },
}
