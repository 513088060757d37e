//! Progress display: `tty` (a live view redrawn in place, like buildctl's), `plain` (one
//! line per event, `#N` numbered), `rawjson` (one JSON status object per line, with
//! buildctl's field names) and `quiet`.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant, SystemTime};

use anyhow::bail;
use base64::Engine as _;
use kiln_worker::progress::{Event, VertexState};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::timefmt::rfc3339;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Live view.
    Tty,
    /// Line per event.
    Plain,
    /// JSON per line on stdout... on stderr, as buildctl.
    RawJson,
    /// Nothing.
    Quiet,
}

impl Mode {
    /// Parses `--progress`.
    pub fn parse(s: &str) -> anyhow::Result<Mode> {
        Ok(match s {
            "auto" => {
                if std::io::stderr().is_terminal() {
                    Mode::Tty
                } else {
                    Mode::Plain
                }
            }
            "tty" => Mode::Tty,
            "plain" => Mode::Plain,
            "rawjson" => Mode::RawJson,
            "quiet" => Mode::Quiet,
            other => bail!("--progress {other:?}: expected auto, tty, plain, rawjson or quiet"),
        })
    }
}

/// A running renderer.
pub struct Renderer {
    task: tokio::task::JoinHandle<()>,
}

impl Renderer {
    /// Starts rendering events from `rx`.
    pub fn spawn(mode: Mode, rx: UnboundedReceiver<Event>) -> Renderer {
        let task = tokio::spawn(render(mode, rx));
        Renderer { task }
    }

    /// Waits for the last events (the build's senders are gone) and the final view.
    pub async fn finish(self, _ok: bool) {
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

#[derive(Default)]
struct VState {
    v: Option<VertexState>,
    index: usize,
    logs: Vec<String>,
    partial: String,
    statuses: Vec<(String, String, u64, u64, bool)>,
    printed_header: bool,
    printed_done: bool,
}

struct View {
    order: Vec<String>,
    vertices: HashMap<String, VState>,
    warnings: Vec<String>,
    start: Instant,
    lines_drawn: usize,
}

impl View {
    fn new() -> View {
        View {
            order: Vec::new(),
            vertices: HashMap::new(),
            warnings: Vec::new(),
            start: Instant::now(),
            lines_drawn: 0,
        }
    }

    fn entry(&mut self, digest: &str) -> &mut VState {
        if !self.vertices.contains_key(digest) {
            self.order.push(digest.to_string());
            let index = self.order.len();
            self.vertices.insert(
                digest.to_string(),
                VState {
                    index,
                    ..Default::default()
                },
            );
        }
        self.vertices.entry(digest.to_string()).or_default()
    }

    fn apply(&mut self, ev: &Event) {
        match ev {
            Event::Vertex(v) => self.entry(&v.digest).v = Some(v.clone()),
            Event::Log(l) => {
                let s = self.entry(&l.vertex);
                s.partial.push_str(&String::from_utf8_lossy(&l.data));
                while let Some(pos) = s.partial.find('\n') {
                    let line: String = s.partial.drain(..=pos).collect();
                    s.logs.push(line.trim_end_matches('\n').to_string());
                }
                if s.logs.len() > 200 {
                    s.logs.drain(..s.logs.len() - 200);
                }
            }
            Event::Status(st) => {
                let s = self.entry(&st.vertex);
                let done = st.completed.is_some();
                match s.statuses.iter_mut().find(|x| x.0 == st.id) {
                    Some(x) => *x = (st.id.clone(), st.name.clone(), st.current, st.total, done),
                    None => s.statuses.push((
                        st.id.clone(),
                        st.name.clone(),
                        st.current,
                        st.total,
                        done,
                    )),
                }
            }
            Event::Warning(w) => self.warnings.push(w.message.clone()),
        }
    }
}

fn secs(a: Option<SystemTime>, b: Option<SystemTime>) -> f64 {
    match (a, b) {
        (Some(a), Some(b)) => b.duration_since(a).unwrap_or_default().as_secs_f64(),
        (Some(a), None) => SystemTime::now()
            .duration_since(a)
            .unwrap_or_default()
            .as_secs_f64(),
        _ => 0.0,
    }
}

async fn render(mode: Mode, mut rx: UnboundedReceiver<Event>) {
    let mut view = View::new();
    let mut tick = tokio::time::interval(Duration::from_millis(120));
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                let mut batch = vec![ev];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                match mode {
                    Mode::RawJson => print_json(&batch),
                    Mode::Plain => {
                        for ev in &batch {
                            view.apply(ev);
                            plain(&mut view, ev);
                        }
                    }
                    Mode::Tty => batch.iter().for_each(|e| view.apply(e)),
                    Mode::Quiet => {}
                }
            }
            _ = tick.tick(), if mode == Mode::Tty => draw(&mut view, false),
        }
    }
    match mode {
        Mode::Tty => draw(&mut view, true),
        Mode::Plain => {
            for w in &view.warnings {
                eprintln!("WARNING: {w}");
            }
        }
        _ => {}
    }
}

