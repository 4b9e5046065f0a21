//! Dials a resource in the owner's network: an IP, or a DNS name resolved by
//! this host's resolver, within a deadline. The resource sees the gateway
//! agent's address (source NAT by construction).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use trellis_proto::Target;

/// Why the resource could not be reached; maps to an `OpenResponse` status.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// No answer (connect or resolution) before the deadline.
    #[error("{target} did not answer within {timeout:?}")]
    Timeout { target: String, timeout: Duration },
    /// Refused, unroutable, or a name that does not resolve.
    #[error("{target} is unreachable: {source}")]
    Unreachable {
        target: String,
        #[source]
        source: io::Error,
    },
}

/// `ip:port` or `name:port`, for logs.
pub fn describe(target: &Target, port: u16) -> String {
    match target {
        Target::Ip { address } => SocketAddr::new(*address, port).to_string(),
        Target::Dns { domain_name } => format!("{domain_name}:{port}"),
    }
}

/// Connects to `target:port`, trying each resolved address in turn, all within `timeout`.
pub async fn dial(target: &Target, port: u16, timeout: Duration) -> Result<TcpStream, DialError> {
    // The name is for errors only: not formatted on the way to a connection.
    let name = || describe(target, port);
    let deadline = Instant::now() + timeout;
    let timed_out = || DialError::Timeout { target: name(), timeout };
    let addrs: Vec<SocketAddr> = match target {
        Target::Ip { address } => vec![SocketAddr::new(*address, port)],
        Target::Dns { domain_name } => {
            match tokio::time::timeout_at(deadline, tokio::net::lookup_host((domain_name.as_str(), port))).await {
                Err(_) => return Err(timed_out()),
                Ok(Err(source)) => return Err(DialError::Unreachable { target: name(), source }),
                Ok(Ok(addrs)) => addrs.collect(),
            }
        }
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
    for addr in addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => return Err(timed_out()),
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = e,
        }
    }
    Err(DialError::Unreachable { target: name(), source: last })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn closed_port_is_unreachable() {
        // Bind then drop to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let target = Target::Ip { address: "127.0.0.1".parse().unwrap() };
        let err = dial(&target, port, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, DialError::Unreachable { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn dns_target_resolves_in_this_host() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = Target::Dns { domain_name: "localhost".into() };
        // localhost may resolve to ::1 first, where nothing listens; the dialer must try the next address.
        dial(&target, port, Duration::from_secs(5)).await.unwrap();
    }
}
