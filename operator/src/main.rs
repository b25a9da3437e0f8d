//! `hapair-operator`: the hapair controller.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use hapair_operator::controller::views::{AdminConfig, CLI_CONFIG_FILE};
use hapair_operator::desired::catalog::Catalog;
use hapair_operator::etcd::run::{ReplicatedConfig, default_name};
use hapair_operator::etcd::{EtcdConfig, EtcdTls};
use hapair_operator::k8s::election::ElectionTiming;
use hapair_operator::k8s::run::{RUNTIME_FILE, RunConfig, RuntimeInfo, secret_names};
use hapair_operator::k8s::term::TermConfig;
use hapair_operator::k8s::token_secret::TokenSecret;
use hapair_operator::k8s::{pki_secret, run};
use hapair_operator::pki::tokens::{TokenFile, enroll_instructions};
use hapair_operator::pki::{CA_CERT_FILE, fingerprint};
use hapair_operator::server::ApiSettings;
use hapair_operator::standalone::{Standalone, StandaloneConfig};
use hapair_operator::support::timestamp::{format_millis, now_millis};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

#[derive(Parser, Debug)]
#[command(
    name = "hapair-operator",
    version,
    about = "hapair controller",
    long_about = "hapair controller. Without a subcommand it runs as the Kubernetes operator (`run`).",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

/// How to reach etcd (everything but the endpoints).
#[derive(Args, Debug, Clone)]
struct EtcdArgs {
    /// Prefix of every key hapair keeps in etcd.
    #[arg(long, default_value = hapair_operator::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// CA certificate (PEM) of the etcd members, for https:// endpoints.
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd members that require one.
    #[arg(long)]
    etcd_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long)]
    etcd_key: Option<PathBuf>,
}

impl EtcdArgs {
    fn config(&self, endpoints: Vec<String>) -> EtcdConfig {
        let mut config = EtcdConfig::new(endpoints);
        config.prefix = self.etcd_prefix.clone();
        config.tls =
            self.etcd_ca.clone().map(|ca| EtcdTls { ca, cert: self.etcd_cert.clone(), key: self.etcd_key.clone() });
        config
    }
}

/// Several standalone controllers sharing etcd.
#[derive(Args, Debug, Clone)]
struct ReplicatedArgs {
    /// Keep the controller's state in etcd (client URLs, comma-separated or repeated) and
    /// run as one of a set of controllers, one leading; without it, the state directory
    /// holds everything and this is the only controller.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    #[command(flatten)]
    etcd_args: EtcdArgs,
    /// This controller's name in the leader key [default: the host name].
    #[arg(long)]
    name: Option<String>,
    /// The leader's etcd lease, whole seconds: how long the set is without a leader after
    /// the leader dies without resigning.
    #[arg(long, default_value_t = 5)]
    leader_ttl: u64,
    /// Base URL of every controller of the set (comma-separated or repeated), this one
    /// included; agents learn them when they enroll and fail over between them.
    #[arg(long, value_delimiter = ',')]
    controllers: Vec<String>,
}

