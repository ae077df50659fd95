//! Why the host could not load a filter or start a VM.

use std::path::PathBuf;

use super::LogLine;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot read the filter module {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot compile {} as a wasm module: {message}", path.display())]
    Compile { path: PathBuf, message: String },
    #[error(
        "{} does not export `proxy_abi_version_0_2_1`: build it against the proxy-wasm ABI 0.2.1",
        path.display()
    )]
    AbiVersion { path: PathBuf },
    #[error("cannot instantiate the filter (an import with an unexpected signature?): {message}")]
    Instantiate { message: String },
    #[error("the filter trapped in {during}: {message}{}", show(logs))]
    Trapped { during: &'static str, message: String, logs: Vec<LogLine> },
    #[error("proxy_on_vm_start returned false{}", show(logs))]
    VmStartRejected { logs: Vec<LogLine> },
    #[error("proxy_on_configure returned false: the filter refused its configuration{}", show(logs))]
    ConfigureRejected { logs: Vec<LogLine> },
}

fn show(logs: &[LogLine]) -> String {
    if logs.is_empty() {
        return String::from(" (the filter logged nothing)");
    }
    let lines: Vec<String> = logs.iter().map(|line| format!("  [{:?}] {}", line.level, line.message)).collect();
    format!("; the filter logged:\n{}", lines.join("\n"))
}
