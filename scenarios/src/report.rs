//! `report.html`: a picture of one scenario run, written by `capif scenario run` next to
//! `report.json`. One self-contained page (inline CSS and SVG; no script, no font, no image
//! from anywhere, and a Content-Security-Policy that forbids fetching any), so it opens the same
//! from a CI artifact, a mail or a laptop without network.
//!
//! It holds the run's title, the steps table of [`crate::runner::Report`], and for every
//! cross-domain step (an invoker of one domain at an AEF of another) a sequence diagram drawn
//! from the spans [`crate::otlp::OtlpReceiver`] collected for that step: lanes invoker, AEF,
//! CCF-A, gateway-A, gateway-B, CCF-B ([`lane_of`]: A is the AEF's domain, B the invoker's
//! home), one arrow per hop ([`hops`]: a client span answered by a server span in another lane,
//! or a parent and child span of different lanes) with its duration, and refusals in red with
//! their reason.
//!
//! A step's spans are those of its trace (the runner's root span carries `capif.step` and its
//! trace id is in the step's row); a trace without a step's root is placed in the step whose
//! time window holds its first span (a gateway configured to start a new trace at its partner
//! boundary, an outbox delivery). A step for which nothing arrived says so.
//!
//! Every piece of text that came from a file, a span or an error goes through [`escape`].

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use crate::otlp::{RUNNER_SERVICE, ReceivedSpan, SpanKind, by_trace};
use crate::runner::{Report, StepReport, code_name};

/// Hops drawn per step at most; the rest are counted under the diagram.
pub const MAX_HOPS_DRAWN: usize = 60;

/// A lane of a sequence diagram.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lane {
    /// The `capif` process (its invoker client and the runner).
    Invoker,
    /// The AEF, in domain A.
    Aef,
    /// Domain A's CCF (the AEF's).
    CcfA,
    /// Domain A's gateway.
    GatewayA,
    /// Domain B's gateway (the invoker's home).
    GatewayB,
    /// Domain B's CCF.
    CcfB,
    /// Anything else (a third domain, another AEF): `service (namespace)`.
    Other(String),
}

/// The six lanes every cross-domain diagram shows, left to right in the order a key travels.
pub const LANES: [Lane; 6] = [
    Lane::Invoker,
    Lane::Aef,
    Lane::CcfA,
    Lane::GatewayA,
    Lane::GatewayB,
    Lane::CcfB,
];

impl Lane {
    /// The `data-lane` value.
    pub fn id(&self) -> &'static str {
        match self {
            Lane::Invoker => "invoker",
            Lane::Aef => "aef",
            Lane::CcfA => "ccf-a",
            Lane::GatewayA => "gateway-a",
            Lane::GatewayB => "gateway-b",
            Lane::CcfB => "ccf-b",
            Lane::Other(_) => "other",
        }
    }

    /// The lane's heading.
    pub fn title(&self) -> String {
        match self {
            Lane::Invoker => "invoker".into(),
            Lane::Aef => "AEF".into(),
            Lane::CcfA => "CCF-A".into(),
            Lane::GatewayA => "gateway-A".into(),
            Lane::GatewayB => "gateway-B".into(),
            Lane::CcfB => "CCF-B".into(),
            Lane::Other(label) => label.clone(),
        }
    }
}

/// The lane of a span's process, from its resource's `service.name` and `service.namespace`:
/// `aef_domain` is A, `home_domain` is B. An AEF's spans are its own lane only in A (or when it
/// did not say its domain); a component of any other domain gets a lane of its own.
pub fn lane_of(service: &str, namespace: &str, aef_domain: &str, home_domain: &str) -> Lane {
    match service {
        RUNNER_SERVICE => Lane::Invoker,
        "aef-stub" if namespace == aef_domain || namespace.is_empty() => Lane::Aef,
        "ccf" if namespace == aef_domain => Lane::CcfA,
        "ccf" if namespace == home_domain => Lane::CcfB,
        "capif-gateway" if namespace == aef_domain => Lane::GatewayA,
        "capif-gateway" if namespace == home_domain => Lane::GatewayB,
        _ if namespace.is_empty() => Lane::Other(service.to_string()),
        _ => Lane::Other(format!("{service} ({namespace})")),
    }
}

