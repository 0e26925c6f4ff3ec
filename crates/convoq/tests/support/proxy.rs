//! A TCP proxy on 127.0.0.1 that the outage test puts between convoq and Postgres, and cuts.
//!
//! While up, it forwards each accepted connection to the target. [`Proxy::cut`] closes every
//! open connection (both sides) and stops listening, so new connections are refused, as when
//! the database host's server is down; [`Proxy::restore`] listens again on the same port.
//! [`Proxy::lose_acks`] makes it lose the answers to the next writes that commit: it forwards a
//! client message holding one of the given patterns (`COMMIT`, a self-committing `INSERT`),
//! lets the server commit it, and closes the connection before relaying the answer, as when a
//! network drops right after the database committed. [`Proxy::stall`] keeps every socket open
//! and stops relaying, both ways and on new connections too, as when the database host or the
//! network between goes silent without closing anything (a half-open connection);
//! [`Proxy::resume`] relays again, what was held included.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The proxy. Stops (closing its connections) when dropped.
pub struct Proxy {
    /// The port convoq connects to.
    pub port: u16,
    target: SocketAddr,
    /// Bumped at each cut: forwarding tasks of an older generation close their connections.
    generation: watch::Sender<u64>,
    accept: Option<JoinHandle<()>>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    /// How many acknowledgements are still to be lost, and what marks the messages that commit.
    losing: Arc<Losing>,
    /// While true, nothing is relayed.
    stalled: watch::Sender<bool>,
}

/// The lose-acknowledgements mode.
#[derive(Default)]
struct Losing {
    left: AtomicUsize,
    lost: AtomicUsize,
    patterns: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl Losing {
    /// Whether a commit the client executes in `messages` is to lose its answer (taking one).
    fn take(&self, commits: bool) -> bool {
        commits
            && self
                .left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
    }
}

/// Reads a client's side of the Postgres protocol as it passes, to tell when it executes a
/// statement that holds one of the patterns: a simple query (`Q`) holding it, or the bind
/// (`B`) of a prepared statement whose parse (`P`) held it (drivers prepare `COMMIT` too, and
/// run a prepared statement later by its name only).
#[derive(Default)]
struct Frontend {
    started: bool,
    pending: Vec<u8>,
    armed: std::collections::HashSet<Vec<u8>>,
}

impl Frontend {
    /// Feeds `bytes`; whether they execute a statement holding a pattern.
    fn executes(&mut self, bytes: &[u8], patterns: &[Vec<u8>]) -> bool {
        self.pending.extend_from_slice(bytes);
        let holds = |text: &[u8]| {
            patterns
                .iter()
                .any(|p| text.windows(p.len()).any(|w| w == p.as_slice()))
        };
        let mut fires = false;
        let mut at = 0;
        loop {
            let rest = &self.pending[at..];
            if !self.started {
                // Startup, SSL or GSS request: a length and a code, no type byte.
                if rest.len() < 8 {
                    break;
                }
                let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                if rest.len() < len {
                    break;
                }
                let code = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
                self.started = !matches!(code, 80_877_103 | 80_877_104);
                at += len.max(8);
                continue;
            }
            if rest.len() < 5 {
                break;
            }
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            if rest.len() < 1 + len {
                break;
            }
            let body = &rest[5..1 + len];
            let mut fields = body.split(|b| *b == 0);
            match rest[0] {
                b'Q' => fires |= holds(body),
                b'P' => {
                    let name = fields.next().unwrap_or_default().to_vec();
                    if holds(fields.next().unwrap_or_default()) {
                        self.armed.insert(name);
                    }
                }
                b'B' => {
                    let _portal = fields.next();
                    fires |= self.armed.contains(fields.next().unwrap_or_default());
                }
                _ => {}
            }
            at += 1 + len;
        }
        self.pending.drain(..at);
        fires
    }
}

impl Proxy {
    /// Starts forwarding 127.0.0.1:<free port> to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let mut proxy = Proxy {
            port,
            target,
            generation: watch::channel(0).0,
            accept: None,
            accepted: Arc::new(AtomicUsize::new(0)),
            losing: Arc::default(),
            stalled: watch::channel(false).0,
        };
        proxy.accept = Some(proxy.spawn_accept(listener));
        proxy
    }

    fn spawn_accept(&self, listener: TcpListener) -> JoinHandle<()> {
        let target = self.target;
        let generation = self.generation.clone();
        let accepted = self.accepted.clone();
        let losing = self.losing.clone();
        let stalled = self.stalled.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                let mut cut = generation.subscribe();
                let losing = losing.clone();
                let mut stall = stalled.subscribe();
                tokio::spawn(async move {
                    let forward = async move {
                        // A connection made while stalled is accepted and left unanswered.
                        if stall.wait_for(|s| !*s).await.is_err() {
                            return;
                        }
                        let Ok(server) = TcpStream::connect(target).await else {
                            return;
                        };
                        pump(client, server, losing, stall).await;
                    };
                    tokio::select! {
                        () = forward => {}
                        // Both sockets close as the task ends.
                        _ = cut.changed() => {}
                    }
                });
            }
        })
    }

    /// Watches for statements that hold one of `patterns` (set it before the client connects:
    /// drivers prepare a statement once per connection and then run it by name).
    pub fn watch_commits(&self, patterns: &[&str]) {
        *self
            .losing
            .patterns
            .lock()
            .unwrap_or_else(|p| p.into_inner()) =
            patterns.iter().map(|p| p.as_bytes().to_vec()).collect();
    }

    /// Loses the answers to the next `n` executions of a watched statement: each is forwarded,
    /// given time to commit, and its connection closed before the answer is relayed.
    pub fn lose_acks(&self, n: usize) {
        self.losing.left.store(n, Ordering::SeqCst);
    }

    /// How many answers were lost so far.
    pub fn acks_lost(&self) -> usize {
        self.losing.lost.load(Ordering::SeqCst)
    }

    /// Stops relaying on every connection, open or new, keeping the sockets open.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Relays again after [`Proxy::stall`], delivering what was held.
    pub fn resume(&self) {
        self.stalled.send_replace(false);
    }

    /// Closes every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&mut self) {
        if let Some(accept) = self.accept.take() {
            // Aborting the accept loop drops the listener: the port stops listening.
            accept.abort();
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Listens again on the same port and forwards new connections.
    pub async fn restore(&mut self) {
        assert!(self.accept.is_none(), "the proxy is not cut");
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        // The aborted accept task releases the port as it is dropped; retry briefly.
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("re-bind the proxy on {addr}: {e}"),
            }
        };
        self.accept = Some(self.spawn_accept(listener));
    }
}

