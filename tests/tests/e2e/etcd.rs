//! The dedup table on etcd (`dedup.store: "etcd"`) through real Envoys and a
//! real 3-member etcd cluster on loopback: at most once across every
//! replica and restart, and the documented answer when etcd fails.

use std::net::SocketAddr;
use std::time::Duration;

use grpc_guard_demo::envoy::Envoy;
use grpc_guard_demo::pb::{EchoReply, EchoRequest};
use grpc_guard_tests::e2e::{keyed, scratch_dir, start_envoy_changed, CALLER};
use grpc_guard_tests::etcd::EtcdCluster;
use tonic::Code;

use crate::support::*;

const PREFIX: &str = "e2e/dedup/";

/// Every call logged; keys on etcd under [`PREFIX`]; `extra` added to
/// `dedup.etcd`.
fn config(extra: &str) -> String {
    format!(
        r#"{{"dedup":{{"methods":["grpcguard.demo.v1.Demo/Echo"],"store":"etcd",
            "etcd":{{"prefix":"{PREFIX}","timeout":"500ms"{extra}}}}},"log":{{"ok_sample":1}}}}"#
    )
}

fn envoy(name: &str, upstream: SocketAddr, etcd: &[SocketAddr], plugin_config: &str) -> Envoy {
    start_envoy_changed(name, upstream, plugin_config, |p| p.etcd = etcd.to_vec()).unwrap()
}

fn order(n: u32) -> EchoRequest {
    EchoRequest { message: format!("create order {n}"), ..Default::default() }
}

/// What a keyed Echo got, and whether it was a replay.
async fn echo(envoy: &Envoy, key: &str, request: EchoRequest) -> (bool, Result<EchoReply, tonic::Status>) {
    let mut client = grpc_guard_demo::client(grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap());
    let replayed = |m: &tonic::metadata::MetadataMap| m.get("grpc-guard-replayed").is_some_and(|v| v == "true");
    match client.echo(keyed(request, key, CALLER)).await {
        Ok(r) => (replayed(r.metadata()), Ok(r.into_inner())),
        Err(s) => (replayed(s.metadata()), Err(s)),
    }
}

/// A keyed Echo as the README's client policy sends it: again after
/// ABORTED ("in progress") and UNAVAILABLE (the store, or Envoy, could not
/// take it; nothing ran), a few times.
async fn echo_retrying(envoy: &Envoy, key: &str, request: EchoRequest) -> (bool, Result<EchoReply, tonic::Status>) {
    let mut last = None;
    for _ in 0..60 {
        let got = echo(envoy, key, request.clone()).await;
        match &got.1 {
            Err(s) if matches!(s.code(), Code::Aborted | Code::Unavailable) => {
                last = Some(got);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => return got,
        }
    }
    panic!("never answered: {last:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_envoys_round_robin_32_concurrent_duplicates_run_once_and_every_retry_gets_the_kept_answer() {
    let etcd = EtcdCluster::start(3, scratch_dir("etcd-three-envoys-data"));
    let upstream = Upstream::start().await;
    let plugin = config("");
    let envoys: Vec<Envoy> =
        (0..3).map(|i| envoy(&format!("etcd-three-{i}"), upstream.addr, &etcd.clients(), &plugin)).collect();
    let envoys = std::sync::Arc::new(envoys);
    // 32 concurrent duplicates, spread over the three like a round-robin
    // balancer without ring hash.
    let calls: Vec<_> = (0..32)
        .map(|i| {
            let envoys = envoys.clone();
            tokio::spawn(async move { echo_retrying(&envoys[i % 3], "order-32", order(32)).await })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    assert_eq!(upstream.observed.executions("Echo"), 1, "32 duplicates over 3 Envoys run once");
    let first = answers.iter().find(|(replayed, _)| !replayed).expect("one ran").1.clone().unwrap();
    for (_, result) in &answers {
        assert_eq!(result.as_ref().unwrap(), &first, "every duplicate gets the one answer");
    }
    assert_eq!(answers.iter().filter(|(replayed, _)| !replayed).count(), 1, "all but the first are replays");
    // A retry later, through each of the three: the kept answer, replayed.
    for envoy in envoys.iter() {
        let (replayed, result) = echo(envoy, "order-32", order(32)).await;
        assert_eq!(result.unwrap(), first);
        assert!(replayed);
    }
    assert_eq!(upstream.observed.executions("Echo"), 1);
    // One key on etcd for it.
    assert_eq!(etcd.keys(PREFIX).len(), 1, "{:?}", etcd.keys(PREFIX));
    for envoy in envoys.iter() {
        assert_no_vm_trap(envoy);
    }
}
