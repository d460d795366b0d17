//! Logging off the call path: a call formats its line into a bounded queue and goes on; a
//! dedicated thread writes the queue to stderr in batches.
//!
//! A log reader that stops reading (a stuck log shipper, a container runtime in blocking log mode)
//! must never make a call wait: when the queue is full a line is dropped, never waited for. Drops
//! are counted (`taskgate_log_lines_dropped_total`) and reported in one line once writing
//! resumes. On exit the queue is flushed, for at most the time the caller allows.

mod queue;

use std::fmt;
use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::{self, DefaultVisitor, Format, Full, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::{LookupSpan, Registry, SpanRef};
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

/// How many bytes of formatted lines may wait for the writer thread: some 8,000 lines of a few
/// hundred bytes, which absorbs a reader that pauses for a fraction of a second at tens of
/// thousands of calls a second. The writer thread writes all that waits with one `write(2)`, so a
/// busy gateway does not make a system call per line.
const QUEUE_BYTES: usize = 2 * 1024 * 1024;

/// After writing a batch the writer thread waits this long before taking the next, so that under
/// load lines pile up in the queue instead of each call waking the thread (a futex wake on the
/// call's own thread, and a `write(2)` per line). Lines reach stderr at most this much later.
const BATCH_INTERVAL: Duration = Duration::from_millis(10);

/// The queue, once logging is set up: for the dropped-lines count.
static QUEUE: OnceLock<queue::QueueWriter> = OnceLock::new();

/// The queue, for lines written without a tracing event ([`write_plain`]); set only when lines
/// are unstyled plain text, the one format those lines reproduce.
static PLAIN_SINK: OnceLock<queue::QueueWriter> = OnceLock::new();

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Keeps the writer thread running; [`LogGuard::flush_within`] drains it on exit.
#[derive(Debug)]
pub struct LogGuard {
    /// `None` if the thread could not be started: lines then go nowhere.
    writer_thread: Option<queue::QueueThread>,
}

/// Installs the global subscriber: `RUST_LOG` if set, else `default_filter`, formatted as
/// `format` and written to stderr by a dedicated thread.
pub fn init(format: LogFormat, default_filter: &str) -> LogGuard {
    let settings = queue::WriterSettings {
        limit: QUEUE_BYTES,
        interval: BATCH_INTERVAL,
        report_drops,
    };
    let (writer, writer_thread) = match queue::start("taskgate-log", settings, std::io::stderr()) {
        Ok((writer, thread)) => (writer, Some(thread)),
        Err(error) => {
            eprintln!("taskgate: cannot start the log writer thread ({error}); logging is off");
            return LogGuard {
                writer_thread: None,
            };
        }
    };
    // Set once per process; a second `init` (only ever in tests) keeps the first queue's count.
    let _ = QUEUE.set(writer.clone());
    let styled = std::io::stderr().is_terminal();
    let sink = writer.clone();
    let registry = tracing_subscriber::registry().with(filter(default_filter));
    // `try_init` so that a process that already has a subscriber keeps it rather than panicking.
    let _ = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_ansi(styled)
                    .fmt_fields(PlainFields)
                    .event_format(PlainText::default()),
            )
            .try_init()
            .inspect(|()| {
                if !styled {
                    let _ = PLAIN_SINK.set(sink);
                }
            }),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .json()
                    .with_current_span(true)
                    .with_timer(Rfc3339),
            )
            .try_init(),
    };
    LogGuard { writer_thread }
}

/// `RUST_LOG` if it is set and valid, else `default_filter`. Directives of targets and levels
/// only (all but the rarest) become a [`Targets`] filter, which decides once per call site;
/// `EnvFilter`, needed only for span and field directives (`[span{field=value}]`), also looks
/// each span up under a lock every time a call's future is polled.
fn filter(default_filter: &str) -> Box<dyn Layer<Registry> + Send + Sync> {
    let directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|directives| EnvFilter::try_new(directives).is_ok())
        .unwrap_or_else(|| default_filter.to_owned());
    match directives.parse::<Targets>() {
        Ok(targets) => Box::new(targets),
        Err(_) => Box::new(EnvFilter::new(directives)),
    }
}

