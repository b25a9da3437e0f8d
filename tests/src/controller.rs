//! A real `hapair-operator standalone` process in a test namespace (the controller and
//! the pair's witness), agents enrolled against it with `hapair-agent enroll`, and the
//! admin side: `GET /v1/groups` with the admin certificate and `kubectl-hapair` run on
//! the admin config the controller writes into its state directory.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use hapair_operator::controller::views::{AdminConfig, CLI_CONFIG_FILE, GroupsOverview};

use crate::agents::{ENDPOINTS, binary, spawn_logged};
use crate::netns::{ChildGuard, Netns, wait_for};

/// How long the controller may take to start and write its admin config.
const START: Duration = Duration::from_secs(30);
/// The controller's port on its address.
pub const PORT: u16 = 7443;

/// The standalone controller in a namespace, its manifest and state directories.
#[derive(Debug)]
pub struct Controller {
    process: Option<ChildGuard>,
    /// The address it listens on (and its TLS server name).
    pub address: String,
    pub manifests: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    pub admin: AdminConfig,
    ns_name: String,
    /// On etcd: the endpoints, and the flags after `--listen` that make it one of a set.
    etcd: Option<String>,
    extra_args: Vec<String>,
}

impl Controller {
    /// Starts the controller in `ns` listening on `address`, with `manifest` as the only
    /// file of its manifest directory `dir/manifests` (as `web.yaml`).
    pub fn start(ns: &Netns, address: &str, dir: &Path, manifest: &str) -> Controller {
        Controller::start_with(ns, address, dir, manifest, None, Vec::new())
    }

    /// Starts one controller of a set sharing the etcd cluster at `etcd` (client URLs,
    /// comma-separated), named `name`, knowing `controllers` (every base URL of the set),
    /// with its own directories under `dir/name`, a leader lease of 2 s.
    pub fn start_on_etcd(
        ns: &Netns,
        address: &str,
        dir: &Path,
        manifest: &str,
        etcd: &str,
        name: &str,
        controllers: &[String],
    ) -> Controller {
        let args = ["--etcd", etcd, "--name", name, "--leader-ttl", "2", "--controllers", &controllers.join(",")];
        let home = dir.join(name);
        Controller::start_with(ns, address, &home, manifest, Some(etcd.to_string()), args.map(String::from).to_vec())
    }

    fn start_with(
        ns: &Netns,
        address: &str,
        dir: &Path,
        manifest: &str,
        etcd: Option<String>,
        extra_args: Vec<String>,
    ) -> Controller {
        let manifests = dir.join("manifests");
        std::fs::create_dir_all(&manifests).unwrap_or_else(|e| panic!("creating {}: {e}", manifests.display()));
        std::fs::write(manifests.join("web.yaml"), manifest).unwrap_or_else(|e| panic!("writing the manifest: {e}"));
        let mut controller = Controller {
            process: None,
            address: address.to_string(),
            manifests,
            state: dir.join("controller-state"),
            log: dir.join("controller.log"),
            admin: AdminConfig {
                controller: String::new(),
                controllers: Vec::new(),
                ca_pem: String::new(),
                cert_pem: String::new(),
                key_pem: String::new(),
            },
            ns_name: ns.name().to_string(),
            etcd,
            extra_args,
        };
        controller.restart(ns);
        controller
    }

    /// (Re)starts the process on the same directories, and waits for its admin config.
    pub fn restart(&mut self, ns: &Netns) {
        self.kill();
        let _ = std::fs::remove_file(self.admin_config_path());
        let exe = binary("hapair-operator").display().to_string();
        let listen = format!("{}:{PORT}", self.address);
        let (manifests, state) = (self.manifests.display().to_string(), self.state.display().to_string());
        let mut args = vec![
            exe.as_str(),
            "standalone",
            "--manifests",
            &manifests,
            "--state",
            &state,
            "--listen",
            &listen,
            "--server-name",
            &self.address,
        ];
        args.extend(self.extra_args.iter().map(String::as_str));
        self.process =
            Some(spawn_logged(ns, &args, &self.log).unwrap_or_else(|e| panic!("starting the controller: {e}")));
        let admin = wait_for(START, || {
            let bytes = std::fs::read(self.admin_config_path()).ok()?;
            serde_json::from_slice::<AdminConfig>(&bytes).ok()
        });
        self.admin = admin.unwrap_or_else(|| panic!("the controller did not start:\n{}", self.log_tail(40)));
    }

    /// The admin client settings `kubectl-hapair` reads (`HAPAIR_CONFIG`).
    pub fn admin_config_path(&self) -> PathBuf {
        self.state.join(CLI_CONFIG_FILE)
    }

