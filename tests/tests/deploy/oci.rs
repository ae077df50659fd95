//! `make oci`'s image (istio/oci-image.sh) through a real registry: pushed
//! with skopeo to Debian's docker-registry on loopback, then pulled back the
//! way Istio's agent does (pkg/wasm/imagefetcher.go): manifest, the last
//! layer of type `application/vnd.oci.image.layer.v1.tar+gzip`, gunzip, the
//! tar entry named `plugin.wasm`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::support::*;

const TAG: &str = "0.1.0-test";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Builds the image from a copy of the release .wasm (other builds may
/// replace the file meanwhile); returns the copy's bytes and the manifest digest.
fn build_image(dir: &Path) -> (Vec<u8>, String) {
    tool("umoci");
    tool("jq");
    let wasm = std::fs::read(grpc_guard_tests::e2e::wasm_path()).unwrap();
    let copy = dir.join("grpc_guard.wasm");
    std::fs::write(&copy, &wasm).unwrap();
    let out = run_ok(Command::new(repo_file("istio/oci-image.sh")).arg(&copy).arg(dir.join("layout")).arg(TAG));
    let digest = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "oci-image.sh printed {digest:?}");
    (wasm, digest)
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("registry answers JSON")
}

/// Istio's compat-variant extraction: the first tar entry whose base name is
/// `plugin.wasm`. The whole archive must read cleanly too (padding, end blocks).
fn plugin_wasm_from_layer(layer: &[u8]) -> Vec<u8> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(layer));
    let mut found = None;
    for entry in archive.entries().expect("layer is a tar.gz") {
        let mut entry = entry.expect("tar entry reads");
        let path: PathBuf = entry.path().unwrap().into_owned();
        if found.is_none() && path.file_name().is_some_and(|n| n == "plugin.wasm") {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            found = Some(bytes);
        }
    }
    found.expect("the layer has no plugin.wasm")
}

#[test]
fn the_same_wasm_gives_the_same_image_digest() {
    let dir = scratch_dir("oci-reproducible");
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::create_dir_all(dir.join("b")).unwrap();
    let (wasm_a, digest_a) = build_image(&dir.join("a"));
    let (wasm_b, digest_b) = build_image(&dir.join("b"));
    if wasm_a == wasm_b {
        assert_eq!(digest_a, digest_b, "istio/oci-image.sh must be reproducible");
    }
}

#[test]
fn image_pushed_to_a_registry_comes_back_as_the_same_wasm_in_istio_s_compat_layout() {
    let dir = scratch_dir("oci-registry");
    let (wasm, digest) = build_image(&dir);

    let port = free_port();
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("storage").display()
        ),
    )
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let registry = Server::start(
        "docker-registry",
        Command::new(tool("docker-registry")).arg("serve").arg(&config),
        &dir,
        &format!("{base}/v2/"),
    );

    // What `make oci-push` runs, with a throwaway trust policy and plain HTTP.
    let reference = format!("127.0.0.1:{port}/grpc-guard:{TAG}");
    run_ok(
        Command::new(tool("skopeo"))
            .args(["copy", "--insecure-policy", "--dest-tls-verify=false", "--preserve-digests"])
            .arg(format!("oci:{}:{TAG}", dir.join("layout").display()))
            .arg(format!("docker://{reference}")),
    );

    // Pulled back as Istio's image fetcher does.
    let accept = [("Accept", OCI_MANIFEST)];
    let (headers, manifest_bytes) = http_get(&format!("{base}/v2/grpc-guard/manifests/{TAG}"), &accept)
        .unwrap_or_else(|e| panic!("{e}\n{}", registry.log_text()));
    assert_eq!(
        headers.get("docker-content-digest").and_then(|v| v.to_str().ok()),
        Some(digest.as_str()),
        "the registry must serve the manifest `make oci` printed, so the WasmPlugin can pin it"
    );
    assert_eq!(sha256(&manifest_bytes), digest);
    let manifest = json(&manifest_bytes);
    assert_eq!(manifest["config"]["mediaType"], OCI_CONFIG, "{manifest}");
    let layers = manifest["layers"].as_array().expect("manifest lists layers");
    assert_eq!(layers.len(), 1, "a single-layer image: {manifest}");
    assert_eq!(layers[0]["mediaType"], OCI_LAYER_TAR_GZIP, "{manifest}");

    let layer_digest = layers[0]["digest"].as_str().unwrap();
    let (_, layer) = http_get(&format!("{base}/v2/grpc-guard/blobs/{layer_digest}"), &[]).unwrap();
    assert_eq!(sha256(&layer), layer_digest, "layer blob digest");
    assert!(plugin_wasm_from_layer(&layer) == wasm, "plugin.wasm in the pulled layer differs from grpc_guard.wasm");

    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let (_, config_bytes) = http_get(&format!("{base}/v2/grpc-guard/blobs/{config_digest}"), &[]).unwrap();
    let image_config = json(&config_bytes);
    assert_eq!(image_config["rootfs"]["diff_ids"].as_array().map(Vec::len), Some(1), "{image_config}");
    drop(registry);
}