/// Who answers a call to `rpc_service` made from `caller`, for a client span whose server span
/// did not arrive (a refused handshake, a component that exports nothing, a SIGKILL).
fn callee_of(caller: &Lane, rpc_service: &str) -> Option<Lane> {
    let service = rpc_service.rsplit('.').next().unwrap_or(rpc_service);
    Some(match (caller, service) {
        (Lane::Invoker, "AefSecurity" | "DemoApi") => Lane::Aef,
        (Lane::CcfA, "AefSecurity") => Lane::Aef,
        (Lane::Invoker, "Security" | "InvokerManagement") => Lane::CcfB,
        (Lane::Aef, "Security") => Lane::CcfA,
        (Lane::CcfA, "Gateway") => Lane::GatewayA,
        (Lane::CcfB, "Gateway") => Lane::GatewayB,
        (Lane::GatewayA, "Interconnect") => Lane::GatewayB,
        (Lane::GatewayB, "Interconnect") => Lane::GatewayA,
        (Lane::GatewayA, "Federation") => Lane::CcfA,
        (Lane::GatewayB, "Federation") => Lane::CcfB,
        _ => return None,
    })
}

/// One hop: a call from one lane to another (or a self-call when its other end is unknown).
#[derive(Clone, Debug, PartialEq)]
pub struct Hop {
    /// The caller's lane.
    pub from: Lane,
    /// The callee's lane (`from` again when it is unknown).
    pub to: Lane,
    /// The span's name (`capif.v1.Gateway/FetchSecurityInformation`).
    pub name: String,
    /// Start and end, Unix ns: the caller's view when its client span arrived.
    pub start_ns: u64,
    /// See `start_ns`.
    pub end_ns: u64,
    /// The reason (or code) of a refusal.
    pub refusal: Option<String>,
    /// What is missing, when one end was not traced.
    pub note: Option<String>,
}

impl Hop {
    /// Duration in nanoseconds.
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }
}

/// Why a span failed, in the words the runner's table uses: the `capif.reason`, else the gRPC
/// code's name, else the status message.
fn refusal_of(s: &ReceivedSpan) -> Option<String> {
    if !s.failed() {
        return None;
    }
    if let Some(r) = &s.reason {
        return Some(r.clone());
    }
    if let Some(c) = s.grpc_status_code.filter(|c| *c != 0) {
        return Some(code_name(tonic::Code::from_i32(
            i32::try_from(c).unwrap_or(2),
        )));
    }
    Some(if s.status_message.is_empty() {
        "ERROR".into()
    } else {
        s.status_message.clone()
    })
}

fn rpc_service_of(s: &ReceivedSpan) -> String {
    s.rpc_service
        .clone()
        .unwrap_or_else(|| s.name.split('/').next().unwrap_or_default().to_string())
}

