//! Fresh Postgres databases for the service tests: the queue crate's testkit
//! (`convoq_queue::testkit::postgres`), and rewriting a URL to go through a proxy.

pub use convoq_queue::testkit::postgres::{admin_url, Databases};

/// Postgres's address from a URL (IPv4), for a proxy to forward to.
pub async fn postgres_addr(url: &str) -> std::net::SocketAddr {
    use std::str::FromStr;
    let opts = sqlx::postgres::PgConnectOptions::from_str(url).expect("a Postgres URL");
    let mut addrs = tokio::net::lookup_host((opts.get_host(), opts.get_port()))
        .await
        .expect("resolve the Postgres host");
    addrs
        .find(std::net::SocketAddr::is_ipv4)
        .expect("an IPv4 address for Postgres")
}

/// `url` with its host and port replaced by `127.0.0.1:port` (to route it through a proxy).
pub fn with_port(url: &str, port: u16) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[scheme_end..];
    let host_start = rest.rfind('@').map_or(0, |i| i + 1);
    let host_end = rest[host_start..]
        .find(['/', '?'])
        .map_or(rest.len(), |i| host_start + i);
    format!(
        "{}{}127.0.0.1:{port}{}",
        &url[..scheme_end],
        &rest[..host_start],
        &rest[host_end..]
    )
}

#[test]
fn rewrites_ports() {
    assert_eq!(
        with_port("postgres://root@127.0.0.1:5432/db", 6000),
        "postgres://root@127.0.0.1:6000/db"
    );
    assert_eq!(
        with_port("postgresql://u:p@db.example:5432/x?sslmode=disable", 7),
        "postgresql://u:p@127.0.0.1:7/x?sslmode=disable"
    );
    assert_eq!(with_port("postgres://h/db", 9), "postgres://127.0.0.1:9/db");
}
