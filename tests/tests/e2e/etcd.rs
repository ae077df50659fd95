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
    config_timeout("500ms", extra)
}

/// [`config`] with `timeout` as `dedup.etcd.timeout`.
fn config_timeout(timeout: &str, extra: &str) -> String {
    format!(
        r#"{{"dedup":{{"methods":["grpcguard.demo.v1.Demo/Echo"],"store":"etcd",
            "etcd":{{"prefix":"{PREFIX}","timeout":"{timeout}"{extra}}}}},"log":{{"ok_sample":1}}}}"#
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

/// A keyed Echo as a client with a retry policy sends it: again after
/// ABORTED ("in progress") and UNAVAILABLE (the store, or Envoy, could not
/// take it; nothing ran), backing off from 50 ms to 1 s, for up to 15 s:
/// long enough to ride out an etcd leader election (about 1–3 s with etcd's
/// defaults).
async fn echo_retrying(envoy: &Envoy, key: &str, request: EchoRequest) -> (bool, Result<EchoReply, tonic::Status>) {
    let start = std::time::Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        let got = echo(envoy, key, request.clone()).await;
        match &got.1 {
            Err(s) if matches!(s.code(), Code::Aborted | Code::Unavailable) => {
                assert!(start.elapsed() < Duration::from_secs(15), "never answered: {got:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            _ => return got,
        }
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_its_envoy_restarted_is_replayed_and_an_error_answer_too() {
    let etcd = EtcdCluster::start(3, scratch_dir("etcd-restart-data"));
    let upstream = Upstream::start().await;
    let plugin = config("");
    let first_envoy = envoy("etcd-restart-a", upstream.addr, &etcd.clients(), &plugin);
    let (replayed, first) = echo_retrying(&first_envoy, "order-r", order(7)).await;
    assert!(!replayed);
    let first = first.unwrap();
    let failing = EchoRequest { message: "x".into(), fail_code: Code::NotFound as i32, ..Default::default() };
    let (_, not_found) = echo_retrying(&first_envoy, "order-nf", failing.clone()).await;
    assert_eq!(not_found.unwrap_err().code(), Code::NotFound);
    assert_eq!(upstream.observed.executions("Echo"), 2);
    // The Envoy goes away (a pod restart, a rollout); its retry arrives at
    // a new one with nothing in its memory.
    drop(first_envoy);
    let second_envoy = envoy("etcd-restart-b", upstream.addr, &etcd.clients(), &plugin);
    let (replayed, again) = echo(&second_envoy, "order-r", order(7)).await;
    assert!(replayed, "replayed from etcd");
    assert_eq!(again.unwrap(), first);
    let (replayed, again) = echo(&second_envoy, "order-nf", failing).await;
    assert!(replayed);
    let status = again.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "a kept error is replayed as it was: {status:?}");
    // The same key with another request is refused, as with the local table.
    let (_, reused) = echo(&second_envoy, "order-r", order(8)).await;
    assert_eq!(reused.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(upstream.observed.executions("Echo"), 2, "nothing ran twice across the restart");
    assert_no_vm_trap(&second_envoy);
}

/// Keyed calls, each key sent twice, while the leader of 3 members is
/// killed midway (the worst member to lose: writes wait for an election):
/// every key runs at most once, and every call is answered (after the
/// client policy's retries of UNAVAILABLE and ABORTED).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_etcd_member_killed_mid_run_keeps_at_most_once_and_calls_keep_being_served() {
    let mut etcd = EtcdCluster::start(3, scratch_dir("etcd-kill-one-data"));
    let upstream = Upstream::start().await;
    let plugin = config("");
    let envoys = std::sync::Arc::new(
        (0..2)
            .map(|i| envoy(&format!("etcd-kill-one-{i}"), upstream.addr, &etcd.clients(), &plugin))
            .collect::<Vec<_>>(),
    );
    let run = |from: u32, to: u32| {
        let envoys = envoys.clone();
        tokio::spawn(async move {
            let (mut served, mut slowest) = (0, Duration::ZERO);
            for n in from..to {
                let key = format!("kill-{n}");
                // The call and its retry, through different Envoys.
                for envoy in envoys.iter() {
                    let start = std::time::Instant::now();
                    let (_, got) = echo_retrying(envoy, &key, order(n)).await;
                    assert_eq!(got.unwrap().message, format!("create order {n}"));
                    slowest = slowest.max(start.elapsed());
                    served += 1;
                }
            }
            (served, slowest)
        })
    };
    let before = run(0, 20);
    let during = run(100, 160);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let leader = etcd.leader().expect("the cluster has a leader");
    etcd.kill(leader);
    let after = run(200, 220);
    let results = [before.await.unwrap(), during.await.unwrap(), after.await.unwrap()];
    let served: usize = results.iter().map(|r| r.0).sum();
    let slowest = results.iter().map(|r| r.1).max().unwrap_or_default();
    eprintln!("the leader killed: every call answered, the slowest (with its retries) in {slowest:?}");
    assert_eq!(served, 200, "every call answered");
    let runs = upstream.observed.executions_by_key();
    assert!(runs.values().all(|&n| n == 1), "a key ran twice: {runs:?}");
    assert_eq!(runs.len(), 100, "every key ran once");
    for envoy in envoys.iter() {
        assert_no_vm_trap(envoy);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_etcd_member_down_a_keyed_call_is_refused_unavailable_and_never_runs_unless_fail_open() {
    let mut etcd = EtcdCluster::start(3, scratch_dir("etcd-all-down-data"));
    let upstream = Upstream::start().await;
    let closed = envoy("etcd-all-down", upstream.addr, &etcd.clients(), &config(""));
    let open = envoy("etcd-all-down-open", upstream.addr, &etcd.clients(), &config(r#","fail_open":true"#));
    // A first call while etcd is up: kept.
    let (_, kept) = echo_retrying(&closed, "down-1", order(1)).await;
    kept.unwrap();
    etcd.kill_all();
    for key in ["down-1", "down-2"] {
        let (_, got) = echo(&closed, key, order(1)).await;
        let status = got.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("idempotency store did not answer"), "{status:?}");
        assert!(status.message().contains("not run"), "{status:?}");
    }
    assert_eq!(upstream.observed.executions("Echo"), 1, "nothing ran without its guarantee");
    // Unkeyed calls are not the store's business.
    let mut client = grpc_guard_demo::client(grpc_guard_demo::lazy_channel(&closed.grpc_uri()).unwrap());
    client.echo(order(9)).await.unwrap();
    // fail_open: the call runs, counted and logged.
    let (_, got) = echo(&open, "down-3", order(3)).await;
    got.unwrap();
    assert_eq!(upstream.observed.executions("Echo"), 3);
    let samples = scrape_until(&open, |s| value(s, "grpc_guard_dedup_failed_open_total", &[]).is_some()).await;
    assert_eq!(value(&samples, "grpc_guard_dedup_failed_open_total", &[]), Some(1.0));
    let logs = call_logs(&open, 1).await;
    assert!(logs.iter().any(|l| l["dedup"] == "store_failed_open" && l["grpc_code"] == "OK"), "{logs:?}");
    let logs = call_logs(&closed, 4).await;
    assert_eq!(logs.iter().filter(|l| l["dedup"] == "store_unavailable").count(), 2, "{logs:?}");
    // Back up: the kept answer is still there.
    for i in 0..3 {
        etcd.start_member(i);
    }
    etcd.wait_ready(Duration::from_secs(20));
    let (replayed, got) = echo_retrying(&closed, "down-1", order(1)).await;
    assert!(replayed);
    got.unwrap();
    assert_eq!(upstream.observed.executions("Echo"), 3);
    assert_no_vm_trap(&closed);
    assert_no_vm_trap(&open);
}

/// Endings without an answer, on etcd as in the local table: a call cut at
/// its deadline after it ran, and a client that cancelled after its message
/// went on, leave "may have run"; neither runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_cut_and_a_cancel_after_the_message_went_on_leave_may_have_run_and_never_run_twice() {
    let etcd = EtcdCluster::start(3, scratch_dir("etcd-endings-data"));
    let upstream = Upstream::start().await;
    let plugin = config("");
    let a = envoy("etcd-endings-a", upstream.addr, &etcd.clients(), &plugin);
    let b = envoy("etcd-endings-b", upstream.addr, &etcd.clients(), &plugin);
    let slow = |n: u32| EchoRequest { message: format!("slow {n}"), delay_ms: 600, ..Default::default() };
    // Cut by its deadline while the service works.
    let mut client = grpc_guard_demo::client(grpc_guard_demo::lazy_channel(&a.grpc_uri()).unwrap());
    let mut request = keyed(slow(1), "cut-1", CALLER);
    request.set_timeout(Duration::from_millis(200));
    let status = client.echo(request).await.unwrap_err();
    // tonic's own timer may end it first, as a cancel.
    assert!(matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled), "{status:?}");
    // Cancelled by its client while the service works.
    let mut client = grpc_guard_demo::client(grpc_guard_demo::lazy_channel(&a.grpc_uri()).unwrap());
    let call = tokio::spawn(async move { client.echo(keyed(slow(2), "cancel-2", CALLER)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    call.abort();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(upstream.observed.executions("Echo"), 2);
    // Their retries, through the other Envoy: told they may have run.
    for (key, n) in [("cut-1", 1), ("cancel-2", 2)] {
        let (_, got) = echo_retrying(&b, key, slow(n)).await;
        let status = got.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{key}: {status:?}");
        assert!(status.message().contains("may have run"), "{status:?}");
    }
    assert_eq!(upstream.observed.executions("Echo"), 2, "neither ran again");
    assert_no_vm_trap(&a);
    assert_no_vm_trap(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_cluster_envoy_does_not_have_refuses_keyed_calls_unavailable_naming_it() {
    let upstream = Upstream::start().await;
    // No etcd members given: the template has no such cluster.
    let plugin = config(r#","cluster":"no_such_cluster""#);
    let envoy = start_envoy_changed("etcd-no-cluster", upstream.addr, &plugin, |_| {}).unwrap();
    let (_, got) = echo(&envoy, "k-1", order(1)).await;
    let status = got.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("idempotency store"), "{status:?}");
    assert_eq!(upstream.observed.executions("Echo"), 0);
    let mut client = grpc_guard_demo::client(grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap());
    client.echo(order(2)).await.expect("calls without a key are not the store's");
    assert_no_vm_trap(&envoy);
}

/// A TCP proxy in front of `target` that holds every byte going to it for
/// `delay`: an etcd member that answers slowly.
async fn slow_proxy(target: SocketAddr, delay: Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(target).await else { continue };
            let (mut from_client, mut to_client) = inbound.into_split();
            let (mut from_target, mut to_target) = outbound.into_split();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 65536];
                while let Ok(n @ 1..) = from_client.read(&mut buf).await {
                    tokio::time::sleep(delay).await;
                    if to_target.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from_target, &mut to_client).await;
            });
        }
    });
    addr
}

/// The time a slow claim takes counts once against the call's deadline:
/// a call with 3 s that waits 0.8 s for its claim, runs 1 s upstream and
/// 0.8 s for its outcome write still ends OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_claim_counts_once_against_the_calls_deadline() {
    let etcd = EtcdCluster::start(3, scratch_dir("etcd-slow-data"));
    let upstream = Upstream::start().await;
    let mut slow = Vec::new();
    for member in etcd.clients() {
        slow.push(slow_proxy(member, Duration::from_millis(800)).await);
    }
    let envoy = envoy("etcd-slow", upstream.addr, &slow, &config_timeout("2s", ""));
    // The worker's lease, granted at its first tick, through the slow path.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let mut client = grpc_guard_demo::client(grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap());
    let started = std::time::Instant::now();
    let mut request =
        keyed(EchoRequest { message: "slow".into(), delay_ms: 1000, ..Default::default() }, "slow-1", CALLER);
    request.set_timeout(Duration::from_secs(3));
    let got = client.echo(request).await;
    let took = started.elapsed();
    assert!(got.is_ok(), "{got:?} after {took:?}");
    assert_eq!(upstream.observed.executions("Echo"), 1);
}

/// AIP-155 on etcd: Echo takes its key from `request_id` (field 5); calls
/// with no header, through two Envoys, run once; the same id with another
/// request is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_the_request_message_is_deduplicated_across_envoys_on_etcd() {
    let etcd = EtcdCluster::start(3, scratch_dir("etcd-key-field-data"));
    let upstream = Upstream::start().await;
    let plugin = format!(
        r#"{{"dedup":{{"methods":["grpcguard.demo.v1.Demo/Echo"],"key_fields":{{"grpcguard.demo.v1.Demo/Echo":5}},
            "store":"etcd","etcd":{{"prefix":"{PREFIX}"}}}},"log":{{"ok_sample":1}}}}"#
    );
    let a = envoy("etcd-key-field-a", upstream.addr, &etcd.clients(), &plugin);
    let b = envoy("etcd-key-field-b", upstream.addr, &etcd.clients(), &plugin);
    let call = |envoy: &Envoy, message: &str| {
        let mut client = grpc_guard_demo::client(grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap());
        let mut request = tonic::Request::new(EchoRequest {
            message: message.into(),
            request_id: "r-1".into(),
            ..Default::default()
        });
        request.metadata_mut().insert("authorization", CALLER.parse().unwrap());
        async move {
            match client.echo(request).await {
                Ok(r) => (r.metadata().get("grpc-guard-replayed").is_some(), Ok(r.into_inner())),
                Err(s) => (false, Err(s)),
            }
        }
    };
    let (replayed, first) = call(&a, "pay 10").await;
    assert!(!replayed);
    let first = first.unwrap();
    let (replayed, again) = call(&b, "pay 10").await;
    assert!(replayed, "{again:?}");
    assert_eq!(again.unwrap(), first);
    let (_, reuse) = call(&b, "pay 99").await;
    assert_eq!(reuse.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(upstream.observed.executions("Echo"), 1);
    assert_no_vm_trap(&a);
    assert_no_vm_trap(&b);
}
