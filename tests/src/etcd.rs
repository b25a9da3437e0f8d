//! A real etcd cluster for the controllers-on-etcd tests: Debian's `etcd` binary, one
//! member per namespace, started and removed by the test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agents::spawn_logged;
use crate::netns::{ChildGuard, Netns, wait_for};

/// One member: its namespace's index in the caller's list, address and files.
#[derive(Debug)]
pub struct EtcdMember {
    process: Option<ChildGuard>,
    pub name: String,
    pub address: String,
    data: PathBuf,
    log: PathBuf,
}

/// A cluster of members started together.
#[derive(Debug)]
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    initial: String,
    token: String,
}

fn etcd_binary() -> &'static str {
    "etcd"
}

impl EtcdCluster {
    /// Starts one member in each of `hosts` (namespace and its address), with files under
    /// `dir`, and waits until the cluster answers.
    pub fn start(hosts: &[(&Netns, &str)], dir: &Path) -> EtcdCluster {
        let initial: Vec<String> =
            hosts.iter().enumerate().map(|(i, (_, ip))| format!("e{i}=http://{ip}:2380")).collect();
        let mut cluster = EtcdCluster {
            members: hosts
                .iter()
                .enumerate()
                .map(|(i, (_, ip))| EtcdMember {
                    process: None,
                    name: format!("e{i}"),
                    address: ip.to_string(),
                    data: dir.join(format!("etcd-e{i}")),
                    log: dir.join(format!("etcd-e{i}.log")),
                })
                .collect(),
            initial: initial.join(","),
            token: crate::netns::unique_name("etcd"),
        };
        for (i, (ns, _)) in hosts.iter().enumerate() {
            cluster.start_member(i, ns);
        }
        cluster.wait_healthy(hosts[0].0, Duration::from_secs(30));
        cluster
    }

    /// (Re)starts member `i` in `ns` on its data directory.
    pub fn start_member(&mut self, i: usize, ns: &Netns) {
        let initial = self.initial.clone();
        let token = self.token.clone();
        let m = &mut self.members[i];
        if let Some(mut p) = m.process.take() {
            p.kill();
        }
        let (client, peer) = (format!("http://{}:2379", m.address), format!("http://{}:2380", m.address));
        let data = m.data.display().to_string();
        let args = [
            etcd_binary(),
            "--name",
            &m.name,
            "--data-dir",
            &data,
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &initial,
            "--initial-cluster-token",
            &token,
            "--initial-cluster-state",
            "new",
            "--heartbeat-interval",
            "100",
            "--election-timeout",
            "1000",
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ];
        m.process = Some(spawn_logged(ns, &args, &m.log).unwrap_or_else(|e| panic!("starting etcd {}: {e}", m.name)));
    }

    /// `kill -9` of member `i`.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].process.take() {
            p.kill();
        }
    }

    /// The client URLs, comma-separated.
    pub fn endpoints(&self) -> String {
        self.members.iter().map(|m| format!("http://{}:2379", m.address)).collect::<Vec<_>>().join(",")
    }

    /// Waits until a majority of the members answers `etcdctl endpoint health` from `ns`.
    pub fn wait_healthy(&self, ns: &Netns, timeout: Duration) {
        let endpoints = self.endpoints();
        let healthy = wait_for(timeout, || {
            let out = ns
                .exec(&["etcdctl", "--endpoints", &endpoints, "--command-timeout", "2s", "endpoint", "health"])
                .ok()?;
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            (text.matches("is healthy").count() * 2 > self.members.len()).then_some(())
        });
        assert!(healthy.is_some(), "etcd did not become healthy:\n{}", self.log_tails(20));
    }

    /// `etcdctl get KEY --print-value-only` from `ns`.
    pub fn get(&self, ns: &Netns, key: &str) -> Option<String> {
        let out = ns
            .exec(&[
                "etcdctl",
                "--endpoints",
                &self.endpoints(),
                "--command-timeout",
                "2s",
                "get",
                key,
                "--print-value-only",
            ])
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|v| !v.is_empty())
    }

    pub fn log_tails(&self, lines: usize) -> String {
        self.members
            .iter()
            .map(|m| {
                let text = std::fs::read_to_string(&m.log).unwrap_or_default();
                let all: Vec<&str> = text.lines().collect();
                format!("---- {} ----\n{}", m.name, all[all.len().saturating_sub(lines)..].join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails(30));
        }
    }
}
