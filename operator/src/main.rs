//! `hapair-operator`: the hapair controller.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hapair_operator::catalog::Catalog;

#[derive(Parser, Debug)]
#[command(name = "hapair-operator", version, about = "hapair controller")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a directory of manifests and print what it would run.
    Plan {
        #[arg(long)]
        manifests: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Plan { manifests } => match Catalog::load_dir(&manifests) {
            Ok(catalog) => {
                print!("{}", hapair_operator::plan::render(&catalog));
                if catalog.errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
            }
            Err(e) => {
                eprintln!("hapair-operator: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
