//! `repctl`: see `tandem_replicator::ctl`.
fn main() -> std::process::ExitCode {
    tandem_replicator::ctl::main()
}