/// How many log lines were dropped because the queue was full; 0 before [`init`].
pub fn dropped_lines() -> u64 {
    QUEUE.get().map_or(0, queue::QueueWriter::dropped)
}

/// Reports drops in one line, logged like any other by the writer thread as soon as it takes a
/// batch again (it is not inside the subscriber then, so logging cannot deadlock; the queue it
/// has just emptied has room for the line).
fn report_drops(newly_dropped: u64, total_dropped: u64) {
    tracing::warn!(
        target: "taskgate::log",
        dropped = newly_dropped,
        total_dropped,
        "log lines were dropped because stderr was not read fast enough"
    );
}

// === impl LogGuard ===

impl LogGuard {
    /// Writes out what is queued, waiting at most `bound`: a reader that never reads again must
    /// not keep the process from exiting.
    pub fn flush_within(self, bound: Duration) {
        if let Some(writer_thread) = self.writer_thread {
            writer_thread.close_within(bound);
        }
    }
}

/// The text format's lines, written as `tracing-subscriber`'s full format writes them without
/// ANSI styles (`TIME LEVEL span{fields}: target: fields`), with plain string writes instead of
/// its per-part `write!` and styling. On a terminal the full format itself writes the line. A
/// test checks that both write the same bytes.
#[derive(Debug)]
struct PlainText {
    styled: Format<Full, Rfc3339>,
}

impl Default for PlainText {
    fn default() -> Self {
        PlainText {
            styled: format::format().with_timer(Rfc3339),
        }
    }
}

impl<S, N> FormatEvent<S, N> for PlainText
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
    N: for<'writer> FormatFields<'writer> + 'static,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return self.styled.format_event(context, writer, event);
        }
        // Events bridged from the `log` crate carry their real target in fields.
        let normalized = event.normalized_metadata();
        let metadata = normalized.as_ref().unwrap_or_else(|| event.metadata());
        with_line_buffer(|line| {
            write_head(
                line,
                metadata.level(),
                context.parent_span(),
                metadata.target(),
            )?;
            PlainVisitor::new(line).record_all(event)?;
            line.push('\n');
            writer.write_str(line)
        })
    }
}

/// Writes what comes before an event's fields: `TIME LEVEL span{fields}:…: target: `, for an
/// event in `leaf` and the spans above it.
fn write_head<'a, R: LookupSpan<'a>>(
    line: &mut String,
    level: &Level,
    leaf: Option<SpanRef<'a, R>>,
    target: &str,
) -> fmt::Result {
    let mut timestamp = [0_u8; 27];
    write_rfc3339(&mut timestamp, since_epoch());
    line.push_str(std::str::from_utf8(&timestamp).map_err(|_| fmt::Error)?);
    line.push_str(match *level {
        Level::TRACE => " TRACE ",
        Level::DEBUG => " DEBUG ",
        Level::INFO => "  INFO ",
        Level::WARN => "  WARN ",
        Level::ERROR => " ERROR ",
    });
    if let Some(leaf) = leaf {
        // Most lines are in one span: no list of the spans to reverse.
        if leaf.parent().is_none() {
            write_span(line, &leaf);
        } else {
            for span in leaf.scope().from_root() {
                write_span(line, &span);
            }
        }
        line.push(' ');
    }
    line.push_str(target);
    line.push_str(": ");
    Ok(())
}

/// Writes `name{fields}:`, the fields as the text format recorded them when the span was made.
fn write_span<'a, R: LookupSpan<'a>>(line: &mut String, span: &SpanRef<'a, R>) {
    line.push_str(span.metadata().name());
    let extensions = span.extensions();
    if let Some(fields) = extensions.get::<FormattedFields<PlainFields>>()
        && !fields.is_empty()
    {
        line.push('{');
        line.push_str(fields);
        line.push('}');
    }
    line.push(':');
}

