//! The Grafana dashboard (grafana/grpc-guard.json): there is no Grafana here,
//! so its queries are what is tested. A real Prometheus, with
//! istio/seconds.rules.yml loaded, scrapes a real Envoy running the filter
//! while known traffic passes: OK and failing calls, a late response,
//! deadlines injected, clamped and refused, and keyed calls first, replayed,
//! in flight and reused with another request. Every panel's queries, with the
//! dashboard's variables set to "All", must evaluate, and every panel must
//! show data.

use std::time::{Duration, Instant};

use grpc_guard_demo::pb::EchoRequest;
use grpc_guard_tests::e2e::{keyed, CALLER};

use crate::prometheus::{query, start_prometheus};
use crate::support::*;

/// Deadlines (a default, a maximum), a size limit and dedup on Echo: every
/// guard has something to count.
const CONFIG: &str = r#"{"deadline":{"default":"10s","max":"30s"},"limits":{"max_request_message_bytes":4096},"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"]}}"#;

fn panels_json(dashboard: &serde_json::Value) -> impl Iterator<Item = &serde_json::Value> {
    dashboard["panels"].as_array().expect("panels").iter()
}

/// A panel's title and its queries as Prometheus gets them: Grafana's
/// variables replaced as "All" and a one-minute rate window.
fn panels() -> Vec<(String, Vec<String>)> {
    let text = read("grafana/grpc-guard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("grafana/grpc-guard.json is JSON");
    panels_json(&dashboard)
        .map(|p| {
            let queries = p["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .map(|t| {
                    t["expr"]
                        .as_str()
                        .unwrap()
                        .replace("$__rate_interval", "1m")
                        .replace("$service", ".*")
                        .replace("$method", ".*")
                })
                .collect();
            (p["title"].as_str().unwrap().to_owned(), queries)
        })
        .collect()
}

#[test]
fn the_dashboard_is_grafana_json_with_a_prometheus_query_in_every_panel() {
    let panels = panels();
    assert!(panels.len() >= 9, "{panels:?}");
    for (title, queries) in &panels {
        assert!(!queries.is_empty(), "{title} has no query");
        for q in queries {
            assert!(!q.contains('$'), "{title}: a variable the test does not set is left in {q}");
        }
    }
}

/// A panel that summed an application's own go-grpc-prometheus series in
/// would count every call twice, and mix its seconds buckets with grpc-guard's.
#[test]
fn every_query_and_variable_reads_grpc_guard_s_own_series() {
    let dashboard: serde_json::Value = serde_json::from_str(&read("grafana/grpc-guard.json")).unwrap();
    let mut exprs: Vec<&str> =
        dashboard["templating"]["list"].as_array().unwrap().iter().filter_map(|v| v["definition"].as_str()).collect();
    assert!(exprs.len() >= 2, "the service and method variables");
    exprs.extend(
        panels_json(&dashboard).flat_map(|p| p["targets"].as_array().unwrap()).map(|t| t["expr"].as_str().unwrap()),
    );
    for expr in exprs {
        assert_eq!(selectors_without_exporter(expr), Vec::<String>::new(), "in {expr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_shows_data_on_a_real_prometheus_after_known_traffic() {
    let dir = scratch_dir("dashboard");
    let upstream = grpc_guard_tests::e2e::Upstream::start().await;
    let envoy = grpc_guard_tests::e2e::start_envoy("deploy-dashboard", upstream.addr, CONFIG).unwrap();
    let (prometheus, base) =
        start_prometheus(&dir, &[repo_file("istio/seconds.rules.yml")], &envoy.params().admin_addr().to_string());

    let client = grpc_guard_demo::client(grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap());
    let echo = |message: &str| EchoRequest { message: message.to_owned(), ..EchoRequest::default() };
    let panels = panels();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut round = 0;
    let empty = loop {
        round += 1;
        let mut calls = Vec::new();
        for i in 0..8u32 {
            let mut client = client.clone();
            let mut request = tonic::Request::new(EchoRequest {
                fail_code: if i == 0 { tonic::Code::Unavailable as i32 } else { 0 },
                // A late response: Envoy ends the call at 200 ms, the server
                // answers at 600.
                delay_ms: if i == 1 { 600 } else { 0 },
                ..echo(&format!("dashboard {i}"))
            });
            match i {
                1 => request.metadata_mut().insert("grpc-timeout", "200m".parse().unwrap()),
                // Over the 30 s maximum: clamped.
                2 => request.metadata_mut().insert("grpc-timeout", "90S".parse().unwrap()),
                // Malformed: refused InvalidArgument.
                3 => request.metadata_mut().insert("grpc-timeout", "soon".parse().unwrap()),
                _ => None,
            };
            calls.push(tokio::spawn(async move { client.echo(request).await.map_err(|s| s.code()) }));
        }
        for call in calls {
            let _ = call.await.unwrap();
        }
        // Keyed: a first call and its replay, a retry while a slow first call
        // runs, the key reused with another request.
        let key = |k: &str| format!("dashboard-{round}-{k}");
        let mut c = client.clone();
        c.echo(keyed(echo("kept"), &key("a"), CALLER)).await.unwrap();
        c.echo(keyed(echo("kept"), &key("a"), CALLER)).await.unwrap();
        let _ = c.echo(keyed(echo("another"), &key("a"), CALLER)).await;
        let slow = EchoRequest { delay_ms: 300, ..echo("slow") };
        let mut first = client.clone();
        let slow_key = key("slow");
        let running = tokio::spawn(async move { first.echo(keyed(slow, &slow_key, CALLER)).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = c.echo(keyed(EchoRequest { delay_ms: 300, ..echo("slow") }, &key("slow"), CALLER)).await;
        let _ = running.await.unwrap();

        let empty: Vec<String> = panels
            .iter()
            .filter(|(_, queries)| queries.iter().all(|q| query(&base, q).is_empty()))
            .map(|(title, _)| title.clone())
            .collect();
        if empty.is_empty() || Instant::now() > deadline {
            break empty;
        }
    };
    let mut shown = String::new();
    for (title, queries) in &panels {
        for q in queries {
            shown.push_str(&format!("{title}: {} series\n  {q}\n", query(&base, q).len()));
        }
    }
    println!("after {round} rounds:\n{shown}");
    assert!(empty.is_empty(), "panels without data: {empty:?}\n{shown}\nprometheus log:\n{}", prometheus.log_text());
    drop(prometheus);
    drop(envoy);
    drop(upstream);
}