/// The Kubernetes operator's settings (also accepted without the `run` subcommand).
#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Address the node API (HTTPS, mutual TLS) listens on.
    #[arg(long, default_value = "0.0.0.0:8443")]
    node_api_listen: SocketAddr,
    /// Address of the plain-HTTP /metrics, /healthz and /readyz endpoints.
    #[arg(long, default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Name or IP agents use to reach the node API (repeatable); goes into the serving
    /// certificate.
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// Name of the coordination.k8s.io Lease the replicas elect their leader with.
    #[arg(long, default_value = "hapair-leader")]
    leader_election_lease: String,
    /// Secret (operator namespace) holding the controller CA (ca.crt, ca.key); created by
    /// the first leader when missing.
    #[arg(long, default_value = "hapair-pki")]
    pki_secret: String,
    /// Secret holding the enrollment token book [default: the PKI Secret's name with
    /// -tokens for -pki].
    #[arg(long)]
    tokens_secret: Option<String>,
    /// Prefix of the controller state Secrets [default: the PKI Secret's name with -state
    /// for -pki].
    #[arg(long)]
    state_secret_prefix: Option<String>,
    /// The operator's namespace (Lease and Secrets) [default: the kubeconfig's namespace].
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// Another namespace whose Secrets HaGroups may name as heartbeat keys (repeatable or
    /// comma-separated; the operator's own namespace always counts). Secrets are read in
    /// these namespaces only, never cluster-wide; the chart sets it from
    /// rbac.secretNamespaces, next to the Roles that allow it.
    #[arg(long = "secret-namespace", value_delimiter = ',', value_name = "NAMESPACE")]
    secret_namespaces: Vec<String>,
    /// This replica's identity in the Lease and in Events [default: the host name].
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run as the Kubernetes operator (the default): reconcile HaGroups and
    /// ReplicatedVolumes, serve the node API and, on the elected leader, the witness.
    Run(RunArgs),
    /// Validate a directory of manifests and print what it would run.
    Plan {
        #[arg(long)]
        manifests: PathBuf,
    },
    /// Run the controller on a directory of manifests, without Kubernetes.
    Standalone {
        /// Directory of HaGroup, ReplicatedVolume and Secret YAML (watched for changes).
        #[arg(long)]
        manifests: PathBuf,
        /// Directory for the CA, certificates, tokens, state and status (created, mode 0700).
        #[arg(long)]
        state: PathBuf,
        /// Address the node API listens on.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// Name or IP agents use to reach the controller (repeatable); goes into the server
        /// certificate.
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Base URL written into the CLI config (default: https://<first server name>:<port>).
        #[arg(long)]
        advertise: Option<String>,
        /// Open node API connections at most (0: no limit).
        #[arg(long, default_value_t = ApiSettings::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        /// Open node API connections at most from one IP address (0: no limit); raise it
        /// when many agents share an address behind NAT.
        #[arg(long, default_value_t = ApiSettings::DEFAULT_MAX_CONNECTIONS_PER_CLIENT)]
        max_connections_per_client: usize,
        /// Do not serve the web console under /ui/ (sign-in needs a token from
        /// `console-token create` either way).
        #[arg(long)]
        no_console: bool,
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        #[command(flatten)]
        replicated: ReplicatedArgs,
    },
    /// Move a standalone controller's state directory into etcd, for controllers started
    /// with `standalone --etcd` to take over from it (stop the single controller first).
    Migrate {
        /// The state directory of the single controller.
        #[arg(long)]
        state: PathBuf,
        /// Client URLs of the etcd members (comma-separated or repeated).
        #[arg(long = "to-etcd", value_delimiter = ',', required = true)]
        to_etcd: Vec<String>,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Manage one-time enrollment tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Manage sign-in tokens for the web console (standalone controllers).
    ConsoleToken {
        #[command(subcommand)]
        command: ConsoleTokenCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConsoleTokenCommand {
    /// Issue a token to sign in to the console at https://CONTROLLER:7443/ui/.
    ///
    /// Tokens are signed with a key derived from the controller CA, so every controller
    /// holding the CA accepts them and nothing is stored. They cannot be revoked one by one:
    /// keep the ttl short.
    Create {
        /// State directory of a standalone controller.
        #[arg(long, required_unless_present = "etcd")]
        state: Option<PathBuf>,
        /// viewer: sees everything; operator: also runs admin actions.
        #[arg(long)]
        role: hapair_operator::console::session::ConsoleRole,
        /// Who the token is for; audit events name them.
        #[arg(long)]
        name: Option<String>,
        /// Lifetime, e.g. 8h, 24h (at most 720h).
        #[arg(long, default_value = "8h")]
        ttl: hapair_crds::Duration,
        /// Controllers on etcd: the etcd client URLs (comma-separated or repeated).
        #[arg(long, value_delimiter = ',', conflicts_with = "state")]
        etcd: Vec<String>,
        #[command(flatten)]
        etcd_args: EtcdArgs,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Issue a token with which one node's agent can enroll (`hapair-agent enroll`).
    ///
    /// With --state, into a standalone controller's state directory; without, into the
    /// operator's token Secret (run it in the operator pod: `kubectl exec deploy/NAME --
    /// hapair-operator token create --node NAME`).
    Create {
        /// State directory of a standalone controller.
        #[arg(long)]
        state: Option<PathBuf>,
        #[arg(long)]
        node: String,
        /// Lifetime, e.g. 30m, 1h, 24h (at most 168h).
        #[arg(long, default_value = "1h")]
        ttl: hapair_crds::Duration,
        /// Kubernetes: the operator's namespace [default: from the running operator].
        #[arg(long, env = "POD_NAMESPACE")]
        namespace: Option<String>,
        /// Kubernetes: the token Secret [default: from the running operator].
        #[arg(long)]
        tokens_secret: Option<String>,
        /// Kubernetes: the PKI Secret, for the CA fingerprint [default: from the running
        /// operator].
        #[arg(long)]
        pki_secret: Option<String>,
        /// Controllers on etcd: the etcd client URLs (comma-separated or repeated).
        #[arg(long, value_delimiter = ',', conflicts_with = "state")]
        etcd: Vec<String>,
        #[command(flatten)]
        etcd_args: EtcdArgs,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}

/// Resolves on SIGINT or SIGTERM, the ways every mode of the controller is stopped.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    })
}

async fn standalone(config: StandaloneConfig) -> anyhow::Result<()> {
    // The witness's clock starts with the node API: `NodeApi` measures `now` from its own
    // creation, so a fresh witness waits out L·(1+drift) after every controller start.
    let witness = hapair_operator::witness::Witness::new(std::time::Duration::ZERO);
    let controller =
        Standalone::start(config, Some(Box::new(witness))).await.context("starting the standalone controller")?;
    shutdown_signal()?.await;
    tracing::info!("shutting down");
    controller.shutdown().await;
    Ok(())
}

fn replicated_config(standalone: StandaloneConfig, args: &ReplicatedArgs) -> anyhow::Result<ReplicatedConfig> {
    let etcd = args.etcd_args.config(args.etcd.clone());
    hapair_operator::etcd::validate(&etcd)?;
    let name = match args.name.clone().or_else(default_name) {
        Some(name) => name,
        None => anyhow::bail!("--name: no host name to default to; name this controller"),
    };
    let election = hapair_operator::etcd::election::ElectionTiming::from_ttl(args.leader_ttl)?;
    Ok(ReplicatedConfig { standalone, etcd, name, election })
}

async fn standalone_replicated(config: ReplicatedConfig) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    hapair_operator::etcd::run::run(config, shutdown).await.context("running the controller on etcd")?;
    Ok(())
}

async fn migrate(state: PathBuf, etcd: EtcdConfig) -> anyhow::Result<()> {
    let client = hapair_operator::etcd::connect(&etcd).await?;
    let keys = hapair_operator::etcd::Keys::new(&etcd.prefix);
    let moved = hapair_operator::etcd::migrate::migrate(&state, &client, &keys).await?;
    println!(
        "migrated {} into etcd under {}: {} group statuses, {} volume statuses, {} event lists, the token book and the CA ({})",
        state.display(),
        etcd.prefix,
        moved.groups,
        moved.volumes,
        moved.event_lists,
        moved.ca_fingerprint
    );
    println!(
        "next: start the controllers with `hapair-operator standalone --etcd {} ...`; keep {} as a backup",
        etcd.endpoints.join(","),
        state.display()
    );
    Ok(())
}

fn token_create_file(state: PathBuf, node: String, ttl: hapair_crds::Duration) -> anyhow::Result<()> {
    let ca_path = state.join(CA_CERT_FILE);
    let ca_pem = std::fs::read(&ca_path).with_context(|| {
        format!("reading {} (start the standalone controller once to create the CA)", ca_path.display())
    })?;
    let ca = CertificateDer::from_pem_slice(&ca_pem)
        .with_context(|| format!("{} is not a PEM certificate", ca_path.display()))?;
    let now = now_millis();
    let token = TokenFile::new(&state).create(&node, ttl.as_std(), now)?;
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let controller = standalone_url(&state).unwrap_or_else(|| UNKNOWN_CONTROLLER.into());
    let expires = format_millis(now.saturating_add(ttl_ms));
    print!("{}", enroll_instructions(&token, &node, &expires, &fingerprint(&ca), &controller));
    Ok(())
}

/// Stands for the controller's URL in printed instructions when it cannot be found out.
const UNKNOWN_CONTROLLER: &str = "https://CONTROLLER:7443";

/// The URL a standalone controller wrote into its CLI config, if it has started once.
fn standalone_url(state: &std::path::Path) -> Option<String> {
    let bytes = std::fs::read(state.join(CLI_CONFIG_FILE)).ok()?;
    serde_json::from_slice::<AdminConfig>(&bytes).ok().map(|c| c.controller)
}

/// The URL of the controller leading on etcd, if one leads.
async fn etcd_leader_url(client: &etcd_client::Client, keys: &hapair_operator::etcd::Keys) -> Option<String> {
    use hapair_operator::etcd::{election::LeaderRecord, get_json};
    get_json::<LeaderRecord>(client, &keys.leader()).await.ok().flatten().map(|leader| leader.url)
}

/// `console-token create`: signs a token with the CA of the state directory or of etcd.
async fn console_token_create(
    state: Option<PathBuf>,
    role: hapair_operator::console::session::ConsoleRole,
    name: Option<String>,
    ttl: hapair_crds::Duration,
    etcd: Option<EtcdConfig>,
) -> anyhow::Result<()> {
    use hapair_operator::console::session::ConsoleKeys;
    use hapair_operator::pki::{CA_KEY_FILE, Ca};
    let (ca, controller) = match (etcd, state) {
        (Some(etcd), _) => {
            use hapair_operator::etcd::{Keys, connect, shared};
            let client = connect(&etcd).await?;
            let keys = Keys::new(&etcd.prefix);
            let ca = shared::load_ca(&client, &keys).await?.with_context(|| {
                format!("no CA in etcd under {}: has a controller started with --etcd?", etcd.prefix)
            })?;
            (ca, etcd_leader_url(&client, &keys).await)
        }
        (None, Some(state)) => {
            let read = |file: &str| {
                let path = state.join(file);
                std::fs::read_to_string(&path).with_context(|| {
                    format!("reading {} (start the standalone controller once to create the CA)", path.display())
                })
            };
            let ca = Ca::from_pems(&read(CA_CERT_FILE)?, &read(CA_KEY_FILE)?)?;
            (ca, standalone_url(&state))
        }
        (None, None) => anyhow::bail!("give --state DIR or --etcd URL"),
    };
    let now = now_millis();
    let (token, claims) =
        ConsoleKeys::from_ca(&ca).issue_token(role, name.as_deref(), ttl.as_std(), now, &mut rand::rng())?;
    let url = controller.unwrap_or_else(|| UNKNOWN_CONTROLLER.into());
    println!("{token}");
    eprintln!(
        "console token {} for the {} role, valid until {}; sign in at {}/ui/",
        claims.id,
        role.as_str(),
        format_millis(claims.exp),
        url.trim_end_matches('/')
    );
    Ok(())
}

/// `token create --etcd`: into the token book the controllers on etcd share.
async fn token_create_etcd(node: String, ttl: hapair_crds::Duration, etcd: EtcdConfig) -> anyhow::Result<()> {
    use hapair_operator::etcd::{Keys, connect, shared};
    let client = connect(&etcd).await?;
    let keys = Keys::new(&etcd.prefix);
    let ca = shared::load_ca(&client, &keys)
        .await?
        .with_context(|| format!("no CA in etcd under {}: has a controller started with --etcd?", etcd.prefix))?;
    let now = now_millis();
    let token = shared::EtcdTokens::new(client.clone(), &keys).issue(&node, ttl.as_std(), now).await?;
    let controller = etcd_leader_url(&client, &keys).await.unwrap_or_else(|| UNKNOWN_CONTROLLER.into());
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let expires = format_millis(now.saturating_add(ttl_ms));
    print!("{}", enroll_instructions(&token, &node, &expires, &ca.fingerprint(), &controller));
    Ok(())
}

/// `token create` in the operator pod: into the token Secret of the running operator.
async fn token_create_kube(
    node: String,
    ttl: hapair_crds::Duration,
    namespace: Option<String>,
    tokens_secret: Option<String>,
    pki: Option<String>,
) -> anyhow::Result<()> {
    let running: Option<RuntimeInfo> =
        std::fs::read(RUNTIME_FILE).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let namespace = namespace
        .or_else(|| running.as_ref().map(|r| r.namespace.clone()))
        .unwrap_or_else(|| client.default_namespace().to_string());
    let pki = pki.or_else(|| running.as_ref().map(|r| r.pki_secret.clone())).unwrap_or_else(|| "hapair-pki".into());
    let tokens_secret = tokens_secret
        .or_else(|| running.as_ref().map(|r| r.tokens_secret.clone()))
        .unwrap_or_else(|| secret_names(&pki).0);
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client, &namespace);
    let ca = pki_secret::load(&secrets, &pki)
        .await?
        .with_context(|| format!("no Secret {pki} in namespace {namespace}: has the operator started?"))?;
    let now = now_millis();
    let token = TokenSecret::new(secrets, &tokens_secret, None).issue(&node, ttl.as_std(), now).await?;
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let controller = match &running {
        Some(r) => r.server_names.first().map(|n| format!("https://{n}:{}", r.node_api_port)),
        None => None,
    }
    .unwrap_or_else(|| "https://ADDRESS:PORT".into());
    let expires = format_millis(now.saturating_add(ttl_ms));
    print!("{}", enroll_instructions(&token, &node, &expires, &ca.fingerprint(), &controller));
    Ok(())
}

async fn run_operator(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let namespace = args.namespace.clone().unwrap_or_else(|| client.default_namespace().to_string());
    let identity = match args.identity.clone() {
        Some(identity) => identity,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .context("no --identity (POD_NAME) and no host name")?,
    };
    let (default_tokens, default_state) = secret_names(&args.pki_secret);
    let mut term = TermConfig::new(
        &namespace,
        &identity,
        &args.state_secret_prefix.clone().unwrap_or(default_state),
        &args.tokens_secret.clone().unwrap_or(default_tokens),
    );
    term.secret_namespaces = args.secret_namespaces.iter().filter(|n| !n.is_empty()).cloned().collect();
    let config = RunConfig {
        node_api_listen: args.node_api_listen,
        metrics_listen: args.metrics_listen,
        server_names: if args.server_names.is_empty() { vec!["localhost".into()] } else { args.server_names.clone() },
        lease_name: args.leader_election_lease.clone(),
        pki_secret: args.pki_secret.clone(),
        election: ElectionTiming::default(),
        term,
        runtime_file: Some(PathBuf::from(RUNTIME_FILE)),
    };
    let shutdown = shutdown_signal()?;
    // A fresh witness for every term: `NodeApi` measures `now` from its own creation (at the
    // start of the term), so the witness waits out L·(1+drift) after every takeover.
    let witness: run::AuthorityFactory =
        Arc::new(|| Box::new(hapair_operator::witness::Witness::new(std::time::Duration::ZERO)));
    run::run(client, config, Some(witness), shutdown).await?;
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}

fn main() -> ExitCode {
    hapair_operator::support::allocator::limit_arenas();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run(cli.run));
    let result = match command {
        Command::Run(args) => {
            init_logging(args.log_format);
            runtime().and_then(|rt| rt.block_on(run_operator(args)))
        }
        Command::Plan { manifests } => match Catalog::load_dir(&manifests, &Default::default()) {
            Ok(catalog) => {
                print!("{}", hapair_operator::desired::describe::render(&catalog));
                return if catalog.errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
            }
            Err(e) => Err(e.into()),
        },
        Command::Standalone {
            manifests,
            state,
            listen,
            server_names,
            advertise,
            max_connections,
            max_connections_per_client,
            no_console,
            log_format,
            replicated,
        } => {
            init_logging(log_format);
            let mut config = StandaloneConfig::new(&manifests, &state, listen);
            config.server_names = server_names;
            config.advertise = advertise;
            config.api.max_connections = max_connections;
            config.api.max_connections_per_client = max_connections_per_client;
            config.console = !no_console;
            config.api.controllers =
                replicated.controllers.iter().map(|c| c.trim_end_matches('/').to_string()).collect();
            if replicated.etcd.is_empty() {
                runtime().and_then(|rt| rt.block_on(standalone(config)))
            } else {
                replicated_config(config, &replicated)
                    .and_then(|config| runtime().and_then(|rt| rt.block_on(standalone_replicated(config))))
            }
        }
        Command::Migrate { state, to_etcd, etcd } => {
            init_logging(LogFormat::Text);
            runtime().and_then(|rt| rt.block_on(migrate(state, etcd.config(to_etcd))))
        }
        Command::Token {
            command: TokenCommand::Create { state, node, ttl, namespace, tokens_secret, pki_secret, etcd, etcd_args },
        } => {
            if ttl.is_zero() {
                Err(anyhow::anyhow!("--ttl must be greater than zero"))
            } else if !etcd.is_empty() {
                runtime().and_then(|rt| rt.block_on(token_create_etcd(node, ttl, etcd_args.config(etcd))))
            } else if let Some(state) = state {
                token_create_file(state, node, ttl)
            } else {
                runtime().and_then(|rt| rt.block_on(token_create_kube(node, ttl, namespace, tokens_secret, pki_secret)))
            }
        }
        Command::ConsoleToken { command: ConsoleTokenCommand::Create { state, role, name, ttl, etcd, etcd_args } } => {
            let etcd = (!etcd.is_empty()).then(|| etcd_args.config(etcd));
            runtime().and_then(|rt| rt.block_on(console_token_create(state, role, name, ttl, etcd)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hapair-operator: {e:#}");
            ExitCode::FAILURE
        }
    }
}
