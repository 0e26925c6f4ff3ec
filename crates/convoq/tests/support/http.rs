//! A minimal HTTP/1.1 client over a plain TCP socket, one connection per request (so a killed
//! server shows up as a connection error and nothing is pooled across restarts), every request
//! bounded by [`REQUEST_TIMEOUT`].

use std::io;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::REQUEST_TIMEOUT;

/// An HTTP response.
#[derive(Debug)]
pub struct Resp {
    /// The status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl Resp {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body if it is not.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("status {}: not JSON ({e}): {}", self.status, self.text()))
    }
}

fn bad_data(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Writes one request on a new connection (`Connection: close`).
pub(super) async fn send(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let body = body.map(|b| serde_json::to_vec(b).expect("JSON body"));
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = &body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(&b);
    }
    stream.write_all(&bytes).await?;
    stream.flush().await?;
    Ok(stream)
}

/// A response head: status, headers (names lowercased), and where the body starts.
type Head = (u16, Vec<(String, String)>, usize);

/// Splits a response head from the bytes read so far, once it is complete.
pub(super) fn parse_head(buf: &[u8]) -> io::Result<Option<Head>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| bad_data("head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad_data(format!("bad status line {status_line:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Some((status, headers, end + 4)))
}

/// Decodes the complete chunks of a chunked body; `true` once the last chunk was seen.
pub(super) fn dechunk(mut raw: &[u8]) -> io::Result<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return Ok((out, false));
        };
        let size_s = std::str::from_utf8(&raw[..eol]).map_err(|_| bad_data("chunk size"))?;
        let size_s = size_s.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_s, 16)
            .map_err(|_| bad_data(format!("chunk size {size_s:?}")))?;
        if size == 0 {
            return Ok((out, true));
        }
        let start = eol + 2;
        if raw.len() < start + size + 2 {
            return Ok((out, false));
        }
        out.extend_from_slice(&raw[start..start + size]);
        raw = &raw[start + size + 2..];
    }
}

/// `POST /api/chat/conversations` with `body` and the `Idempotency-Key` `key` ([`request`]).
pub async fn post_keyed(port: u16, key: &str, body: &Value) -> io::Result<Resp> {
    request(
        port,
        "POST",
        "/api/chat/conversations",
        &[("Idempotency-Key", key)],
        Some(body),
    )
    .await
}

/// One request on its own connection, read to the end. Errors are transport errors (refused,
/// reset, cut short, timed out): the request may or may not have been served.
pub async fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> io::Result<Resp> {
    let exchange = async {
        let mut stream = send(port, method, path, headers, body).await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        let (status, headers, body_at) = parse_head(&buf)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no complete response"))?;
        let raw = &buf[body_at..];
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
        let length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        let body = if chunked {
            let (body, complete) = dechunk(raw)?;
            if !complete {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "body cut short",
                ));
            }
            body
        } else if let Some(n) = length {
            if raw.len() < n {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "body cut short",
                ));
            }
            raw[..n].to_vec()
        } else {
            raw.to_vec()
        };
        Ok(Resp {
            status,
            headers,
            body,
        })
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "request timed out")))
}

/// `GET path`.
pub async fn get(port: u16, path: &str) -> io::Result<Resp> {
    request(port, "GET", path, &[], None).await
}

/// Creates (or updates) user `u1`, the user the load tests post for; panics unless it is stored.
pub async fn put_user_u1(port: u16) {
    let r = request(
        port,
        "PUT",
        "/api/users/u1",
        &[],
        Some(&serde_json::json!({"discordId": "1", "username": "alice"})),
    )
    .await
    .expect("PUT user");
    assert!(r.status == 200 || r.status == 201, "{}", r.text());
}

/// `GET path`, expecting 200 and JSON.
#[track_caller]
pub fn expect_ok(resp: io::Result<Resp>, what: &str) -> Value {
    let r = resp.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    r.json()
}
