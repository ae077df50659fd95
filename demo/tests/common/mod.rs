use std::net::SocketAddr;

use grpc_guard_demo::{serve, Observed};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A demo server on a free loopback port, stopped when dropped so a failing
/// test does not leave it serving.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub observed: Observed,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl RunningServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let observed = Observed::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = stopped.await;
        };
        let task = tokio::spawn({
            let observed = observed.clone();
            async move {
                serve(listener, observed, shutdown).await.expect("serve");
            }
        });
        Self { addr, observed, stop: Some(stop), task }
    }

    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}
