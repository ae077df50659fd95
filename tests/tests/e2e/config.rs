//! A configuration mistake stops the plugin, loudly, naming the field.

use grpc_guard_demo::envoy::EnvoyError;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_config_field_makes_the_plugin_refuse_to_start_naming_the_field() {
    let upstream = Upstream::start().await;
    let result = start_envoy("badconfig", upstream.addr, r#"{"metrics":{"max_methodz":3}}"#);
    match result {
        Err(EnvoyError::Exited { log_tail, .. }) => {
            assert!(
                log_tail.contains("invalid grpc-guard configuration: metrics.max_methodz: unknown field"),
                "{log_tail}"
            );
        }
        Err(other) => panic!("expected Envoy to exit, got {other}"),
        Ok(_) => panic!("Envoy started with an unknown config field"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_value_is_refused_naming_the_field() {
    let upstream = Upstream::start().await;
    let result = start_envoy("badvalue", upstream.addr, r#"{"log":{"ok_sample":2}}"#);
    let Err(EnvoyError::Exited { log_tail, .. }) = result else { panic!("Envoy must refuse ok_sample 2") };
    assert!(log_tail.contains("log.ok_sample: must be between 0.0 and 1.0"), "{log_tail}");
}

#[test]
fn rendered_config_for_docker_run_passes_envoy_validate() {
    let params = grpc_guard_demo::envoy::EnvoyParams {
        listen_port: 10000,
        admin_port: 9901,
        upstream: "127.0.0.1:50051".parse().unwrap(),
        down_port: 50099,
        wasm: wasm_path(),
        plugin_config: r#"{"log":{"ok_sample":0.5}}"#.into(),
        http_filter: grpc_guard_demo::envoy::HttpFilter::GrpcGuard,
        filters_before: String::new(),
        set_request_headers: Vec::new(),
        access_log: true,
        hold_headers: true,
        failure_policy: grpc_guard_demo::envoy::FAILURE_POLICY.to_owned(),
        etcd: Vec::new(),
    };
    let dir = scratch_dir("validate");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("envoy.rendered.yaml");
    std::fs::write(&file, params.render(grpc_guard_demo::envoy::TEMPLATE).unwrap()).unwrap();
    let out =
        std::process::Command::new(envoy_binary()).arg("--mode").arg("validate").arg("-c").arg(&file).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "envoy --mode validate failed:\n{log}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK") || log.contains("OK"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streaming_method_in_dedup_methods_is_refused_at_start() {
    let upstream = Upstream::start().await;
    let config = r#"{"metrics":{"method_types":{"grpcguard.demo.v1.Demo/Count":"server_stream"}},
                    "dedup":{"methods":["grpcguard.demo.v1.Demo/*"]}}"#;
    let Err(EnvoyError::Exited { log_tail, .. }) = start_envoy("dedup-stream", upstream.addr, config) else {
        panic!("Envoy must refuse to deduplicate a streaming method")
    };
    assert!(log_tail.contains("dedup.methods[0]") && log_tail.contains("only unary calls"), "{log_tail}");
}