/// The hops of one step's spans, in start order. A span's caller is its parent, or else the span
/// it links to. A server span answering a client span of another lane is one hop timed by the
/// client (the round trip its caller saw); a span whose
/// parent is in another lane without a client span is one hop timed by itself; spans within one
/// lane are not hops. A client span that no server span answered is a hop to the lane that
/// serves its service (when known), and a server span whose caller did not arrive is a
/// self-call on its lane; both carry a note.
pub fn hops(spans: &[&ReceivedSpan], lane: impl Fn(&ReceivedSpan) -> Lane) -> Vec<Hop> {
    let by_id: HashMap<([u8; 16], [u8; 8]), &ReceivedSpan> = spans
        .iter()
        .map(|s| ((s.trace_id, s.span_id), *s))
        .collect();
    let mut answered = std::collections::HashSet::new();
    let mut out = Vec::new();
    for s in spans {
        let me = lane(s);
        // A span that began a new trace (at a partner boundary) names its caller by a link.
        let parent = s
            .parent_span_id
            .and_then(|p| by_id.get(&(s.trace_id, p)))
            .or_else(|| s.links.iter().find_map(|l| by_id.get(l)));
        match parent {
            Some(p) if lane(p) != me => {
                let (start_ns, end_ns, refusal) = if p.kind == SpanKind::Client {
                    answered.insert(p.span_id);
                    (
                        p.start_unix_ns,
                        p.end_unix_ns,
                        refusal_of(s).or_else(|| refusal_of(p)),
                    )
                } else {
                    (s.start_unix_ns, s.end_unix_ns, refusal_of(s))
                };
                out.push(Hop {
                    from: lane(p),
                    to: me,
                    name: s.name.clone(),
                    start_ns,
                    end_ns,
                    refusal,
                    note: None,
                });
            }
            None if s.kind == SpanKind::Server => out.push(Hop {
                from: me.clone(),
                to: me,
                name: s.name.clone(),
                start_ns: s.start_unix_ns,
                end_ns: s.end_unix_ns,
                refusal: refusal_of(s),
                note: Some("caller not traced".into()),
            }),
            _ => {}
        }
    }
    for s in spans {
        if s.kind != SpanKind::Client || answered.contains(&s.span_id) {
            continue;
        }
        // A client span answered by a same-lane server span is internal, not unanswered.
        let answered_here = spans.iter().any(|c| {
            c.trace_id == s.trace_id && c.parent_span_id == Some(s.span_id) && lane(c) == lane(s)
        });
        if answered_here {
            continue;
        }
        let me = lane(s);
        let to = callee_of(&me, &rpc_service_of(s));
        out.push(Hop {
            from: me.clone(),
            to: to.clone().unwrap_or(me),
            name: s.name.clone(),
            start_ns: s.start_unix_ns,
            end_ns: s.end_unix_ns,
            refusal: refusal_of(s),
            note: Some(if to.is_some() {
                "no span from the callee".into()
            } else {
                "callee unknown, no span from it".into()
            }),
        });
    }
    out.sort_by_key(|h| (h.start_ns, std::cmp::Reverse(h.end_ns)));
    out
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters have no business in a report; keep tabs and newlines.
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// A duration for people: µs below a millisecond, ms below a second, else s.
pub fn duration_text(ns: u64) -> String {
    if ns < 1_000_000 {
        format!("{} µs", ns / 1_000)
    } else if ns < 1_000_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else {
        format!("{:.2} s", ns as f64 / 1e9)
    }
}

/// "1 span", "2 spans".
fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// Each step's spans (by index into `steps`): its own trace's, and those of traces without a
/// step root whose first span started within its window. The count of spans placed nowhere
/// comes second (a component's start-up, background work between steps).
pub fn spans_per_step<'a>(
    steps: &[StepReport],
    spans: &'a [ReceivedSpan],
) -> (Vec<Vec<&'a ReceivedSpan>>, usize) {
    let mut owner: HashMap<[u8; 16], usize> = HashMap::new();
    for (i, st) in steps.iter().enumerate() {
        if let Ok(id) = <[u8; 16]>::try_from(hex::decode(&st.trace_id).unwrap_or_default()) {
            owner.insert(id, i);
        }
    }
    for s in spans.iter().filter(|s| s.service_name == RUNNER_SERVICE) {
        if let Some(i) = s
            .step
            .and_then(|n| steps.iter().position(|st| st.step as i64 == n))
        {
            owner.entry(s.trace_id).or_insert(i);
        }
    }
    let mut per_step = vec![Vec::new(); steps.len()];
    let mut unplaced = 0;
    for (trace, members) in by_trace(spans) {
        let first = members.iter().map(|s| s.start_unix_ns).min().unwrap_or(0);
        let step = owner.get(&trace).copied().or_else(|| {
            steps
                .iter()
                .position(|st| st.window_unix_ns.0 <= first && first <= st.window_unix_ns.1)
        });
        match step {
            Some(i) => per_step[i].extend(members),
            None => unplaced += members.len(),
        }
    }
    for v in &mut per_step {
        v.sort_by_key(|s| (s.start_unix_ns, std::cmp::Reverse(s.end_unix_ns)));
    }
    (per_step, unplaced)
}

