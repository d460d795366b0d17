//! One line for an error and its causes, as log lines and statuses show a failed connection:
//! the HTTP client's own layers, which say only where an error arose, give way to their cause.

/// An error and its causes on one line, for messages. The HTTP client's own layers say only
/// where an error arose ("error sending request", "client error (Connect)"), so such a layer with
/// a cause below it gives just that cause.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut next = Some(error);
    while let Some(cause) = next {
        next = cause.source();
        let layer = cause.is::<reqwest::Error>() || cause.is::<hyper_util::client::legacy::Error>();
        if layer && next.is_some() {
            continue;
        }
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause_text);
        }
    }
    text
}
