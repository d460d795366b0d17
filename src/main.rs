//! The `taskgate` binary: parse the command line, merge its settings, set up logging, run, exit.

use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    taskgate::shutdown::survive_hangups();
    let prepared = match cli::parse().prepare() {
        Ok(prepared) => prepared,
        // The settings could not be completed (a bad config file): nothing was logged yet.
        Err(ending) => return finish(ending),
    };
    // Built once the command is known: `serve` runs on its own number of threads.
    let runtime = match prepared.runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("taskgate: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let exporting = match prepared.start_exporting(&runtime) {
        Ok(exporting) => exporting,
        Err(ending) => return finish(ending),
    };
    let log = taskgate::log::init(
        prepared.log_format(),
        prepared.default_log_filter(),
        exporting.as_ref(),
    );
    prepared.log_span_export(exporting.as_ref());
    let ending = runtime.block_on(prepared.run());
    // The log goes first so that the error, if any, is the last line, as it was when logging
    // was synchronous. Both are bounded: a stalled log reader must not hold the exit.
    log.close(ending.error);
    // Without waiting for its blocking threads: a DNS lookup the system resolver holds for
    // seconds would otherwise hold the exit, which is bounded by the grace.
    runtime.shutdown_background();
    ending.code
}

/// Prints the error of a command that ended before logging started, and gives the exit code.
fn finish(ending: cli::Ending) -> ExitCode {
    if let Some(error) = ending.error {
        eprintln!("{error}");
    }
    ending.code
}