const STYLE: &str = "
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1d2230;background:#fff}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:16px;margin:28px 0 4px}
p.meta{color:#5a6172;margin:0 0 12px;font-size:13px}
p.banner{background:#fff6d6;border:1px solid #e9cf76;padding:8px 12px;font-size:13px}
table.steps{border-collapse:collapse;font-size:13px}
table.steps th,table.steps td{border-bottom:1px solid #e3e6ec;padding:4px 10px;text-align:left;vertical-align:top}
table.steps th{background:#f3f5f8}
table.steps td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.fail td{background:#fdecec}
td.verdict{font-weight:600}
tr.pass td.verdict{color:#1d7a3a}
tr.fail td.verdict{color:#c62828}
td.detail{color:#5a6172;max-width:420px}
p.no-spans{color:#8a5a00;font-size:13px}
svg.sequence{display:block;margin:8px 0 4px;max-width:100%;height:auto}
svg .lane-box{fill:#eef2fb;stroke:#8c9bc2}
svg .lane-title{font:600 13px system-ui,sans-serif;fill:#1d2230}
svg .lane-domain{font:11px system-ui,sans-serif;fill:#5a6172}
svg .lifeline{stroke:#aab3c8;stroke-dasharray:4 4}
svg .call line,svg .call path{stroke:#2c4a9a;stroke-width:1.4;fill:none}
svg .return line{stroke:#2c4a9a;stroke-width:1.1;stroke-dasharray:5 3}
svg text.label{font:11px system-ui,sans-serif;fill:#1d2230}
svg text.time{font:10px ui-monospace,monospace;fill:#8a90a0}
svg .refused .return line,svg .refused .call path{stroke:#c62828}
svg text.refusal{font:600 11px system-ui,sans-serif;fill:#c62828}
svg text.note{font:italic 10px system-ui,sans-serif;fill:#8a5a00}
";

const LANE_W: usize = 185;
const LEFT: usize = 70;
const TOP: usize = 64;
const ROW_H: usize = 30;

/// One row of the diagram: a hop's call, or its return.
struct Event<'a> {
    at: u64,
    hop: &'a Hop,
    hop_index: usize,
    is_return: bool,
}

/// The rows of a diagram in time order: calls at their start, returns at their end (a
/// self-call is one row). At one instant returns come before calls, an outer call before the
/// calls inside it, and an inner return before the return around it.
fn events(hops: &[Hop]) -> Vec<Event<'_>> {
    let mut ev: Vec<Event<'_>> = Vec::new();
    for (i, h) in hops.iter().enumerate() {
        ev.push(Event {
            at: h.start_ns,
            hop: h,
            hop_index: i,
            is_return: false,
        });
        if h.from != h.to {
            ev.push(Event {
                at: h.end_ns,
                hop: h,
                hop_index: i,
                is_return: true,
            });
        }
    }
    ev.sort_by_key(|e| {
        let tie = if e.is_return {
            u64::MAX - e.hop.start_ns
        } else {
            u64::MAX - e.hop.end_ns
        };
        (e.at, !e.is_return, tie)
    });
    ev
}

fn short_name(name: &str) -> &str {
    name.strip_prefix("capif.v1.").unwrap_or(name)
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

/// The SVG sequence diagram of one step's hops.
fn diagram(hops: &[Hop], aef_domain: &str, home_domain: &str, t0: u64) -> String {
    let mut lanes: Vec<Lane> = LANES.to_vec();
    for h in hops {
        for l in [&h.from, &h.to] {
            if !lanes.contains(l) {
                lanes.push(l.clone());
            }
        }
    }
    let x_of = |l: &Lane| {
        let i = lanes.iter().position(|x| x == l).unwrap_or(0);
        LEFT + i * LANE_W + LANE_W / 2
    };
    let evs = events(hops);
    let width = LEFT + lanes.len() * LANE_W + 20;
    let height = TOP + 16 + evs.len().max(1) * ROW_H + 10;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg class=\"sequence\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"sequence diagram\">\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\">\
         <path d=\"M0,0 L10,5 L0,10 z\" fill=\"#2c4a9a\"/></marker>\
         <marker id=\"arrow-red\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\">\
         <path d=\"M0,0 L10,5 L0,10 z\" fill=\"#c62828\"/></marker></defs>"
    );
    for l in &lanes {
        let x = x_of(l);
        let domain = match l {
            Lane::Aef | Lane::CcfA | Lane::GatewayA => aef_domain,
            Lane::GatewayB | Lane::CcfB => home_domain,
            Lane::Invoker => "capif",
            Lane::Other(_) => "",
        };
        let _ = write!(
            s,
            "<g class=\"lane\" data-lane=\"{id}\"><rect class=\"lane-box\" x=\"{bx}\" y=\"8\" width=\"{bw}\" height=\"44\" rx=\"5\"/>\
             <text class=\"lane-title\" x=\"{x}\" y=\"27\" text-anchor=\"middle\">{title}</text>\
             <text class=\"lane-domain\" x=\"{x}\" y=\"43\" text-anchor=\"middle\">{domain}</text>\
             <line class=\"lifeline\" x1=\"{x}\" y1=\"52\" x2=\"{x}\" y2=\"{y2}\"/></g>",
            id = l.id(),
            bx = x - (LANE_W - 24) / 2,
            bw = LANE_W - 24,
            title = escape(&cut(&l.title(), 26)),
            domain = escape(&cut(domain, 28)),
            y2 = height - 6,
        );
    }
    // Each hop's call and return are drawn as they happen; the group of a hop holds both.
    let mut parts: BTreeMap<usize, String> = BTreeMap::new();
    for (row, e) in evs.iter().enumerate() {
        let y = TOP + 16 + row * ROW_H;
        let h = e.hop;
        let (x1, x2) = (x_of(&h.from), x_of(&h.to));
        let g = parts.entry(e.hop_index).or_default();
        let _ = write!(
            g,
            "<text class=\"time\" x=\"4\" y=\"{}\">+{}</text>",
            y + 4,
            escape(&duration_text(e.at.saturating_sub(t0)))
        );
        if h.from == h.to {
            let _ = write!(
                g,
                "<g class=\"call\"><path d=\"M{x1},{y0} h28 v14 h-26\" marker-end=\"url(#{m})\"/></g>\
                 <text class=\"label\" x=\"{lx}\" y=\"{ly}\">{name} · {d}</text>",
                y0 = y - 6,
                m = if h.refusal.is_some() {
                    "arrow-red"
                } else {
                    "arrow"
                },
                lx = x1 + 34,
                ly = y + 2,
                name = escape(&cut(short_name(&h.name), 40)),
                d = escape(&duration_text(h.duration_ns())),
            );
            if let Some(r) = &h.refusal {
                let _ = write!(
                    g,
                    "<text class=\"refusal\" x=\"{}\" y=\"{}\">✗ {}</text>",
                    x1 + 34,
                    y + 14,
                    escape(&cut(r, 40))
                );
            }
            if let Some(n) = &h.note {
                // Under the label, right of the lane: left of it is the time column.
                let below = if h.refusal.is_some() { 26 } else { 14 };
                let _ = write!(
                    g,
                    "<text class=\"note\" x=\"{}\" y=\"{}\">{}</text>",
                    x1 + 34,
                    y + below,
                    escape(n)
                );
            }
            continue;
        }
        let mid = (x1 + x2) / 2;
        if !e.is_return {
            let _ = write!(
                g,
                "<g class=\"call\"><line x1=\"{x1}\" y1=\"{y}\" x2=\"{x2}\" y2=\"{y}\" marker-end=\"url(#arrow)\"/></g>\
                 <text class=\"label\" x=\"{mid}\" y=\"{ly}\" text-anchor=\"middle\">{name}</text>",
                ly = y - 5,
                name = escape(&cut(short_name(&h.name), 44)),
            );
            if let Some(n) = &h.note {
                let _ = write!(
                    g,
                    "<text class=\"note\" x=\"{mid}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                    y + 11,
                    escape(n)
                );
            }
        } else {
            let m = if h.refusal.is_some() {
                "arrow-red"
            } else {
                "arrow"
            };
            let _ = write!(
                g,
                "<g class=\"return\"><line x1=\"{x2}\" y1=\"{y}\" x2=\"{x1}\" y2=\"{y}\" marker-end=\"url(#{m})\"/></g>"
            );
            match &h.refusal {
                Some(r) => {
                    let _ = write!(
                        g,
                        "<text class=\"refusal\" x=\"{mid}\" y=\"{ly}\" text-anchor=\"middle\">✗ {r} · {d}</text>",
                        ly = y - 5,
                        r = escape(&cut(r, 36)),
                        d = escape(&duration_text(h.duration_ns())),
                    );
                }
                None => {
                    let _ = write!(
                        g,
                        "<text class=\"label duration\" x=\"{mid}\" y=\"{ly}\" text-anchor=\"middle\">{d}</text>",
                        ly = y - 5,
                        d = escape(&duration_text(h.duration_ns())),
                    );
                }
            }
        }
    }
    for (i, body) in parts {
        let h = &hops[i];
        let _ = write!(
            s,
            "<g class=\"hop{refused}\" data-from=\"{from}\" data-to=\"{to}\" data-duration-ns=\"{d}\">\
             <title>{name}: {from_t} → {to_t}, {dur}{why}</title>{body}</g>",
            refused = if h.refusal.is_some() { " refused" } else { "" },
            from = h.from.id(),
            to = h.to.id(),
            d = h.duration_ns(),
            name = escape(&h.name),
            from_t = escape(&h.from.title()),
            to_t = escape(&h.to.title()),
            dur = escape(&duration_text(h.duration_ns())),
            why = h
                .refusal
                .as_ref()
                .map(|r| format!(", refused: {}", escape(r)))
                .unwrap_or_default(),
        );
    }
    s.push_str("</svg>");
    s
}

/// The whole page.
pub fn render(report: &Report, spans: &[ReceivedSpan], dropped: u64) -> String {
    let (per_step, unplaced) = spans_per_step(&report.steps, spans);
    let mut h = String::new();
    let title = escape(&report.scenario);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>capif scenario: {title}</title><style>{STYLE}</style></head>\n<body>\n\
         <h1 id=\"title\">{title}</h1>\n<p class=\"meta\">{file} · <span class=\"verdict\">{verdict}</span> · {n} steps, {failed} failed · {received} spans received{dropped}{unplaced}</p>\n",
        file = escape(&report.file),
        verdict = if report.passed { "PASSED" } else { "FAILED" },
        n = report.steps.len(),
        failed = report.steps.iter().filter(|s| !s.passed).count(),
        received = spans.len(),
        dropped = if dropped > 0 {
            format!(", {dropped} dropped (the receiver was full)")
        } else {
            String::new()
        },
        unplaced = if unplaced > 0 {
            format!(", {unplaced} outside any step")
        } else {
            String::new()
        },
    );
    let from_components = spans.iter().any(|s| s.service_name != RUNNER_SERVICE);
    if !from_components {
        h.push_str(
            "<p class=\"banner\">No component sent spans during this run, so the diagrams below \
             have nothing to draw. The testbed points every component at this run's receiver \
             (OTEL_EXPORTER_OTLP_ENDPOINT); components built without OTLP export send none.</p>\n",
        );
    }
    h.push_str(
        "<table class=\"steps\"><thead><tr><th>#</th><th>action</th><th>target</th><th>expected</th>\
         <th>outcome</th><th>ms</th><th>spans</th><th></th><th>detail</th></tr></thead><tbody>\n",
    );
    for (st, sp) in report.steps.iter().zip(&per_step) {
        let cross = st.cross_domain().is_some();
        let _ = writeln!(
            h,
            "<tr class=\"step-row {cls}\" data-step=\"{n}\"><td class=\"num\">{n}</td><td>{action}</td><td>{target}</td>\
             <td>{expected}</td><td>{got}</td><td class=\"num\">{ms}</td><td class=\"num\">{spans}</td>\
             <td class=\"verdict\">{verdict}</td><td class=\"detail\">{detail}{link}</td></tr>",
            cls = if st.passed { "pass" } else { "fail" },
            n = st.step,
            action = escape(&st.action),
            target = escape(&st.target),
            expected = escape(&st.expected),
            got = escape(&st.got),
            ms = st.millis,
            spans = sp.len(),
            verdict = if st.passed { "ok" } else { "FAIL" },
            detail = escape(&cut(&st.detail, 300)),
            link = if cross {
                format!(" <a href=\"#step-{}\">diagram</a>", st.step)
            } else {
                String::new()
            },
        );
    }
    h.push_str("</tbody></table>\n");
    for (st, sp) in report.steps.iter().zip(&per_step) {
        let Some((a, b)) = st.cross_domain() else {
            continue;
        };
        let _ = writeln!(
            h,
            "<section class=\"trace\" id=\"step-{n}\" data-step=\"{n}\"><h2>Step {n} · {action} · {target}</h2>",
            n = st.step,
            action = escape(&st.action),
            target = escape(&st.target),
        );
        let lane = |s: &ReceivedSpan| lane_of(&s.service_name, &s.service_namespace, a, b);
        let all = hops(sp, lane);
        let _ = writeln!(
            h,
            "<p class=\"meta\">an invoker of {b} at an AEF of {a} · outcome {got} · trace {trace} · {n}, {k}</p>",
            a = escape(a),
            b = escape(b),
            got = escape(&st.got),
            trace = if st.trace_id.is_empty() {
                "not recorded".to_string()
            } else {
                escape(&st.trace_id)
            },
            n = count(sp.len(), "span"),
            k = count(all.len(), "hop"),
        );
        if sp.is_empty() {
            h.push_str("<p class=\"no-spans\">No spans arrived for this step.</p>\n");
        } else if all.is_empty() {
            h.push_str(
                "<p class=\"no-spans\">No hops to draw: no component of this step sent spans \
                 (only the runner's own arrived).</p>\n",
            );
        }
        if !all.is_empty() {
            let shown = &all[..all.len().min(MAX_HOPS_DRAWN)];
            let t0 = sp
                .iter()
                .map(|s| s.start_unix_ns)
                .min()
                .unwrap_or(st.window_unix_ns.0);
            h.push_str(&diagram(shown, a, b, t0));
            if all.len() > shown.len() {
                let _ = writeln!(
                    h,
                    "<p class=\"meta\">{} more hops not drawn.</p>",
                    all.len() - shown.len()
                );
            }
        }
        h.push_str("</section>\n");
    }
    h.push_str("</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otlp::SpanKind;

    const A: &str = "operator-a.test";
    const B: &str = "operator-b.test";

    #[test]
    fn lanes_come_from_service_and_domain() {
        assert_eq!(lane_of("capif", "", A, B), Lane::Invoker);
        assert_eq!(lane_of("aef-stub", A, A, B), Lane::Aef);
        assert_eq!(lane_of("aef-stub", "", A, B), Lane::Aef);
        assert_eq!(lane_of("ccf", A, A, B), Lane::CcfA);
        assert_eq!(lane_of("ccf", B, A, B), Lane::CcfB);
        assert_eq!(lane_of("capif-gateway", A, A, B), Lane::GatewayA);
        assert_eq!(lane_of("capif-gateway", B, A, B), Lane::GatewayB);
        // An AEF of the home domain, or a third domain, is not one of the six.
        assert_eq!(
            lane_of("aef-stub", B, A, B),
            Lane::Other("aef-stub (operator-b.test)".into())
        );
        assert_eq!(
            lane_of("capif-gateway", "operator-c.test", A, B),
            Lane::Other("capif-gateway (operator-c.test)".into())
        );
        // A and B swap with the step: A is always the AEF's domain.
        assert_eq!(lane_of("ccf", A, B, A), Lane::CcfB);
    }

    #[test]
    fn escaping_leaves_no_markup() {
        assert_eq!(
            escape("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(escape("a\u{1b}[31mb"), "a\u{fffd}[31mb");
        assert_eq!(escape("µs → ✗"), "µs → ✗");
    }

    fn span(
        id: u8,
        parent: Option<u8>,
        service: &str,
        ns: &str,
        kind: SpanKind,
        t: (u64, u64),
    ) -> ReceivedSpan {
        ReceivedSpan {
            trace_id: [9; 16],
            span_id: [id; 8],
            parent_span_id: parent.map(|p| [p; 8]),
            name: format!("capif.v1.S/M{id}"),
            kind,
            service_name: service.into(),
            service_namespace: ns.into(),
            service_instance_id: String::new(),
            start_unix_ns: t.0,
            end_unix_ns: t.1,
            status_code: 0,
            status_message: String::new(),
            grpc_status_code: None,
            reason: None,
            step: None,
            rpc_service: None,
            rpc_method: None,
            links: Vec::new(),
        }
    }

    fn lane(s: &ReceivedSpan) -> Lane {
        lane_of(&s.service_name, &s.service_namespace, A, B)
    }

    #[test]
    fn a_client_and_its_server_make_one_hop_timed_by_the_client() {
        let mut server = span(3, Some(2), "aef-stub", A, SpanKind::Server, (150, 800));
        server.grpc_status_code = Some(5);
        server.reason = Some("UNKNOWN_INVOKER".into());
        let spans = [
            span(1, None, "capif", "", SpanKind::Internal, (0, 1000)),
            span(2, Some(1), "capif", "", SpanKind::Client, (100, 900)),
            server,
            // Inside the AEF: no hop.
            span(4, Some(3), "aef-stub", A, SpanKind::Internal, (200, 300)),
        ];
        let refs: Vec<&ReceivedSpan> = spans.iter().collect();
        let hs = hops(&refs, lane);
        assert_eq!(hs.len(), 1, "{hs:?}");
        assert_eq!(
            (hs[0].from.clone(), hs[0].to.clone()),
            (Lane::Invoker, Lane::Aef)
        );
        assert_eq!(hs[0].duration_ns(), 800);
        assert_eq!(hs[0].refusal.as_deref(), Some("UNKNOWN_INVOKER"));
    }

    #[test]
    fn parent_and_child_across_services_without_client_spans_make_a_hop() {
        let spans = [
            span(1, None, "capif-gateway", A, SpanKind::Server, (0, 100)),
            span(2, Some(1), "capif-gateway", B, SpanKind::Server, (10, 60)),
        ];
        let refs: Vec<&ReceivedSpan> = spans.iter().collect();
        let hs = hops(&refs, lane);
        assert_eq!(hs.len(), 2, "{hs:?}");
        // The root server span's caller is not traced: a self-call with a note.
        assert_eq!(hs[0].from, Lane::GatewayA);
        assert_eq!(hs[0].to, Lane::GatewayA);
        assert!(hs[0].note.is_some());
        assert_eq!(
            (hs[1].from.clone(), hs[1].to.clone()),
            (Lane::GatewayA, Lane::GatewayB)
        );
        assert_eq!(hs[1].duration_ns(), 50);
        assert_eq!(hs[1].refusal, None);
    }

    #[test]
    fn a_new_trace_linked_to_its_caller_is_still_a_hop() {
        let mut server = span(3, None, "capif-gateway", B, SpanKind::Server, (20, 50));
        server.trace_id = [4; 16];
        server.links = vec![([9; 16], [2; 8])];
        let spans = [
            span(1, None, "capif-gateway", A, SpanKind::Server, (0, 100)),
            span(2, Some(1), "capif-gateway", A, SpanKind::Client, (10, 60)),
            server,
        ];
        let refs: Vec<&ReceivedSpan> = spans.iter().collect();
        let hs: Vec<Hop> = hops(&refs, lane)
            .into_iter()
            .filter(|h| h.from != h.to)
            .collect();
        assert_eq!(hs.len(), 1, "{hs:?}");
        assert_eq!(
            (hs[0].from.clone(), hs[0].to.clone()),
            (Lane::GatewayA, Lane::GatewayB)
        );
        assert_eq!((hs[0].duration_ns(), hs[0].note.clone()), (50, None));
    }

    #[test]
    fn an_unanswered_client_span_goes_to_the_lane_that_serves_it() {
        let mut c = span(2, Some(1), "capif-gateway", A, SpanKind::Client, (10, 60));
        c.name = "capif.v1.Interconnect/FetchSecurityInformation".into();
        c.grpc_status_code = Some(14);
        let spans = [
            span(1, None, "capif-gateway", A, SpanKind::Server, (0, 100)),
            c,
        ];
        let refs: Vec<&ReceivedSpan> = spans.iter().collect();
        let hs = hops(&refs, lane);
        let h = hs.iter().find(|h| h.from != h.to).unwrap();
        assert_eq!(h.to, Lane::GatewayB);
        assert_eq!(h.refusal.as_deref(), Some("UNAVAILABLE"));
        assert_eq!(h.note.as_deref(), Some("no span from the callee"));
    }

    fn hop(name: &str, from: Lane, to: Lane, start_ns: u64, end_ns: u64) -> Hop {
        Hop {
            from,
            to,
            name: name.into(),
            start_ns,
            end_ns,
            refusal: None,
            note: None,
        }
    }

    fn order(hs: &[Hop]) -> Vec<String> {
        events(hs)
            .iter()
            .map(|e| format!("{}{}", if e.is_return { "<" } else { ">" }, e.hop.name))
            .collect()
    }

    #[test]
    fn calls_and_returns_are_ordered_as_a_sequence() {
        // The inner call ends at the same instant as the outer one: its return comes first.
        let nested = [
            hop("inner", Lane::Aef, Lane::CcfA, 10, 100),
            hop("outer", Lane::Invoker, Lane::Aef, 0, 100),
        ];
        assert_eq!(order(&nested), [">outer", ">inner", "<inner", "<outer"]);
        // One call ends as the next starts: the return comes first.
        let sequential = [
            hop("second", Lane::Invoker, Lane::Aef, 50, 80),
            hop("first", Lane::Invoker, Lane::CcfB, 0, 50),
        ];
        assert_eq!(
            order(&sequential),
            [">first", "<first", ">second", "<second"]
        );
        // A self-call is one row.
        let own = [hop("own", Lane::GatewayA, Lane::GatewayA, 0, 5)];
        assert_eq!(order(&own), [">own"]);
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration_text(850_000), "850 µs");
        assert_eq!(duration_text(12_345_678), "12.3 ms");
        assert_eq!(duration_text(1_500_000_000), "1.50 s");
    }
}
