//! What the commands print on stdout, through [`line`] and [`text`] rather than `println!`,
//! which panics (exit 101, with a backtrace) when stdout's reader has gone: `taskgate watch |
//! head -n 1`, `case-state … | true`.
//!
//! A closed stdout is not an error, as in ripgrep: the output ends there, nothing is printed
//! about it, and the command exits with the code it would have given otherwise (`watch`, whose
//! only work is printing, stops and exits 0). Any other write error (a full disk) is one, on
//! stderr; it never changes an exit code that says what a command did (1 for a refusal, 3 for
//! an extraction followed no further), since a script reads those to decide whether to send the
//! command again. Only where the output is the whole result does it turn 0 into 1.

use std::fmt::Display;
use std::io::{self, Write as _};

use super::{Exit, Outcome};

/// Why output was not written.
#[derive(Debug)]
pub(super) enum Unwritten {
    /// Stdout's reader has gone (EPIPE): the output ends, quietly.
    ReaderGone,
    /// Writing failed otherwise.
    Failed(io::Error),
}

/// The result of printing.
pub(super) type Printed = Result<(), Unwritten>;

/// Prints `line` and a newline on stdout.
pub(super) fn line(line: impl Display) -> Printed {
    text(format_args!("{line}\n"))
}

/// Prints `text` on stdout as it is, flushed: a reader sees each line as soon as it is printed.
pub(super) fn text(text: impl Display) -> Printed {
    let mut stdout = io::stdout().lock();
    write!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .map_err(|error| match error.kind() {
            io::ErrorKind::BrokenPipe => Unwritten::ReaderGone,
            _ => Unwritten::Failed(error),
        })
}

/// `exit` once the output is printed, or its reader gone. A failed write is an error with the
/// same exit code, but 1 for a 0: a read, a watch, a report, whose output is the result. (A
/// command sent to the controller ends through `task_call::end_command`, which keeps its 0.)
pub(super) fn exit_after(printed: Printed, exit: Exit) -> Outcome {
    match printed {
        Ok(()) | Err(Unwritten::ReaderGone) => Ok(exit),
        Err(Unwritten::Failed(error)) => {
            let exit = match exit {
                Exit::Success => Exit::CallFailed,
                other => other,
            };
            Err((
                exit,
                anyhow::Error::new(error).context("cannot write to stdout"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gone_reader_keeps_the_exit_code_and_a_failed_write_is_an_error() {
        assert!(matches!(
            exit_after(Ok(()), Exit::CallFailed),
            Ok(Exit::CallFailed)
        ));
        assert!(matches!(
            exit_after(Err(Unwritten::ReaderGone), Exit::Success),
            Ok(Exit::Success)
        ));
        let full = io::Error::from_raw_os_error(28);
        let Err((exit, error)) = exit_after(Err(Unwritten::Failed(full)), Exit::Success) else {
            panic!("a failed write was not an error");
        };
        assert_eq!(exit, Exit::CallFailed);
        assert_eq!(
            format!("{error:#}"),
            "cannot write to stdout: No space left on device (os error 28)"
        );
    }

    /// A failed write keeps every exit code that says what a command did but 0.
    #[test]
    fn a_failed_write_keeps_the_exit_code_of_what_was_done() {
        let failed = || Err(Unwritten::Failed(io::Error::from_raw_os_error(5)));
        for exit in [Exit::CallFailed, Exit::FollowingStopped, Exit::Usage] {
            assert_eq!(exit_after(failed(), exit).unwrap_err().0, exit);
        }
    }
}
