//! `hapair-agent`: the node agent daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rustls_pki_types::pem::PemObject;

#[derive(Parser, Debug)]
#[command(name = "hapair-agent", version, about = "hapair node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check a desired-config bundle file for this node and print what it would run.
    CheckConfig {
        /// Node-API desired-config bundle (JSON or YAML).
        #[arg(long)]
        config: PathBuf,
        /// This node's name; defaults to the bundle's node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Enroll this node with a controller: trade a one-time token (from
    /// `hapair-operator token create`) for a client certificate.
    Enroll {
        /// Controller base URL, e.g. https://ctl.example:7443.
        #[arg(long)]
        controller: String,
        /// The one-time token.
        #[arg(long, env = "HAPAIR_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// This node's name, as in the HaGroup's spec.nodes.
        #[arg(long)]
        node: String,
        /// Where to write node.key, node.crt, ca.crt and agent.json.
        #[arg(long, default_value = "/etc/hapair")]
        dir: PathBuf,
        /// SHA-256 fingerprint of the controller CA (printed by `token create`).
        #[arg(long)]
        ca_fingerprint: Option<String>,
        /// The controller CA certificate, obtained out of band.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Replace an existing enrollment.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config, node } => {
            let text = std::fs::read_to_string(&config).with_context(|| format!("reading {}", config.display()))?;
            let bundle = hapair_agent::bundle::decode(&text).with_context(|| config.display().to_string())?;
            let node = node.unwrap_or_else(|| bundle.node.clone());
            hapair_agent::bundle::check(&bundle, &node).with_context(|| config.display().to_string())?;
            println!("{}: revision {} for node {node}", config.display(), bundle.revision);
            for group in &bundle.groups {
                let steps: Vec<_> = group.spec.flow.iter().map(|s| s.name.as_str()).collect();
                println!("  group {}: {} flow steps [{}]", group.key, steps.len(), steps.join(", "));
            }
            Ok(())
        }
        Command::Enroll { controller, token, node, dir, ca_fingerprint, ca_file, force } => {
            use hapair_agent::enroll::{EnrollOptions, Trust, enroll, fingerprint, normalize_fingerprint};
            let pinned = ca_fingerprint.as_deref().map(normalize_fingerprint).transpose()?;
            let trust = match (pinned, ca_file) {
                (None, None) => anyhow::bail!(
                    "refusing to trust the controller blindly: pass --ca-fingerprint (printed by `hapair-operator token create`) or --ca-file"
                ),
                (pinned, Some(file)) => {
                    let pem = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
                        .with_context(|| format!("{} is not a PEM certificate", file.display()))?;
                    if let Some(pin) = pinned
                        && fingerprint(&der) != pin
                    {
                        anyhow::bail!("{} does not match --ca-fingerprint", file.display());
                    }
                    Trust::CaPem(pem)
                }
                (Some(pin), None) => Trust::Fingerprint(pin),
            };
            let options = EnrollOptions { controller, token, node: node.clone(), dir, trust, force };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let config = runtime.block_on(enroll(&options))?;
            println!("enrolled node {node}; controller settings in {}", config.display());
            Ok(())
        }
    }
}