/// Writes an INFO line for `target`, in the current span, with the fields `write_fields` adds:
/// the bytes the text format writes for the same event (a test checks both), without tracing's
/// per-field visitors or `core::fmt`. For the line every call writes. Returns `false`, writing
/// nothing, unless lines are unstyled plain text: the caller then logs the event instead.
/// Whether `target` is enabled is the caller's check.
pub(crate) fn write_plain(target: &str, write_fields: impl FnOnce(&mut PlainLine<'_>)) -> bool {
    let Some(sink) = PLAIN_SINK.get() else {
        return false;
    };
    let _ = with_line_buffer(|line| {
        plain_line(line, target, write_fields)?;
        // A full queue drops the line and counts it, as for any other line.
        sink.push(line.as_bytes());
        Ok(())
    });
    true
}

/// Builds the line [`write_plain`] writes.
fn plain_line(
    line: &mut String,
    target: &str,
    write_fields: impl FnOnce(&mut PlainLine<'_>),
) -> fmt::Result {
    tracing::dispatcher::get_default(|dispatch| {
        let registry = dispatch.downcast_ref::<Registry>();
        let current = dispatch.current_span();
        let leaf = registry
            .zip(current.id())
            .and_then(|(registry, id)| registry.span(id));
        write_head(line, &Level::INFO, leaf, target)
    })?;
    let mut fields = PlainLine(PlainVisitor::new(line));
    write_fields(&mut fields);
    fields.0.result?;
    line.push('\n');
    Ok(())
}

/// The fields of a line built by [`write_plain`], each written as the text format writes the
/// value it names.
pub(crate) struct PlainLine<'line>(PlainVisitor<'line>);

impl PlainLine<'_> {
    /// The message, as `tracing::info!(…, "text")` records it.
    pub(crate) fn message(&mut self, text: &str) {
        self.add("message", Value::Bare(text));
    }

    /// A `&str` field.
    pub(crate) fn str(&mut self, name: &str, value: &str) {
        self.add(name, Value::of_str(&value));
    }

    /// An integer field.
    pub(crate) fn u64(&mut self, name: &str, value: u64) {
        self.add(name, Value::Bare(itoa::Buffer::new().format(value)));
    }

    /// A float field.
    pub(crate) fn f64(&mut self, name: &str, value: f64) {
        self.add(name, Value::of_f64(&value, &mut zmij::Buffer::new()));
    }

    /// A field recorded with `%`, whose `Display` writes `text`.
    pub(crate) fn display(&mut self, name: &str, text: &str) {
        self.add(name, Value::Bare(text));
    }

    /// A socket address recorded with `%`.
    pub(crate) fn socket_addr(&mut self, name: &str, address: std::net::SocketAddr) {
        thread_local! {
            /// The last IPv4 peer written on this thread, as text: calls come in runs on one
            /// connection.
            static LAST_PEER: std::cell::Cell<(Option<std::net::SocketAddrV4>, [u8; IPV4_TEXT_MAX], usize)> =
                const { std::cell::Cell::new((None, [0; IPV4_TEXT_MAX], 0)) };
        }
        match address {
            std::net::SocketAddr::V4(address) => {
                let (last, mut text, mut length) = LAST_PEER.get();
                if last != Some(address) {
                    length = ipv4_text(address, &mut text).len();
                    LAST_PEER.set((Some(address), text, length));
                }
                // Only ASCII digits, dots and a colon were written.
                self.display(
                    name,
                    std::str::from_utf8(&text[..length]).unwrap_or_default(),
                );
            }
            address => self.add(name, Value::Debug(&tracing::field::display(address))),
        }
    }

    fn add(&mut self, name: &str, value: Value<'_>) {
        if self.0.result.is_ok() {
            self.0.result = self.0.write_field(name, value);
        }
    }
}

impl fmt::Debug for PlainLine<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("PlainLine")
    }
}

