//! Writes the hapair CRDs into the Helm chart (`charts/hapair/crds/`), or with `--docs` their
//! field reference into `docs/reference/`; with `--check` it writes nothing and fails when
//! the committed files differ from what the code generates.

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: crdgen [--docs] [--out DIR] [--check]";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut check = false;
    let mut docs = false;
    let mut out: Option<PathBuf> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--check" => check = true,
            "--docs" => docs = true,
            "--out" => match args.next() {
                Some(d) => out = Some(PathBuf::from(d)),
                None => {
                    eprintln!("crdgen: --out needs a directory");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                println!("  (default)  CRD YAML into charts/hapair/crds/");
                println!("  --docs     the CRD field reference into docs/reference/");
                println!("  --out DIR  write (or check) DIR instead");
                println!("  --check    write nothing; fail when the committed files are stale");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("crdgen: unknown argument {other:?}; {USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let default_dir = if docs { "/../docs/reference" } else { "/../charts/hapair/crds" };
    let dir = out.unwrap_or_else(|| PathBuf::from(format!("{}{default_dir}", env!("CARGO_MANIFEST_DIR"))));
    let regenerate = if docs { "crdgen -- --docs" } else { "crdgen" };
    let mut stale = false;
    for crd in hapair_crds::crd::all() {
        let (file, text) = if docs {
            (hapair_crds::reference::file_name(&crd), hapair_crds::reference::render(&crd).map_err(|e| e.to_string()))
        } else {
            (hapair_crds::crd::file_name(&crd), hapair_crds::crd::render(&crd).map_err(|e| e.to_string()))
        };
        let path = dir.join(file);
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                eprintln!("crdgen: rendering {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        };
        if check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                eprintln!("crdgen: {} is stale; run `cargo run -p hapair-crds --bin {regenerate}`", path.display());
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