/// Relays both ways until either side closes, or until a message whose answer is to be lost
/// has been forwarded (then both sockets close, the answer unrelayed).
async fn pump(
    client: TcpStream,
    server: TcpStream,
    losing: Arc<Losing>,
    stall: watch::Receiver<bool>,
) {
    use std::sync::atomic::AtomicBool;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    // Set before the fatal message is forwarded, so that no answer to it is relayed.
    let dropping = Arc::new(AtomicBool::new(false));
    let mut stall_down = stall.clone();
    let mut stall_up = stall;
    let up = {
        let dropping = dropping.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut frontend = Frontend::default();
            loop {
                let n = match client_rx.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let patterns = losing
                    .patterns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let fires = frontend.executes(&buf[..n], &patterns);
                let fatal = losing.take(fires);
                if fatal {
                    dropping.store(true, Ordering::SeqCst);
                }
                if stall_up.wait_for(|s| !*s).await.is_err() {
                    return;
                }
                if server_tx.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                if fatal {
                    // The server reads and commits it; its answer goes nowhere (the relay
                    // back stops at it, and ends the connection).
                    losing.lost.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    return;
                }
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if stall_down.wait_for(|s| !*s).await.is_err() {
                return;
            }
            if dropping.load(Ordering::SeqCst) || client_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Whichever ends first ends the connection: both halves drop.
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        self.generation.send_modify(|g| *g += 1);
    }
}

#[test]
fn frontend_tells_executions_of_watched_statements() {
    let patterns = vec![b"COMMIT".to_vec()];
    let mut f = Frontend::default();
    let mut startup = vec![0, 0, 0, 12, 0, 3, 0, 0];
    startup.extend_from_slice(b"user");
    assert!(!f.executes(&startup, &patterns));
    let parse = b"P\0\0\0\x17sqlx_s_11\0COMMIT\0\0\0D\0\0\0\x0fSsqlx_s_11\0S\0\0\0\x04";
    assert!(!f.executes(parse, &patterns), "a parse does not run it");
    let bind =
        b"B\0\0\0\x19\0sqlx_s_11\0\0\x01\0\x01\0\0\0\x01\0\x01E\0\0\0\t\0\0\0\0\0S\0\0\0\x04";
    assert!(f.executes(bind, &patterns), "its bind does");
}
