//! The process-wide `tracing` subscriber: `RUST_LOG` filtering (default
//! `info`), JSON lines where a machine reads stdout, human text where a person
//! does.

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// The environment variable that forces a log format: `json` or `text`.
const FORMAT_VAR: &str = "TALLYMAN_LOG_FORMAT";

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Human-readable text, coloured on a terminal.
    Text,
}

impl LogFormat {
    /// `TALLYMAN_LOG_FORMAT=json|text` wins; otherwise JSON unless stdout is a
    /// terminal. Returns the format and, when the variable held something
    /// else, that value (to be reported once logging works).
    pub fn detect(var: Option<&str>, stdout_is_terminal: bool) -> (Self, Option<String>) {
        let by_terminal = if stdout_is_terminal {
            LogFormat::Text
        } else {
            LogFormat::Json
        };
        match var.map(str::trim) {
            None | Some("") => (by_terminal, None),
            Some(v) if v.eq_ignore_ascii_case("json") => (LogFormat::Json, None),
            Some(v) if v.eq_ignore_ascii_case("text") => (LogFormat::Text, None),
            Some(v) => (by_terminal, Some(v.to_string())),
        }
    }
}

/// Installs the global subscriber for `component` (`worker`, `gateway`,
/// `operator`, …). JSON lines carry `"component"` so one log index can hold
/// every process.
///
/// Only the first call in a process installs anything; later calls (tests
/// that each set up logging) are no-ops.
pub fn init_tracing(component: &str) {
    let stdout_is_terminal = std::io::stdout().is_terminal();
    let var = std::env::var(FORMAT_VAR).ok();
    let (format, unknown) = LogFormat::detect(var.as_deref(), stdout_is_terminal);
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy();
    let layer = match format {
        LogFormat::Json => json_layer(component, std::io::stdout).boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(stdout_is_terminal)
            .boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init()
        .is_ok();
    if installed && let Some(value) = unknown {
        tracing::warn!(
            variable = FORMAT_VAR,
            value,
            "unknown log format, expected json or text; chose by terminal"
        );
    }
}

/// The JSON layer: event fields flattened to the top level, the fields of
/// every enclosing span under `spans` (the worker's instance span, a debug
/// span, carries namespace, workflow, key, event id and inputs).
fn json_layer<S, W>(component: &str, writer: W) -> impl Layer<S> + Send + Sync + 'static
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let inner = tracing_subscriber::fmt::format()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(true);
    let prefix = format!("{{\"component\":{},", serde_json::Value::from(component));
    tracing_subscriber::fmt::layer()
        .json()
        .event_format(WithComponent { prefix, inner })
        .with_writer(writer)
}

/// Prepends `"component":"…"` to each JSON object the inner format writes.
struct WithComponent<F> {
    /// `{"component":"worker",`, escaped once.
    prefix: String,
    inner: F,
}

impl<S, N, F> FormatEvent<S, N> for WithComponent<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // A Debug impl that logs re-enters here; it gets a fresh buffer.
        LINE.with(|cell| match cell.try_borrow_mut() {
            Ok(mut line) => self.write_prefixed(&mut line, ctx, &mut writer, event),
            Err(_) => self.write_prefixed(&mut String::new(), ctx, &mut writer, event),
        })
    }
}

impl<F> WithComponent<F> {
    fn write_prefixed<S, N>(
        &self,
        line: &mut String,
        ctx: &FmtContext<'_, S, N>,
        writer: &mut Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
        F: FormatEvent<S, N>,
    {
        line.clear();
        self.inner.format_event(ctx, Writer::new(line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => {
                writer.write_str(&self.prefix)?;
                writer.write_str(rest)
            }
            None => writer.write_str(line),
        }
    }
}

thread_local! {
    /// Reused per thread so a log line costs no allocation of its own.
    static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn the_variable_wins_over_the_terminal() {
        assert_eq!(
            LogFormat::detect(Some("json"), true),
            (LogFormat::Json, None)
        );
        assert_eq!(
            LogFormat::detect(Some("TEXT"), false),
            (LogFormat::Text, None)
        );
    }

    #[test]
    fn without_the_variable_a_terminal_gets_text_and_a_pipe_json() {
        assert_eq!(LogFormat::detect(None, true), (LogFormat::Text, None));
        assert_eq!(LogFormat::detect(None, false), (LogFormat::Json, None));
        assert_eq!(LogFormat::detect(Some(""), false), (LogFormat::Json, None));
    }

    #[test]
    fn an_unknown_value_is_returned_for_a_warning() {
        assert_eq!(
            LogFormat::detect(Some("yaml"), false),
            (LogFormat::Json, Some("yaml".to_string()))
        );
    }

    #[test]
    fn init_twice_is_harmless() {
        init_tracing("test");
        init_tracing("test");
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_the_component_event_fields_and_span_fields() {
        let buffer = Buffer::default();
        let sink = buffer.clone();
        let subscriber =
            tracing_subscriber::registry().with(json_layer("worker", move || sink.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("instance", workflow = "shipment-to-invoice");
            let _entered = span.enter();
            tracing::info!(step = "invoice", "step \"done\"");
        });

        let out = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(line["component"], "worker");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["message"], "step \"done\"");
        assert_eq!(line["step"], "invoice");
        assert_eq!(line["spans"][0]["workflow"], "shipment-to-invoice");
    }
}
