//! Progress events as plain text lines, numbered per vertex the way `--progress plain`
//! prints them (`#3 RUN make`, `#3 output…`, `#3 DONE 1.2s`), for callers that keep a log
//! rather than draw a view (the controller's `status.logTail`).

use std::collections::HashMap;
use std::time::SystemTime;

use kiln_worker::progress::Event;

/// Longest line kept; longer output is cut (a log tail is for people, not archives).
const MAX_LINE: usize = 400;

/// Turns a stream of progress events into lines.
#[derive(Debug, Default)]
pub struct LogLines {
    index: HashMap<String, usize>,
    started: HashMap<String, bool>,
    done: HashMap<String, bool>,
    partial: HashMap<String, String>,
}

impl LogLines {
    /// A fresh numbering.
    pub fn new() -> LogLines {
        LogLines::default()
    }

    fn number(&mut self, vertex: &str) -> usize {
        let next = self.index.len() + 1;
        *self.index.entry(vertex.to_string()).or_insert(next)
    }

    /// The complete lines `ev` adds (none for byte-progress updates and partial output).
    pub fn push(&mut self, ev: &Event) -> Vec<String> {
        let mut out = Vec::new();
        match ev {
            Event::Vertex(v) => {
                let n = self.number(&v.digest);
                let header = format!("#{n} {}", v.name);
                if (v.started.is_some() || v.completed.is_some())
                    && !self.started.insert(v.digest.clone(), true).unwrap_or(false)
                {
                    out.push(header);
                }
                if v.completed.is_some()
                    && !self.done.insert(v.digest.clone(), true).unwrap_or(false)
                {
                    if let Some(rest) = self.partial.remove(&v.digest).filter(|r| !r.is_empty()) {
                        out.push(cut(format!("#{n} {rest}")));
                    }
                    out.push(match (&v.error, v.cached) {
                        (Some(e), _) => cut(format!("#{n} ERROR: {e}")),
                        (None, true) => format!("#{n} CACHED"),
                        (None, false) => format!("#{n} DONE {:.1}s", secs(v.started, v.completed)),
                    });
                }
            }
            Event::Log(l) => {
                let n = self.number(&l.vertex);
                let buf = self.partial.entry(l.vertex.clone()).or_default();
                buf.push_str(&String::from_utf8_lossy(&l.data));
                while let Some(pos) = buf.find('\n') {
                    let line: String = buf.drain(..=pos).collect();
                    let line = line.trim_end_matches(['\n', '\r']);
                    out.push(cut(format!("#{n} {line}")));
                }
            }
            Event::Warning(w) => out.push(cut(format!("WARNING: {}", w.message))),
            Event::Status(_) => {}
        }
        out
    }
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_LINE {
        let mut end = MAX_LINE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

fn secs(a: Option<SystemTime>, b: Option<SystemTime>) -> f64 {
    match (a, b) {
        (Some(a), Some(b)) => b.duration_since(a).unwrap_or_default().as_secs_f64(),
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_worker::progress::{VertexLog, VertexState};
    use std::time::Duration;

    fn vertex(d: &str, started: bool, done: bool, error: Option<&str>) -> Event {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        Event::Vertex(VertexState {
            digest: d.into(),
            inputs: vec![],
            name: format!("RUN {d}"),
            started: started.then_some(t),
            completed: done.then_some(t + Duration::from_millis(1500)),
            cached: false,
            error: error.map(str::to_string),
        })
    }

    fn log(d: &str, data: &str) -> Event {
        Event::Log(VertexLog {
            vertex: d.into(),
            stream: 1,
            data: data.as_bytes().to_vec().into(),
            timestamp: SystemTime::UNIX_EPOCH,
        })
    }

    #[test]
    fn lines_are_numbered_split_and_flushed() {
        let mut l = LogLines::new();
        let mut all = Vec::new();
        for ev in [
            vertex("a", true, false, None),
            vertex("a", true, false, None),
            log("a", "hel"),
            log("a", "lo\nwor"),
            vertex("b", true, false, None),
            vertex("a", true, true, None),
            vertex("b", true, true, Some("exit code 1")),
        ] {
            all.extend(l.push(&ev));
        }
        assert_eq!(
            all,
            [
                "#1 RUN a",
                "#1 hello",
                "#2 RUN b",
                "#1 wor",
                "#1 DONE 1.5s",
                "#2 ERROR: exit code 1"
            ]
        );
        let long = l.push(&log("a", &format!("{}\n", "x".repeat(1000))));
        assert!(long[0].chars().count() <= MAX_LINE + 1, "{}", long[0].len());
    }
}
