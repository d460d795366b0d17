//! The `taskgate` binary: parse the command line, merge its settings, set up logging, run, exit.

use std::process::ExitCode;

mod cli;

#[tokio::main]
async fn main() -> ExitCode {
    let ending = match cli::parse().prepare() {
        Ok(prepared) => {
            let log = taskgate::log::init(prepared.log_format(), prepared.default_log_filter());
            let ending = prepared.run().await;
            // The log goes first so that the error, if any, is the last line, as it was when
            // logging was synchronous.
            log.flush_within(ending.log_flush_bound);
            ending
        }
        // The settings could not be completed (a bad config file): nothing was logged yet.
        Err(ending) => ending,
    };
    if let Some(error) = ending.error {
        eprintln!("{error}");
    }
    ending.code
}
