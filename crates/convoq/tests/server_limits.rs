//! The server's own limits against the real binary, on loopback: a client that sends its
//! headers a few bytes at a time (slowloris) is cut off after the header read timeout; past
//! the connection cap a new connection is answered 503 with `Retry-After` at once, and
//! served again once connections close.

mod support;

use std::time::{Duration, Instant};

use support::{get, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off_and_connections_are_capped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        dir.path(),
        &[
            ("CONVOQ_HEADER_READ_TIMEOUT_MS", "1000"),
            ("CONVOQ_MAX_CONNECTIONS", "8"),
        ],
    )
    .await;
    let addr = format!("127.0.0.1:{}", server.port);

    // Slowloris: a header line every 300 ms, never the end of the headers.
    let mut slow = TcpStream::connect(&addr).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let mut cut_off = false;
    for i in 0..40 {
        if slow
            .write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
            .await
            .is_err()
        {
            cut_off = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(300), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut_off = true;
                break;
            }
            Ok(Ok(n)) => {
                // hyper may answer 408 before it closes.
                let text = String::from_utf8_lossy(&buf[..n]);
                assert!(text.starts_with("HTTP/1.1 408"), "{text}");
            }
            Err(_) => {}
        }
    }
    let took = started.elapsed();
    assert!(
        cut_off,
        "a client sending headers forever was never cut off"
    );
    assert!(took < Duration::from_secs(4), "cut off only after {took:?}");

    // Eight idle connections take every place; a ninth is refused at once, clearly.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(&addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(&addr).await.expect("connect");
    extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), extra.read_to_end(&mut answer))
        .await
        .expect("an answer within 3 s")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");

    // The idle ones are closed by the header read timeout; the server takes requests again.
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(r) = get(server.port, "/healthz").await {
            if r.status == 200 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "never served again after the cap"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
