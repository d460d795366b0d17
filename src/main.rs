//! The `taskgate` binary: parse the command line, set up logging, run, exit.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = taskgate::cli::Cli::parse_args();
    let log = taskgate::log::init(cli.log_format(), cli.default_log_filter());
    let ending = taskgate::cli::run(cli).await;
    // The log goes first so that the error, if any, is the last line, as it was when logging
    // was synchronous.
    log.flush_within(ending.log_flush_bound);
    if let Some(error) = ending.error {
        eprintln!("{error}");
    }
    ending.code
}