fn print_json(batch: &[Event]) {
    let mut vertexes = Vec::new();
    let mut statuses = Vec::new();
    let mut logs = Vec::new();
    let mut warnings = Vec::new();
    for ev in batch {
        match ev {
            Event::Vertex(v) => {
                let mut m = Map::new();
                m.insert("digest".into(), json!(v.digest));
                if !v.inputs.is_empty() {
                    m.insert("inputs".into(), json!(v.inputs));
                }
                m.insert("name".into(), json!(v.name));
                if let Some(t) = v.started {
                    m.insert("started".into(), json!(rfc3339(t)));
                }
                if let Some(t) = v.completed {
                    m.insert("completed".into(), json!(rfc3339(t)));
                }
                if v.cached {
                    m.insert("cached".into(), json!(true));
                }
                if let Some(e) = &v.error {
                    m.insert("error".into(), json!(e));
                }
                vertexes.push(Value::Object(m));
            }
            Event::Status(s) => {
                let mut m = Map::new();
                m.insert("id".into(), json!(s.id));
                m.insert("vertex".into(), json!(s.vertex));
                if !s.name.is_empty() {
                    m.insert("name".into(), json!(s.name));
                }
                if s.total > 0 {
                    m.insert("total".into(), json!(s.total));
                }
                if s.current > 0 {
                    m.insert("current".into(), json!(s.current));
                }
                m.insert("timestamp".into(), json!(rfc3339(s.timestamp)));
                if let Some(t) = s.started {
                    m.insert("started".into(), json!(rfc3339(t)));
                }
                if let Some(t) = s.completed {
                    m.insert("completed".into(), json!(rfc3339(t)));
                }
                statuses.push(Value::Object(m));
            }
            Event::Log(l) => logs.push(json!({
                "vertex": l.vertex,
                "stream": l.stream,
                "data": base64::engine::general_purpose::STANDARD.encode(&l.data),
                "timestamp": rfc3339(l.timestamp),
            })),
            Event::Warning(w) => warnings.push(json!({
                "vertex": w.vertex.clone().unwrap_or_default(),
                "short": base64::engine::general_purpose::STANDARD.encode(w.message.as_bytes()),
            })),
        }
    }
    let mut m = Map::new();
    for (k, v) in [
        ("vertexes", vertexes),
        ("statuses", statuses),
        ("logs", logs),
        ("warnings", warnings),
    ] {
        if !v.is_empty() {
            m.insert(k.into(), Value::Array(v));
        }
    }
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{}", Value::Object(m));
}

