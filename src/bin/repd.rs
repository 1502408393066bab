//! `repd`: see `tandem_replicator::daemon`.
fn main() -> std::process::ExitCode {
    tandem_replicator::daemon::main()
}
