//! Writes the hapair CRDs into the Helm chart (`charts/hapair/crds/`), or with `--check`
//! fails when the committed files differ from what the code generates.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut check = false;
    let mut dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/hapair/crds"));
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--check" => check = true,
            "--out" => match args.next() {
                Some(d) => dir = PathBuf::from(d),
                None => {
                    eprintln!("crdgen: --out needs a directory");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!("usage: crdgen [--out DIR] [--check]");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("crdgen: unknown argument {other:?}; usage: crdgen [--out DIR] [--check]");
                return ExitCode::from(2);
            }
        }
    }
    let mut stale = false;
    for crd in hapair_crds::crd::all() {
        let path = dir.join(hapair_crds::crd::file_name(&crd));
        let text = match hapair_crds::crd::render(&crd) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("crdgen: rendering {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        };
        if check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                eprintln!("crdgen: {} is stale", path.display());
                stale = true;
            }
            continue;
        }
        if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, text)) {
            eprintln!("crdgen: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    if stale { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