    /// `hapair-operator token create`: (token, CA fingerprint).
    pub fn token(&self, node: &str) -> (String, String) {
        let state = self.state.display().to_string();
        let exe = binary("hapair-operator");
        let out = match &self.etcd {
            // etcd is reachable only from inside the test network.
            Some(etcd) => std::process::Command::new("ip")
                .args(["netns", "exec", &self.ns_name])
                .arg(&exe)
                .args(["token", "create", "--etcd", etcd, "--node", node, "--ttl", "10m"])
                .output(),
            None => std::process::Command::new(&exe)
                .args(["token", "create", "--state", &state, "--node", node, "--ttl", "10m"])
                .output(),
        }
        .unwrap_or_else(|e| panic!("token create: {e}"));
        assert!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("no {name} in {text}"))
        };
        (field("token:"), field("ca fingerprint:"))
    }

    /// `GET /v1/groups` with the admin certificate, from inside `ns`.
    pub fn overview(&self, ns: &Netns) -> Option<GroupsOverview> {
        let admin = self.admin.clone();
        let url = format!("https://{}:{PORT}/v1/groups", self.address);
        ns.block_on(|| async move {
            let client = reqwest::Client::builder()
                .use_rustls_tls()
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(admin.ca_pem.as_bytes()).ok()?)
                .identity(
                    reqwest::Identity::from_pem(format!("{}\n{}", admin.cert_pem, admin.key_pem).as_bytes()).ok()?,
                )
                .timeout(Duration::from_secs(5))
                .build()
                .ok()?;
            let response = client.get(url).send().await.ok()?;
            // A controller that does not lead answers 503 with an error body, which would
            // otherwise decode as an empty overview.
            if !response.status().is_success() {
                return None;
            }
            response.json::<GroupsOverview>().await.ok()
        })
    }

    /// `kubectl-hapair ARGS` inside `ns` with `HAPAIR_CONFIG` set to the admin config.
    pub fn kubectl(&self, ns: &Netns, args: &[&str]) -> Output {
        ns.command(binary("kubectl-hapair"))
            .args(args)
            .env("HAPAIR_CONFIG", self.admin_config_path())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running kubectl-hapair {}: {e}", args.join(" ")))
    }

    /// The base URL agents and the CLI use.
    pub fn url(&self) -> String {
        format!("https://{}:{PORT}", self.address)
    }

    /// `SIGTERM`, and waits for the process to end (a controller on etcd resigns).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.id() as i32), nix::sys::signal::Signal::SIGTERM);
            if p.wait(Duration::from_secs(10)).is_none() {
                p.kill();
            }
        }
    }

    /// `kill -9`: the witness is gone.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- controller log ({}) ----\n{}", self.ns_name, self.log_tail(60));
        }
    }
}

/// An agent configuration that is not enrolled yet: everything but `node`, `controller`
/// and `tls`, which `hapair-agent enroll` fills in.
pub fn unenrolled_config(home: &Path) -> String {
    format!(
        "apiVersion: hapair.dev/v1alpha1\nkind: AgentConfig\n# kept by enroll\nstateDir: {}\nruntimeDir: {}\nendpoints:\n  listen: {ENDPOINTS}\nlog:\n  level: info,hapair_agent=debug\n",
        home.join("state").display(),
        home.join("run").display()
    )
}

/// `hapair-agent enroll` of `node` (home directory `home`, holding its `agent.yaml`)
/// against `controller`, run inside the node's namespace.
pub fn enroll(ns: &Netns, controller: &Controller, node: &str, home: &Path) {
    enroll_with(ns, controller, &[controller.url()], node, home);
}

/// [`enroll`] with a token from `controller`, given `urls` (tried in order) as the
/// controllers to enroll through.
pub fn enroll_with(ns: &Netns, controller: &Controller, urls: &[String], node: &str, home: &Path) {
    let (token, fingerprint) = controller.token(node);
    let exe = binary("hapair-agent").display().to_string();
    let url = urls.join(",");
    let dir = home.display().to_string();
    let args = [
        exe.as_str(),
        "enroll",
        "--controller",
        &url,
        "--node",
        node,
        "--token",
        &token,
        "--ca-fingerprint",
        &fingerprint,
        "--dir",
        &dir,
    ];
    let out = ns.exec(&args).unwrap_or_else(|e| panic!("enroll {node}: {e}"));
    assert!(out.status.success(), "enroll {node}: {}", String::from_utf8_lossy(&out.stderr));
}