thread_local! {
    /// Where a thread builds its text lines: one reused buffer, written out with one call.
    static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Runs `write` on this thread's line buffer, emptied; on a fresh buffer if a line is already
/// being built here (a field's `Debug` that logs).
fn with_line_buffer(write: impl FnOnce(&mut String) -> fmt::Result) -> fmt::Result {
    LINE.with(|line| match line.try_borrow_mut() {
        Ok(mut line) => {
            line.clear();
            write(&mut line)
        }
        Err(_) => write(&mut String::new()),
    })
}

/// A socket address that displays as `SocketAddr` does, with plain writes for IPv4 (the common
/// peer) instead of `core::fmt` per octet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlainAddr(pub(crate) std::net::SocketAddr);

impl fmt::Display for PlainAddr {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            std::net::SocketAddr::V4(address) => {
                formatter.write_str(ipv4_text(address, &mut [0; IPV4_TEXT_MAX]))
            }
            address => fmt::Display::fmt(&address, formatter),
        }
    }
}

/// The longest IPv4 socket address text: `255.255.255.255:65535`.
const IPV4_TEXT_MAX: usize = 21;

/// `address` as `Display` writes it, with plain digit writes into `text`.
fn ipv4_text(address: std::net::SocketAddrV4, text: &mut [u8; IPV4_TEXT_MAX]) -> &str {
    let mut length = 0;
    for (index, octet) in address.ip().octets().into_iter().enumerate() {
        if index > 0 {
            text[length] = b'.';
            length += 1;
        }
        if octet >= 100 {
            text[length] = b'0' + octet / 100;
            length += 1;
        }
        if octet >= 10 {
            text[length] = b'0' + octet / 10 % 10;
            length += 1;
        }
        text[length] = b'0' + octet % 10;
        length += 1;
    }
    text[length] = b':';
    length += 1;
    let mut digits = itoa::Buffer::new();
    let port = digits.format(address.port()).as_bytes();
    text[length..length + port.len()].copy_from_slice(port);
    length += port.len();
    // Only ASCII digits, dots and a colon were written.
    std::str::from_utf8(&text[..length]).unwrap_or_default()
}

/// The text format's fields, written as `tracing-subscriber`'s default writes them without ANSI
/// styles, but without its per-field styling machinery, and without `core::fmt` for the values
/// every access line has: strings that need no escaping, integers and booleans. On a terminal
/// (where names are styled) every field goes to the default visitor. A test checks that both
/// write the same bytes.
#[derive(Debug)]
struct PlainFields;

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        if writer.has_ansi_escapes() {
            let mut visitor = DefaultVisitor::new(writer, true);
            fields.record(&mut visitor);
            return visitor.finish();
        }
        with_line_buffer(|text| {
            PlainVisitor::new(text).record_all(fields)?;
            writer.write_str(text)
        })
    }
}

/// Writes fields into a line being built, as the default visitor writes them.
struct PlainVisitor<'line> {
    line: &'line mut String,
    is_empty: bool,
    result: fmt::Result,
}

