//! `hapair-agent`: the node agent daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

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
    }
}
