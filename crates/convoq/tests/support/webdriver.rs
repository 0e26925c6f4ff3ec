//! A minimal W3C WebDriver client for the console's browser test: it starts Debian's
//! `chromedriver` on a free loopback port, opens one headless Chromium session, and speaks the
//! protocol's JSON over this module's HTTP client. [`Browser::find`] says why when no browser is
//! installed, so that the test can skip with the reason.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

use super::http::{parse_head, send};
use super::{free_port, Resp, REQUEST_TIMEOUT};

/// The W3C key of an element reference in WebDriver's answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless Chromium session driven through `chromedriver`; both end when it is dropped
/// (the whole process group).
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
}

/// One request to chromedriver, read up to its `Content-Length` (chromedriver keeps the
/// connection open whatever the request asks).
async fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> std::io::Result<Resp> {
    let exchange = async {
        let mut stream = send(port, method, path, headers, body).await?;
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if let Some((status, headers, at)) = parse_head(&buf)? {
                let length = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if buf.len() >= at + length {
                    let body = buf[at..at + length].to_vec();
                    return Ok(Resp {
                        status,
                        headers,
                        body,
                    });
                }
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "chromedriver closed the connection mid-answer",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "chromedriver did not answer",
            ))
        })
}

fn first_existing(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    std::env::var_os(env)
        .map(PathBuf::from)
        .into_iter()
        .chain(candidates.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

impl Browser {
    /// The Chromium and chromedriver binaries (`CONVOQ_TEST_CHROMIUM`,
    /// `CONVOQ_TEST_CHROMEDRIVER`, else Debian's paths), or why there are none.
    pub fn find() -> Result<(PathBuf, PathBuf), String> {
        let chromium = first_existing(
            "CONVOQ_TEST_CHROMIUM",
            &[
                "/usr/bin/chromium",
                "/usr/bin/chromium-browser",
                "/usr/bin/google-chrome",
            ],
        )
        .ok_or("no Chromium found (install Debian's chromium, or set CONVOQ_TEST_CHROMIUM)")?;
        let driver = first_existing("CONVOQ_TEST_CHROMEDRIVER", &["/usr/bin/chromedriver"])
            .ok_or("no chromedriver found (install Debian's chromium-driver, or set CONVOQ_TEST_CHROMEDRIVER)")?;
        Ok((chromium, driver))
    }

    /// Starts `chromedriver` and a headless session of `chromium` with its profile in
    /// `profile`.
    pub async fn start(chromium: &Path, driver: &Path, profile: &Path) -> Browser {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let child = Command::new(driver)
            // A process group of its own, with the Chromium it starts: dropped, the test ends
            // them all (killing chromedriver alone would leave Chromium running).
            .process_group(0)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let mut browser = Browser {
            driver: child,
            port,
            session: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = request(port, "GET", "/status", &[], None).await {
                if r.json()["value"]["ready"] == json!(true) {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver never got ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--disable-gpu", "--window-size=1400,1000",
                         format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let v = browser.call("POST", "/session", Some(&caps)).await;
        browser.session = v["sessionId"].as_str().expect("a session id").to_owned();
        browser
    }

    /// One WebDriver command; panics with WebDriver's message when it fails.
    async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let r = request(self.port, method, path, &[], body)
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let v = r.json();
        assert!(
            r.status < 300,
            "WebDriver {method} {path}: {}",
            v["value"]["message"]
        );
        v["value"].clone()
    }

    fn path(&self, tail: &str) -> String {
        format!("/session/{}{tail}", self.session)
    }

    /// Loads `url`.
    pub async fn goto(&self, url: &str) {
        self.call("POST", &self.path("/url"), Some(&json!({ "url": url })))
            .await;
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page and returns its
    /// value.
    pub async fn eval(&self, script: &str, args: Value) -> Value {
        let body = json!({ "script": script, "args": args });
        self.call("POST", &self.path("/execute/sync"), Some(&body))
            .await
    }

    /// The element `css` selects, waiting for it (bounded).
    pub async fn element(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = request(
                self.port,
                "POST",
                &self.path("/element"),
                &[],
                Some(&json!({ "using": "css selector", "value": css })),
            )
            .await
            .expect("WebDriver answers");
            if r.status < 300 {
                let v = r.json();
                return v["value"][ELEMENT]
                    .as_str()
                    .unwrap_or_else(|| panic!("no element reference in {v}"))
                    .to_owned();
            }
            assert!(Instant::now() < deadline, "no element {css} in 10 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the element `css` selects, as a user would.
    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.call(
            "POST",
            &self.path(&format!("/element/{id}/click")),
            Some(&json!({})),
        )
        .await;
    }

    /// Types `text` into the element `css` selects.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.call(
            "POST",
            &self.path(&format!("/element/{id}/value")),
            Some(&json!({ "text": text })),
        )
        .await;
    }

    /// Accepts the page's `confirm()` dialog, waiting for it (bounded).
    pub async fn accept_dialog(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = request(
                self.port,
                "POST",
                &self.path("/alert/accept"),
                &[],
                Some(&json!({})),
            )
            .await
            .expect("WebDriver answers");
            if r.status < 300 {
                return;
            }
            assert!(Instant::now() < deadline, "no dialog to accept in 10 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (bounded by `timeout`) until `script` returns `true` in the page.
    pub async fn wait_for(&self, what: &str, timeout: Duration, script: &str) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.eval(script, json!([])).await == json!(true) {
                return;
            }
            if Instant::now() >= deadline {
                let page = self
                    .eval("return document.body.innerText.slice(0, 3000);", json!([]))
                    .await;
                panic!(
                    "{what}: not within {timeout:?}; the page says:\n{}",
                    page.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG of the page at `path`.
    pub async fn screenshot(&self, path: &Path) {
        let v = self.call("GET", &self.path("/screenshot"), None).await;
        let png = decode_base64(v.as_str().expect("base64 PNG"));
        std::fs::write(path, png).expect("screenshot written");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Standard base64, as WebDriver sends screenshots.
fn decode_base64(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let digits: Vec<u8> = s.bytes().filter_map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, d)| acc | (u32::from(*d) << (18 - 6 * i)));
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len().saturating_sub(1)]);
    }
    out
}