/// How a field's value is written.
enum Value<'a> {
    /// As it is: integers, booleans.
    Bare(&'a str),
    /// Between double quotes, as `Debug` writes a string that needs no escaping.
    Quoted(&'a str),
    /// With `Debug`.
    Debug(&'a dyn fmt::Debug),
}

impl<'line> PlainVisitor<'line> {
    fn new(line: &'line mut String) -> Self {
        PlainVisitor {
            line,
            is_empty: true,
            result: Ok(()),
        }
    }

    /// Writes every field of `fields`.
    fn record_all(mut self, fields: impl RecordFields) -> fmt::Result {
        fields.record(&mut self);
        self.result
    }

    /// Writes one field as the default visitor does: `name=value`, or the value alone for the
    /// message, after a space unless it is the first.
    fn write(&mut self, field: &Field, value: Value<'_>) {
        let name = field.name();
        // `log` records bridged into tracing carry their metadata as fields, already printed.
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        self.result = self.write_field(name.strip_prefix("r#").unwrap_or(name), value);
    }

    fn write_field(&mut self, name: &str, value: Value<'_>) -> fmt::Result {
        if !std::mem::replace(&mut self.is_empty, false) {
            self.line.push(' ');
        }
        if name != "message" {
            self.line.push_str(name);
            self.line.push('=');
        }
        match value {
            Value::Bare(text) => self.line.push_str(text),
            Value::Quoted(text) => {
                self.line.push('"');
                self.line.push_str(text);
                self.line.push('"');
            }
            Value::Debug(value) => {
                return fmt::Write::write_fmt(self.line, format_args!("{value:?}"));
            }
        }
        Ok(())
    }
}

impl<'a> Value<'a> {
    /// A string field's value: between quotes, or escaped as `Debug` does.
    fn of_str(value: &'a &'a str) -> Self {
        // Exactly the strings whose `Debug` form is the text between quotes.
        let needs_no_escape = value
            .bytes()
            .all(|byte| (b' '..=b'~').contains(&byte) && byte != b'"' && byte != b'\\');
        if needs_no_escape {
            Value::Quoted(value)
        } else {
            Value::Debug(value)
        }
    }

    /// A float field's value, written into `buffer` where `Debug` would write the same digits.
    fn of_f64(value: &'a f64, buffer: &'a mut zmij::Buffer) -> Self {
        // Outside this range `Debug` switches to exponents written differently.
        if *value == 0.0 || (1e-4..1e15).contains(&value.abs()) {
            Value::Bare(buffer.format_finite(*value))
        } else {
            Value::Debug(value)
        }
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, Value::Bare(value));
        } else {
            self.write(field, Value::of_str(&value));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.write(field, Value::Bare(itoa::Buffer::new().format(value)));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.write(field, Value::Bare(itoa::Buffer::new().format(value)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.write(field, Value::Bare(if value { "true" } else { "false" }));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.write(field, Value::of_f64(&value, &mut zmij::Buffer::new()));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_err() {
            return;
        }
        // Rare, and the default writes the error's sources too.
        let mut visitor = DefaultVisitor::new(Writer::new(self.line), self.is_empty);
        visitor.record_error(field, value);
        self.result = visitor.finish();
        self.is_empty = false;
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, Value::Debug(value));
    }
}

/// UTC timestamps with microseconds (`2026-11-29T02:54:14.211684Z`), the format the default
/// timer writes, with plain digit writes instead of `core::fmt` padding.
#[derive(Debug)]
struct Rfc3339;

impl FormatTime for Rfc3339 {
    fn format_time(&self, writer: &mut Writer<'_>) -> fmt::Result {
        let mut text = [0_u8; 27];
        write_rfc3339(&mut text, since_epoch());
        writer.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

/// Writes a time since the Unix epoch, for years 1970 to 9999.
fn write_rfc3339(text: &mut [u8; 27], since_epoch: Duration) {
    thread_local! {
        /// The last second written on this thread, and its text up to the fraction: lines come
        /// many to a second.
        static LAST_SECOND: std::cell::Cell<Option<(u64, [u8; 27])>> =
            const { std::cell::Cell::new(None) };
    }
    let seconds = since_epoch.as_secs();
    match LAST_SECOND.get() {
        Some((second, written)) if second == seconds => *text = written,
        _ => {
            write_second(text, seconds);
            LAST_SECOND.set(Some((seconds, *text)));
        }
    }
    let mut micros = since_epoch.subsec_micros();
    for digit in text[20..26].iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    text[26] = b'Z';
}

/// Writes `YYYY-MM-DDTHH:MM:SS.` for a second since the Unix epoch.
fn write_second(text: &mut [u8; 27], seconds: u64) {
    let (year, month, day) = civil_from_days(seconds / 86_400);
    let second_of_day = seconds % 86_400;
    let mut position = 0;
    let fields = [
        (year, 4, b'-'),
        (month, 2, b'-'),
        (day, 2, b'T'),
        (second_of_day / 3600, 2, b':'),
        (second_of_day / 60 % 60, 2, b':'),
        (second_of_day % 60, 2, b'.'),
    ];
    for (mut value, width, after) in fields {
        for index in (position..position + width).rev() {
            text[index] = b'0' + (value % 10) as u8;
            value /= 10;
        }
        text[position + width] = after;
        position += width + 1;
    }
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// For tests elsewhere: the lines the plain text format writes for the events `record` logs, and
/// the lines `record` returns, each without its time.
#[cfg(test)]
pub(crate) fn plain_lines_without_time(
    record: impl FnOnce() -> String,
) -> (Vec<String>, Vec<String>) {
    let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = {
        let buffer = buffer.clone();
        move || tests::SharedBuffer(buffer.clone())
    };
    let subscriber = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .fmt_fields(PlainFields)
        .event_format(PlainText::default())
        .finish();
    let returned = tracing::subscriber::with_default(subscriber, record);
    let events = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
    let without_time = |text: &str| {
        text.lines()
            .map(|line| line.get(27..).unwrap_or(line).to_owned())
            .collect()
    };
    (without_time(&events), without_time(&returned))
}

/// For tests elsewhere: the line [`write_plain`] writes.
#[cfg(test)]
pub(crate) fn plain_line_for_test(
    target: &str,
    write_fields: impl FnOnce(&mut PlainLine<'_>),
) -> String {
    let mut line = String::new();
    plain_line(&mut line, target, write_fields).unwrap();
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rfc3339(since_epoch: Duration) -> String {
        let mut text = [0_u8; 27];
        write_rfc3339(&mut text, since_epoch);
        String::from_utf8(text.to_vec()).unwrap()
    }

    #[test]
    fn timestamps_match_the_default_timer() {
        let check = |seconds: u64, micros: u64, expected: &str| {
            let since_epoch = Duration::from_secs(seconds) + Duration::from_micros(micros);
            assert_eq!(rfc3339(since_epoch), expected, "{seconds}");
        };
        check(0, 0, "1970-01-01T00:00:00.000000Z");
        check(951_782_400, 7, "2000-02-29T00:00:00.000007Z");
        check(1_709_251_199, 999_999, "2024-02-29T23:59:59.999999Z");
        check(1_795_920_854, 211_684, "2026-11-29T02:54:14.211684Z");
        // The same second again, from the thread's last second.
        check(1_795_920_854, 5, "2026-11-29T02:54:14.000005Z");
        check(1_795_920_855, 5, "2026-11-29T02:54:15.000005Z");
        check(253_402_300_799, 0, "9999-12-31T23:59:59.000000Z");
    }

    /// What `record` logs, formatted by `PlainText` and `PlainFields` when `plain`, else by
    /// tracing-subscriber's own full format; no ANSI styles either way.
    fn capture(plain: bool, record: impl Fn()) -> String {
        let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = {
            let buffer = buffer.clone();
            move || SharedBuffer(buffer.clone())
        };
        let builder = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false);
        if plain {
            let subscriber = builder
                .fmt_fields(PlainFields)
                .event_format(PlainText::default())
                .finish();
            tracing::subscriber::with_default(subscriber, record);
        } else {
            tracing::subscriber::with_default(builder.finish(), record);
        }
        String::from_utf8(buffer.lock().unwrap().clone()).unwrap()
    }

    /// The lines `record` logs must be the same both ways but for the time, which is checked for
    /// its shape.
    fn same_as_default(record: impl Fn()) {
        let lines = |plain: bool| {
            capture(plain, &record)
                .lines()
                .map(|line| {
                    let (time, rest) = line.split_at(27);
                    assert!(time.starts_with("20") && time.ends_with('Z'), "{line}");
                    assert_eq!(&time[10..11], "T", "{line}");
                    rest.to_owned()
                })
                .collect::<Vec<_>>()
        };
        let (plain, default) = (lines(true), lines(false));
        assert!(!plain.is_empty());
        assert_eq!(plain, default);
    }

    #[test]
    fn floats_are_written_as_debug_writes_them() {
        // Durations in milliseconds, as the access line has them, and the edges of the range.
        let mut state: u64 = 88_172_645_463_325_252;
        let mut values = vec![0.0, 1.0, 1e-4, 0.1 + 0.2, 999_999_999_999_999.9, -8.574963];
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            values.push(Duration::from_nanos(state % 100_000_000_000_000).as_secs_f64() * 1000.0);
        }
        let text = capture(true, || {
            for value in &values {
                tracing::info!(ms = *value);
            }
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), values.len());
        for (line, value) in lines.iter().zip(&values) {
            assert!(line.ends_with(&format!(" ms={value:?}")), "{line}");
        }
    }

    #[test]
    fn plain_addresses_display_as_socket_addresses() {
        for address in [
            "127.0.0.1:54342",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "[::1]:8080",
        ] {
            let address: std::net::SocketAddr = address.parse().unwrap();
            assert_eq!(PlainAddr(address).to_string(), address.to_string());
        }
    }

    pub(super) struct SharedBuffer(pub(super) std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().write(bytes)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// For target-and-level directives, the cheaper filter decides as `EnvFilter` does.
    #[test]
    fn targets_filter_as_env_filter_does() {
        fn decisions(filter: Box<dyn Layer<Registry> + Send + Sync>) -> Vec<bool> {
            let subscriber = tracing_subscriber::registry().with(filter);
            tracing::subscriber::with_default(subscriber, || {
                vec![
                    tracing::enabled!(target: "taskgate::access", Level::INFO),
                    tracing::enabled!(target: "taskgate::access", Level::DEBUG),
                    tracing::enabled!(target: "taskgate::simulator", Level::DEBUG),
                    tracing::enabled!(target: "taskgate::simulator::http", Level::TRACE),
                    tracing::enabled!(target: "taskgate", Level::TRACE),
                    tracing::enabled!(target: "hyper::proto::h1", Level::DEBUG),
                    tracing::enabled!(target: "h2", Level::WARN),
                    tracing::enabled!(target: "taskgatex", Level::INFO),
                ]
            })
        }
        for directives in [
            "info",
            "warn,taskgate::access=info",
            "info,taskgate::simulator=debug",
            "taskgate",
            "taskgate=trace,hyper=off",
            "off",
            "error,taskgate::simulator::http=trace",
            "DEBUG",
        ] {
            let targets: Targets = directives.parse().unwrap();
            assert_eq!(
                decisions(Box::new(targets)),
                decisions(Box::new(EnvFilter::new(directives))),
                "{directives}"
            );
        }
        assert!(
            "info,[call{request_id=x}]=debug"
                .parse::<Targets>()
                .is_err()
        );
    }

    #[test]
    fn plain_lines_are_what_the_default_format_writes() {
        same_as_default(|| {
            tracing::info!(
                method = "case_extract",
                port_id = 4_u32,
                fault_code = Some(1148_u32),
                missing = None::<u32>,
                negative = -3_i64,
                flag = true,
                ms = 0.25_f64,
                tiny = 1e-5_f64,
                huge = 1e16_f64,
                not_a_number = f64::NAN,
                negative_ms = -12.482190000000001_f64,
                quoted = "say \"hi\"",
                tab = "a\tb",
                unicode = "grüße",
                display = %"shown",
                "call"
            );
        });
        same_as_default(|| {
            let span = tracing::info_span!("call", request_id = "r-1", path = "/x");
            let _entered = span.enter();
            tracing::warn!(r#type = "raw", error = "boom", "message with {} args", 2);
        });
        same_as_default(|| {
            let outer = tracing::info_span!("outer");
            let _outer = outer.enter();
            let inner = tracing::debug_span!("inner", depth = 2_u8);
            let _inner = inner.enter();
            tracing::error!(target: "elsewhere", "nested");
            tracing::trace!("filtered out by the default level");
        });
        same_as_default(|| {
            let error = std::io::Error::other("disk on fire");
            tracing::error!(
                cause = &error as &(dyn std::error::Error + 'static),
                peer = %std::net::SocketAddr::from(([127, 0, 0, 1], 5)),
                "failed"
            );
        });
    }
}
