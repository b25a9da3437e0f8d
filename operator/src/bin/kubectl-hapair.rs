//! `kubectl-hapair` (also installed as `hapair`, a symlink to this binary): the
//! command-line client. See [`hapair_operator::cli`].

fn main() -> std::process::ExitCode {
    hapair_operator::cli::main()
}