fn plain(view: &mut View, ev: &Event) {
    let mut err = std::io::stderr().lock();
    let start = view.start;
    match ev {
        Event::Vertex(v) => {
            let s = view.entry(&v.digest);
            let n = s.index;
            if v.started.is_some() && !s.printed_header {
                s.printed_header = true;
                let _ = writeln!(err, "\n#{n} {}", v.name);
            }
            if v.completed.is_some() && !s.printed_done {
                s.printed_done = true;
                if !s.printed_header {
                    s.printed_header = true;
                    let _ = writeln!(err, "\n#{n} {}", v.name);
                }
                if !s.partial.is_empty() {
                    let rest = std::mem::take(&mut s.partial);
                    let _ = writeln!(err, "#{n} {rest}");
                }
                if let Some(e) = &v.error {
                    let _ = writeln!(err, "#{n} ERROR: {e}");
                } else if v.cached {
                    let _ = writeln!(err, "#{n} CACHED");
                } else {
                    let _ = writeln!(err, "#{n} DONE {:.1}s", secs(v.started, v.completed));
                }
            }
        }
        Event::Log(l) => {
            let s = view.entry(&l.vertex);
            let n = s.index;
            let t = start.elapsed().as_secs_f64();
            // Complete lines were already split into `logs` by apply(); print the newest.
            let text = String::from_utf8_lossy(&l.data);
            let complete = text.matches('\n').count();
            let lines: Vec<String> = s.logs.iter().rev().take(complete).rev().cloned().collect();
            for line in lines {
                let _ = writeln!(err, "#{n} {t:.3} {line}");
            }
        }
        Event::Status(st) => {
            let s = view.entry(&st.vertex);
            if st.completed.is_some() {
                let n = s.index;
                let _ = writeln!(err, "#{n} {} {} done", st.name, human(st.current));
            }
        }
        Event::Warning(_) => {}
    }
}

fn human(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2}GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2}MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.2}kB", b / 1e3)
    } else {
        format!("{b}B")
    }
}

fn draw(view: &mut View, last: bool) {
    let mut out = String::new();
    if view.lines_drawn > 0 {
        out.push_str(&format!("\x1b[{}A\x1b[J", view.lines_drawn));
    }
    let total = view.order.len();
    let done = view
        .vertices
        .values()
        .filter(|s| s.v.as_ref().and_then(|v| v.completed).is_some())
        .count();
    let failed = view
        .vertices
        .values()
        .any(|s| s.v.as_ref().and_then(|v| v.error.as_ref()).is_some());
    let state = if !last {
        ""
    } else if failed {
        " ERROR"
    } else {
        " FINISHED"
    };
    let width = terminal_width();
    let mut lines = vec![format!(
        "[+] Building {:.1}s ({done}/{total}){state}",
        view.start.elapsed().as_secs_f64()
    )];
    for d in &view.order {
        let Some(s) = view.vertices.get(d) else {
            continue;
        };
        let Some(v) = &s.v else { continue };
        if v.started.is_none() {
            continue;
        }
        let prefix = if v.cached {
            "CACHED "
        } else if v.error.is_some() {
            "ERROR "
        } else {
            ""
        };
        let t = format!("{:.1}s", secs(v.started, v.completed));
        let mut name = format!(" => {prefix}{}", v.name);
        let room = width.saturating_sub(t.len() + 1);
        if name.chars().count() > room {
            name = name
                .chars()
                .take(room.saturating_sub(1))
                .collect::<String>()
                + "…";
        }
        let pad = room.saturating_sub(name.chars().count());
        lines.push(format!("{name}{} {t}", " ".repeat(pad)));
        for (_, sname, cur, tot, fin) in &s.statuses {
            if v.completed.is_none() || !fin {
                let p = if *tot > 0 {
                    format!("{} / {}", human(*cur), human(*tot))
                } else {
                    human(*cur)
                };
                lines.push(format!(" => => {sname} {p}"));
            }
        }
        let show_logs = v.completed.is_none() || v.error.is_some();
        if show_logs {
            let keep = if v.error.is_some() { 10 } else { 6 };
            for l in s.logs.iter().rev().take(keep).rev() {
                let l: String = l.chars().take(width.saturating_sub(8)).collect();
                lines.push(format!(" => => # {l}"));
            }
        }
    }
    if last {
        for w in &view.warnings {
            lines.push(format!("WARNING: {w}"));
        }
    }
    view.lines_drawn = lines.len();
    for l in lines {
        out.push_str(&l);
        out.push('\n');
    }
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(out.as_bytes());
    let _ = err.flush();
}

fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(100)
}
