//! Where webhooks may go. A URL must be `http` or `https` with a host; by
//! default the address it reaches must be public: loopback, link-local
//! (169.254.0.0/16 holds cloud metadata services), private, shared (CGNAT),
//! multicast and unspecified addresses are refused, so a tenant cannot make
//! the control plane call into its own network (SSRF).
//!
//! Names are checked against the addresses they resolve to at delivery time
//! and the connection goes to a checked address ([`GuardedResolver`] is the
//! HTTP client's resolver), so a name that re-resolves to a private address
//! after the check (DNS rebinding) is refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The flag that lifts the address rule.
pub const ALLOW_FLAG: &str = "--allow-private-webhooks";

/// Why an address may not receive webhooks, or `None` when it may.
pub fn refused_address(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return refused_v4(v4);
            }
            let seg0 = v6.segments()[0];
            if v6.is_loopback() {
                Some("a loopback address")
            } else if v6.is_unspecified() {
                Some("the unspecified address")
            } else if v6.is_multicast() {
                Some("a multicast address")
            } else if seg0 & 0xffc0 == 0xfe80 {
                Some("a link-local address")
            } else if seg0 & 0xfe00 == 0xfc00 {
                Some("a private (unique local) address")
            } else {
                None
            }
        }
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_link_local() {
        Some("a link-local address (cloud metadata lives there)")
    } else if ip.is_private() {
        Some("a private address")
    } else if a == 100 && (64..128).contains(&b) {
        Some("a shared (carrier-grade NAT) address")
    } else if ip.is_unspecified() || a == 0 {
        Some("an unspecified address")
    } else if ip.is_multicast() || ip.is_broadcast() || a >= 240 {
        Some("a multicast, broadcast or reserved address")
    } else {
        None
    }
}

fn refusal(host: &str, ip: IpAddr, why: &str) -> String {
    format!(
        "{host} is {ip}, {why}; webhooks go to public addresses only (a control plane started with {ALLOW_FLAG} \
         also delivers to private ones)"
    )
}

/// Checks a webhook URL as a create or update takes it: `http(s)://host…`,
/// no credentials, and (unless `allow_private`) no literal address or
/// `localhost` that is not public. The message names `url` and what to write.
pub fn check_url(raw: &str, allow_private: bool) -> Result<Url, String> {
    const WHAT: &str = "give an http:// or https:// URL with a host, e.g. https://hooks.example.com/trellis";
    if raw.chars().count() > trellis_model::MAX_URL_CHARS {
        return Err(format!("url is longer than {} characters; {WHAT}", trellis_model::MAX_URL_CHARS));
    }
    let url = Url::parse(raw).map_err(|e| format!("url {raw:?} is not a URL ({e}); {WHAT}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("url {raw:?} has scheme {:?}; {WHAT}", url.scheme()));
    }
    let Some(host) = url.host_str().filter(|h| !h.is_empty()).map(str::to_string) else {
        return Err(format!("url {raw:?} has no host; {WHAT}"));
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "url {raw:?} carries credentials; drop the user:password@ part (deliveries are signed with the secret)"
        ));
    }
    if !allow_private {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let lower = bare.to_ascii_lowercase();
        let literal = match bare.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) if lower == "localhost" || lower.ends_with(".localhost") => Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            Err(_) => None,
        };
        if let Some(ip) = literal
            && let Some(why) = refused_address(ip)
        {
            return Err(format!("url: {}", refusal(&host, ip, why)));
        }
    }
    Ok(url)
}

/// The HTTP client's resolver: the system's, minus the addresses webhooks
/// may not reach (unless `allow_private`). A name with none left fails the
/// attempt with the reason.
#[derive(Clone, Copy, Debug)]
pub struct GuardedResolver {
    pub allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match refused_address(a.ip()) {
                    Some(why) if !allow_private => {
                        refused.get_or_insert((a.ip(), why));
                        false
                    }
                    _ => true,
                })
                .collect();
            if allowed.is_empty() {
                let reason = match refused {
                    Some((ip, why)) => refusal(&host, ip, why),
                    None => format!("{host} resolves to no address"),
                };
                return Err(reason.into());
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_allowed() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(refused_address(ip.parse().unwrap()).is_some(), "{ip} must be refused");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "100.128.0.1"] {
            assert_eq!(refused_address(ip.parse().unwrap()), None, "{ip} is public");
        }
    }

    #[test]
    fn urls_must_be_http_with_a_host_and_public_unless_allowed() {
        assert!(check_url("https://hooks.example.com/x", false).is_ok());
        assert!(check_url("http://93.184.216.34:8080/x", false).is_ok());
        for bad in
            ["ftp://example.com/", "file:///etc/passwd", "not a url", "https://user:pw@example.com/", "mailto:a@b"]
        {
            let err = check_url(bad, false).unwrap_err();
            assert!(err.starts_with("url"), "{bad}: {err}");
        }
        for private in ["http://127.0.0.1:9/", "http://[::1]/", "http://169.254.169.254/latest", "http://localhost/"] {
            let err = check_url(private, false).unwrap_err();
            assert!(err.contains(ALLOW_FLAG), "{private}: {err}");
            assert!(check_url(private, true).is_ok(), "{private} with the flag");
        }
        assert!(check_url(&format!("https://example.com/{}", "a".repeat(3000)), false).is_err());
    }

    #[tokio::test]
    async fn the_resolver_drops_refused_addresses() {
        let guarded = GuardedResolver { allow_private: false };
        let err = guarded.resolve("localhost".parse().unwrap()).await.err().unwrap().to_string();
        assert!(err.contains("loopback") && err.contains(ALLOW_FLAG), "{err}");
        let open = GuardedResolver { allow_private: true };
        let addrs: Vec<_> = open.resolve("localhost".parse().unwrap()).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }
}
