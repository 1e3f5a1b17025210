//! The one log line format of every binary, text or JSON, with the W3C trace and span ids of the
//! request a line belongs to. The JSON fields are a contract (docs/OPERATIONS.md, "Logs"):
//! `timestamp`, `level`, `target`, `message`, then `trace_id` and `span_id` when the line was
//! written while handling a request, then the event's own fields (`partner`, `reason`,
//! `api_invoker_id`, ...) at the top level. A field whose name would shadow one of those is
//! written as `field.<name>`. Text lines hold the same, `trace_id=` and `span_id=` last.

use std::fmt;

use opentelemetry::trace::TraceContextExt as _;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime as _;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::process::LogFormat;

/// Top-level names of a JSON line that an event's fields may not take.
const RESERVED: [&str; 6] = [
    "timestamp",
    "level",
    "target",
    "message",
    "trace_id",
    "span_id",
];

/// Formats events as log lines (see the module comment).
#[derive(Clone, Copy, Debug)]
pub struct LogLine {
    json: bool,
}

impl LogLine {
    /// Lines in `format`.
    pub fn new(format: LogFormat) -> Self {
        Self {
            json: format == LogFormat::Json,
        }
    }
}

/// One field's value as recorded.
enum Value {
    Str(String),
    I64(i64),
    U64(u64),
    F64(f64),
    Bool(bool),
}

/// An event's message and fields, in the order they were written.
#[derive(Default)]
struct Fields {
    message: String,
    log_target: Option<String>,
    fields: Vec<(&'static str, Value)>,
}

impl Fields {
    fn push(&mut self, field: &Field, v: Value) {
        let name = field.name();
        match (name, v) {
            ("message", Value::Str(s)) => self.message = s,
            ("log.target", Value::Str(s)) => self.log_target = Some(s),
            // What the `log` bridge adds is noise in a line.
            (n, _) if n.starts_with("log.") => {}
            (n, v) => self.fields.push((n, v)),
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, Value::Str(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, Value::I64(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, Value::U64(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.push(field, Value::F64(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, Value::Bool(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.push(field, Value::Str(crate::status::error_chain(value)));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.push(field, Value::Str(format!("{value:?}")));
    }
}

fn json_str(w: &mut Writer<'_>, s: &str) -> fmt::Result {
    w.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' => w.write_str("\\\"")?,
            '\\' => w.write_str("\\\\")?,
            '\n' => w.write_str("\\n")?,
            '\r' => w.write_str("\\r")?,
            '\t' => w.write_str("\\t")?,
            c if (c as u32) < 0x20 || c == '\u{7f}' => write!(w, "\\u{:04x}", c as u32)?,
            c => w.write_char(c)?,
        }
    }
    w.write_char('"')
}

fn json_value(w: &mut Writer<'_>, v: &Value) -> fmt::Result {
    match v {
        Value::Str(s) => json_str(w, s),
        Value::I64(n) => write!(w, "{n}"),
        Value::U64(n) => write!(w, "{n}"),
        Value::F64(n) if n.is_finite() => write!(w, "{n}"),
        Value::F64(n) => json_str(w, &n.to_string()),
        Value::Bool(b) => write!(w, "{b}"),
    }
}

/// Text values as a person reads them; an ESC byte a peer smuggled into a value is escaped, so
/// a log file holds no terminal control sequences.
fn text_value(w: &mut Writer<'_>, v: &Value) -> fmt::Result {
    match v {
        Value::Str(s) if s.contains(char::is_control) => write!(w, "{s:?}"),
        Value::Str(s) => w.write_str(s),
        Value::I64(n) => write!(w, "{n}"),
        Value::U64(n) => write!(w, "{n}"),
        Value::F64(n) => write!(w, "{n}"),
        Value::Bool(b) => write!(w, "{b}"),
    }
}

fn level_colour(level: Level) -> &'static str {
    match level {
        Level::ERROR => "\x1b[31m",
        Level::WARN => "\x1b[33m",
        Level::INFO => "\x1b[32m",
        Level::DEBUG => "\x1b[34m",
        Level::TRACE => "\x1b[35m",
    }
}

impl<S, N> FormatEvent<S, N> for LogLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // The span entered last (its OTel context is attached while it is entered).
        let cx = opentelemetry::Context::current();
        let sc = cx.span().span_context().clone();
        let ids = sc.is_valid().then(|| (sc.trace_id(), sc.span_id()));
        let mut f = Fields::default();
        event.record(&mut f);
        let meta = event.metadata();
        let target = f.log_target.as_deref().unwrap_or(meta.target());
        let mut ts = String::with_capacity(32);
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut ts))?;
        if self.json {
            w.write_str("{\"timestamp\":")?;
            json_str(&mut w, &ts)?;
            w.write_str(",\"level\":")?;
            json_str(&mut w, meta.level().as_str())?;
            w.write_str(",\"target\":")?;
            json_str(&mut w, target)?;
            w.write_str(",\"message\":")?;
            json_str(&mut w, &f.message)?;
            if let Some((t, s)) = ids {
                write!(w, ",\"trace_id\":\"{t}\",\"span_id\":\"{s}\"")?;
            }
            for (name, v) in &f.fields {
                w.write_char(',')?;
                if RESERVED.contains(name) {
                    json_str(&mut w, &format!("field.{name}"))?;
                } else {
                    json_str(&mut w, name)?;
                }
                w.write_char(':')?;
                json_value(&mut w, v)?;
            }
            return w.write_str("}\n");
        }
        let level = *meta.level();
        if w.has_ansi_escapes() {
            write!(
                w,
                "{ts} {}{level:>5}\x1b[0m {target}: ",
                level_colour(level)
            )?;
        } else {
            write!(w, "{ts} {level:>5} {target}: ")?;
        }
        text_value(&mut w, &Value::Str(f.message))?;
        for (name, v) in &f.fields {
            write!(w, " {name}=")?;
            text_value(&mut w, v)?;
        }
        if let Some((t, s)) = ids {
            write!(w, " trace_id={t} span_id={s}")?;
        }
        w.write_char('\n')
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(format: LogFormat, f: impl FnOnce()) -> String {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .event_format(LogLine::new(format))
            .finish();
        tracing::subscriber::with_default(sub, f);
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn json_lines_hold_the_documented_fields_at_the_top_level() {
        let out = lines(LogFormat::Json, || {
            tracing::info!(partner = "operator-b.test", reason = %"UNKNOWN_INVOKER", n = 3u64, level = "shadow", "refused \"x\"\n");
        });
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "refused \"x\"\n");
        assert_eq!(v["partner"], "operator-b.test");
        assert_eq!(v["reason"], "UNKNOWN_INVOKER");
        assert_eq!(v["n"], 3);
        assert_eq!(v["field.level"], "shadow");
        assert!(v["target"].as_str().unwrap().contains("telemetry"));
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
        // No request: no trace id.
        assert!(v.get("trace_id").is_none());
    }

    #[test]
    fn text_lines_escape_control_characters() {
        let out = lines(LogFormat::Text, || {
            tracing::warn!(peer = "a\x1b[31mb", "said");
        });
        assert!(!out.contains('\x1b'), "{out:?}");
        assert!(out.contains(" WARN "), "{out}");
        assert!(out.contains("said peer=\"a\\u{1b}[31mb\""), "{out}");
    }
}
