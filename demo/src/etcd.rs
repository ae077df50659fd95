//! A real etcd cluster on loopback (Debian's `etcd-server`, which `make
//! setup` installs), for the dedup store on etcd (`dedup.store: etcd`): the
//! tests and `make bench BENCH_ARGS=--stores` start one; members are
//! started, killed and started again as a test needs, and all stopped on
//! drop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::envoy::free_port;

/// One member: its name, ports and process.
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    child: Option<Child>,
}

pub struct EtcdCluster {
    members: Vec<Member>,
    dir: PathBuf,
    initial_cluster: String,
}

/// The etcd binary: `GRPC_GUARD_ETCD`, else Debian's.
fn etcd_binary() -> PathBuf {
    let path = std::env::var_os("GRPC_GUARD_ETCD").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"));
    assert!(path.exists(), "{} is missing: run `make setup` (or `make test`) first", path.display());
    path
}

impl EtcdCluster {
    /// A cluster of `size` members on free loopback ports, data under `dir`,
    /// ready when it returns (a write went through).
    pub fn start(size: usize, dir: PathBuf) -> EtcdCluster {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let members: Vec<Member> = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client: SocketAddr::from(([127, 0, 0, 1], free_port().unwrap())),
                peer: SocketAddr::from(([127, 0, 0, 1], free_port().unwrap())),
                child: None,
            })
            .collect();
        let initial_cluster =
            members.iter().map(|m| format!("{}=http://{}", m.name, m.peer)).collect::<Vec<_>>().join(",");
        let mut cluster = EtcdCluster { members, dir, initial_cluster };
        for i in 0..size {
            cluster.start_member(i);
        }
        cluster.wait_ready(Duration::from_secs(20));
        cluster
    }

    /// The members' client addresses (Envoy's cluster endpoints).
    pub fn clients(&self) -> Vec<SocketAddr> {
        self.members.iter().map(|m| m.client).collect()
    }

    /// Starts member `i` (again), with the data it had.
    pub fn start_member(&mut self, i: usize) {
        let m = &mut self.members[i];
        let log = std::fs::File::create(self.dir.join(format!("{}.log", m.name))).unwrap();
        let child = Command::new(etcd_binary())
            .args(["--name", &m.name])
            .args(["--data-dir", &self.dir.join(&m.name).display().to_string()])
            .args(["--listen-peer-urls", &format!("http://{}", m.peer)])
            .args(["--initial-advertise-peer-urls", &format!("http://{}", m.peer)])
            .args(["--listen-client-urls", &format!("http://{}", m.client)])
            .args(["--advertise-client-urls", &format!("http://{}", m.client)])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new", "--initial-cluster-token", "grpc-guard-tests"])
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts");
        m.child = Some(child);
    }

    /// Kills member `i` at once (SIGKILL: no goodbye to its peers).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills every member.
    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Waits until the cluster takes a write (`etcdctl put`).
    pub fn wait_ready(&self, within: Duration) {
        let endpoints = self.clients().iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        let start = Instant::now();
        loop {
            let ok = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &endpoints, "--command-timeout=2s", "put", "grpc-guard-tests/ready", "1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(start.elapsed() < within, "etcd did not become ready in {within:?}: see {}", self.dir.display());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The member that leads the cluster now (`etcdctl endpoint status`).
    pub fn leader(&self) -> Option<usize> {
        let endpoints = self.clients().iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &endpoints, "endpoint", "status", "-w", "simple"])
            .output()
            .ok()?;
        // "ADDRESS, ID, VERSION, DB SIZE, IS LEADER, IS LEARNER, ..."
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| l.split(", ").nth(4) == Some("true"))?;
        let address = line.split(", ").next()?;
        self.members.iter().position(|m| m.client.to_string() == address)
    }

    /// Keys under `prefix` (`etcdctl get --prefix --keys-only`).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let endpoints = self.clients().iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &endpoints, "get", "--prefix", "--keys-only", prefix])
            .output()
            .expect("etcdctl runs");
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
    }
}

impl Drop for EtcdCluster {
    /// Stops every member and removes their data (each member's WAL takes
    /// 64 MB at once); their logs stay for a look after a failure.
    fn drop(&mut self) {
        self.kill_all();
        for m in &self.members {
            let _ = std::fs::remove_dir_all(self.dir.join(&m.name));
        }
    }
}
