//! A server-sent-events reader over the HTTP client of `http.rs`.

use std::io;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::http::{dechunk, parse_head, send};

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// `event:`.
    pub event: String,
    /// `data:` (lines joined with `\n`).
    pub data: String,
}

fn parse_sse(text: &str) -> Vec<SseEvent> {
    let mut out = Vec::new();
    // Only complete events (ended by a blank line).
    let complete = match text.rfind("\n\n") {
        Some(i) => &text[..i + 2],
        None => return out,
    };
    for block in complete.split("\n\n") {
        let mut event = String::new();
        let mut data: Vec<&str> = Vec::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim_start().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if !event.is_empty() || !data.is_empty() {
            out.push(SseEvent {
                event,
                data: data.join("\n"),
            });
        }
    }
    out
}

/// Reads `GET path` as server-sent events until an event named in `until` arrives (or the
/// stream ends), within `timeout`. Comments (keep-alives) are skipped.
pub async fn sse_until(
    port: u16,
    path: &str,
    until: &[&str],
    timeout: Duration,
) -> io::Result<(u16, Option<String>, Vec<SseEvent>)> {
    let read = async {
        let mut stream = send(port, "GET", path, &[("Accept", "text/event-stream")], None).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await?;
            buf.extend_from_slice(&chunk[..n]);
            if let Some((status, headers, body_at)) = parse_head(&buf)? {
                let content_type = headers
                    .iter()
                    .find(|(k, _)| k == "content-type")
                    .map(|(_, v)| v.clone());
                if status != 200 {
                    return Ok((status, content_type, Vec::new()));
                }
                let chunked = headers
                    .iter()
                    .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
                let body = if chunked {
                    dechunk(&buf[body_at..])?.0
                } else {
                    buf[body_at..].to_vec()
                };
                let events = parse_sse(&String::from_utf8_lossy(&body).replace("\r\n", "\n"));
                if n == 0 || events.iter().any(|e| until.contains(&e.event.as_str())) {
                    return Ok((status, content_type, events));
                }
            } else if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "no response head",
                ));
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "event stream timed out",
            ))
        })
}
