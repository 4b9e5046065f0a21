//! A subnet's endpoint address pool: an IPv4 CIDR from /16 to /28, and the
//! allocation of endpoint addresses from it (first free address, never the
//! network or broadcast address).

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Shortest and longest allowed prefix.
pub const MIN_PREFIX: u8 = 16;
pub const MAX_PREFIX: u8 = 28;

/// A validated address pool (`cidrBlock`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddressPool(Ipv4Net);

/// Why a `cidrBlock` was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("cidrBlock {0:?} is not an IPv4 CIDR block such as 10.0.9.0/24")]
    Syntax(String),
    #[error("cidrBlock {0:?} is IPv6; address pools are IPv4 for now")]
    Ipv6(String),
    #[error("cidrBlock {0:?} has prefix length /{1}; use a block from /16 to /28")]
    PrefixLength(String, u8),
    #[error("cidrBlock {given:?} has host bits set; did you mean {suggested}?")]
    HostBits { given: String, suggested: Ipv4Net },
}

impl AddressPool {
    pub fn parse(text: &str) -> Result<Self, PoolError> {
        let net: Ipv4Net = match text.parse() {
            Ok(net) => net,
            Err(_) if text.parse::<ipnet::Ipv6Net>().is_ok() => return Err(PoolError::Ipv6(text.to_string())),
            Err(_) => return Err(PoolError::Syntax(text.to_string())),
        };
        if !(MIN_PREFIX..=MAX_PREFIX).contains(&net.prefix_len()) {
            return Err(PoolError::PrefixLength(text.to_string(), net.prefix_len()));
        }
        if net.trunc() != net {
            return Err(PoolError::HostBits { given: text.to_string(), suggested: net.trunc() });
        }
        Ok(Self(net))
    }

    pub fn net(&self) -> Ipv4Net {
        self.0
    }

    /// Addresses endpoints can get: all but the network and broadcast addresses.
    pub fn usable_count(&self) -> u64 {
        (1u64 << (32 - u32::from(self.0.prefix_len()))) - 2
    }

    /// Most addresses one endpoint may hold in this pool: a quarter of the
    /// pool (at least 4, at most 256), so the resources of one provider can
    /// never take all of a consumer's addresses from its other endpoints.
    pub fn per_endpoint_cap(&self) -> u64 {
        (self.usable_count() / 4).clamp(4, 256).min(self.usable_count())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.0.contains(&ip)
    }

    /// Whether `ip` may be handed to an endpoint (inside, not network or broadcast).
    pub fn is_usable(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && ip != self.0.network() && ip != self.0.broadcast()
    }

    /// The lowest usable address not in `used`, or `None` when the pool is exhausted.
    pub fn allocate(&self, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let first = u32::from(self.0.network()) + 1;
        let last = u32::from(self.0.broadcast()) - 1;
        (first..=last).map(Ipv4Addr::from).find(|ip| !used.contains(ip))
    }

    /// Addresses still free given the `used` ones.
    pub fn available_count(&self, used: &BTreeSet<Ipv4Addr>) -> u64 {
        let in_use = used.iter().filter(|ip| self.is_usable(**ip)).count() as u64;
        self.usable_count().saturating_sub(in_use)
    }
}

impl fmt::Display for AddressPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for AddressPool {
    type Err = PoolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for AddressPool {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AddressPool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ipv4_blocks_from_16_to_28() {
        assert_eq!(AddressPool::parse("10.0.9.0/24").unwrap().usable_count(), 254);
        assert_eq!(AddressPool::parse("10.0.9.0/24").unwrap().per_endpoint_cap(), 63);
        assert_eq!(AddressPool::parse("10.0.9.0/28").unwrap().per_endpoint_cap(), 4);
        assert_eq!(AddressPool::parse("10.0.0.0/16").unwrap().per_endpoint_cap(), 256);
        assert_eq!(AddressPool::parse("10.0.0.0/16").unwrap().usable_count(), 65534);
        assert_eq!(AddressPool::parse("10.0.9.16/28").unwrap().usable_count(), 14);
    }

    #[test]
    fn rejects_bad_blocks_with_a_reason() {
        assert!(matches!(AddressPool::parse("10.0.0.0/8"), Err(PoolError::PrefixLength(_, 8))));
        assert!(matches!(AddressPool::parse("10.0.0.0/29"), Err(PoolError::PrefixLength(_, 29))));
        assert!(matches!(AddressPool::parse("fd00::/64"), Err(PoolError::Ipv6(_))));
        assert!(matches!(AddressPool::parse("10.0.9.0"), Err(PoolError::Syntax(_))));
        assert!(matches!(AddressPool::parse("banana"), Err(PoolError::Syntax(_))));
        let err = AddressPool::parse("10.0.9.1/24").unwrap_err();
        assert!(err.to_string().contains("10.0.9.0/24"), "{err}");
    }

    #[test]
    fn allocation_takes_the_first_free_address_and_skips_network_and_broadcast() {
        let pool = AddressPool::parse("10.0.9.0/28").unwrap();
        let mut used = BTreeSet::new();
        let first = pool.allocate(&used).unwrap();
        assert_eq!(first, Ipv4Addr::new(10, 0, 9, 1));
        used.insert(first);
        used.insert(Ipv4Addr::new(10, 0, 9, 3));
        assert_eq!(pool.allocate(&used), Some(Ipv4Addr::new(10, 0, 9, 2)));
        for i in 1..=14 {
            used.insert(Ipv4Addr::new(10, 0, 9, i));
        }
        assert_eq!(pool.allocate(&used), None, "network .0 and broadcast .15 are never handed out");
        assert_eq!(pool.available_count(&used), 0);
    }

    #[test]
    fn freed_addresses_are_reused() {
        let pool = AddressPool::parse("10.0.9.0/28").unwrap();
        let mut used: BTreeSet<_> = (1..=5).map(|i| Ipv4Addr::new(10, 0, 9, i)).collect();
        used.remove(&Ipv4Addr::new(10, 0, 9, 2));
        assert_eq!(pool.allocate(&used), Some(Ipv4Addr::new(10, 0, 9, 2)));
        assert_eq!(pool.available_count(&used), 10);
    }

    proptest::proptest! {
        #[test]
        fn allocation_never_hands_out_network_broadcast_or_used_addresses(
            base in proptest::prelude::any::<u32>(),
            prefix in 24u8..=28,
            taken in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
        ) {
            let net = Ipv4Net::new(Ipv4Addr::from(base), prefix).unwrap().trunc();
            let pool = AddressPool::parse(&net.to_string()).unwrap();
            let used: BTreeSet<Ipv4Addr> =
                taken.iter().map(|t| Ipv4Addr::from(u32::from(net.network()) + u32::from(*t) % (1 << (32 - prefix)))).collect();
            match pool.allocate(&used) {
                Some(ip) => {
                    proptest::prop_assert!(pool.is_usable(ip));
                    proptest::prop_assert!(!used.contains(&ip));
                }
                None => proptest::prop_assert_eq!(pool.available_count(&used), 0),
            }
        }
    }
}
