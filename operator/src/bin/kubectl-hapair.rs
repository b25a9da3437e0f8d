//! `kubectl-hapair` (also installed as `hapair`): the command-line client.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "kubectl-hapair", version, about = "hapair command-line client (kubectl plugin)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check manifest files the way the API server and the controller would.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { files } => {
            let mut sources = Vec::new();
            for file in &files {
                match std::fs::read_to_string(file) {
                    Ok(text) => sources.push((file.display().to_string(), text)),
                    Err(e) => {
                        eprintln!("{}: {e}", file.display());
                        return ExitCode::FAILURE;
                    }
                }
            }
            let catalog =
                hapair_operator::catalog::Catalog::from_sources(sources.iter().map(|(f, t)| (f.as_str(), t.as_str())));
            for (key, (_, origin)) in &catalog.groups {
                println!("valid: HaGroup {key} ({})", origin.file);
            }
            for (key, (_, origin)) in &catalog.volumes {
                println!("valid: ReplicatedVolume {key} ({})", origin.file);
            }
            for error in &catalog.errors {
                eprintln!("invalid: {error}");
            }
            if catalog.errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
    }
}
