//! A TCP proxy on 127.0.0.1 that the outage test puts between convoq and Postgres, and cuts.
//!
//! While up, it forwards each accepted connection to the target. [`Proxy::cut`] closes every
//! open connection (both sides) and stops listening, so new connections are refused, as when
//! the database host's server is down; [`Proxy::restore`] listens again on the same port.

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
        };
        proxy.accept = Some(proxy.spawn_accept(listener));
        proxy
    }

    fn spawn_accept(&self, listener: TcpListener) -> JoinHandle<()> {
        let target = self.target;
        let generation = self.generation.clone();
        let accepted = self.accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                let mut cut = generation.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        // Both sockets close as the task ends.
                        _ = cut.changed() => {}
                    }
                });
            }
        })
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

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        self.generation.send_modify(|g| *g += 1);
    }
}
