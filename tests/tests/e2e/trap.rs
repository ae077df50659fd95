//! What Envoy 1.40 does when a plugin's VM traps anyway, under the failure
//! policy `envoy/envoy.yaml` ships (`FAIL_RELOAD`) and the one it replaced
//! (`fail_open: false`, that is `FAIL_CLOSED`). grpc-guard has no input that
//! makes it trap (the fuzz targets and the bad-input matrix look for one), so
//! the trap is forced in the floor filter (`bench/floor`, `{"probe":"trap"}`:
//! its VM traps on a request carrying `x-trap`), loaded with grpc-guard's own
//! filter configuration.

use std::time::{Duration, Instant};

use grpc_guard_demo::envoy::{Envoy, EnvoyParams, FAILURE_POLICY};
use grpc_guard_demo::pb::EchoRequest;
use tonic::Code;

use crate::support::*;

fn start(upstream: &Upstream, policy: &str) -> Envoy {
    let mut params = EnvoyParams::on_free_ports(upstream.addr, floor_wasm_path(), r#"{"probe":"trap","n":1}"#).unwrap();
    params.failure_policy = policy.to_owned();
    // One worker: every call meets the VM that trapped.
    Envoy::start(&envoy_binary(), params, 1, &scratch_dir(&format!("trap-{policy}"))).unwrap()
}

async fn echo(envoy: &Envoy, trap: bool) -> Code {
    let mut client = grpc_guard_demo::client(grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap());
    let mut request = tonic::Request::new(EchoRequest { message: "x".into(), ..Default::default() });
    if trap {
        request.metadata_mut().insert("x-trap", "1".parse().unwrap());
    }
    client.echo(request).await.map_or_else(|s| s.code(), |_| Code::Ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_trap_calls_fail_closed_until_a_new_vm_serves_them_guarded() {
    assert_eq!(FAILURE_POLICY, "FAIL_RELOAD", "what envoy/envoy.yaml ships");
    let upstream = Upstream::start().await;
    let envoy = start(&upstream, FAILURE_POLICY);
    assert_eq!(echo(&envoy, false).await, Code::Ok);
    assert_eq!(echo(&envoy, true).await, Code::Unavailable, "the call whose callback trapped");
    assert!(envoy.log_lines().any(|l| l.contains("Function: proxy_on_request_headers failed")), "Envoy logs the trap");
    // Until the new VM is up (Envoy's reload backoff, 1 s by default),
    // calls fail rather than pass unguarded...
    let trapped_at = Instant::now();
    assert_eq!(echo(&envoy, false).await, Code::Unavailable, "no call passes unguarded");
    // ...then they are served again, through a plugin that runs.
    let mut served = false;
    while trapped_at.elapsed() < Duration::from_secs(10) {
        if echo(&envoy, false).await == Code::Ok {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(served, "a new VM serves calls again");
    assert_eq!(echo(&envoy, true).await, Code::Unavailable, "and traps again on the same input");
    assert_eq!(upstream.observed.executions("Echo"), 2, "only the calls a running VM let through ran");
}

/// `FAIL_CLOSED` (what `fail_open: false` means): one trap fails every later
/// call on that worker until Envoy restarts. Why it is not the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_would_leave_the_worker_failing_every_call() {
    let upstream = Upstream::start().await;
    let envoy = start(&upstream, "FAIL_CLOSED");
    assert_eq!(echo(&envoy, true).await, Code::Unavailable);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(echo(&envoy, false).await, Code::Unavailable, "still failing 3 s later");
    assert_eq!(upstream.observed.executions("Echo"), 0);
}
