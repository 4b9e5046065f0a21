//! How many connections, and how many request-body bytes, the control plane's
//! listener holds at once, and for whom.
//!
//! Every TCP connection is counted against its client address before the TLS
//! handshake and takes one of a bounded number of handshake slots. After the
//! handshake, a connection that presented a client certificate the CA signed
//! (an agent) moves from its address to that certificate and to the agent
//! budget; any other connection stays counted against its address and takes
//! a slot of the public budget. So a flood of anonymous connections can use
//! up the public budget, never the agents': agents keep long-polling and
//! reporting, and revocations keep reaching gateways.
//!
//! Nothing here waits: a connection over a cap is refused (the listener
//! closes it at once) and counted in [`ListenerStats`], so a flood costs one
//! accept and one close per connection, never a held file descriptor.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Default cap of concurrent connections from one client address (an IPv4
/// address or an IPv6 /64), counted from before the TLS handshake.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 128;
/// Default cap of concurrent connections presenting one agent certificate
/// (an agent needs two: its config long-poll and its reports).
pub const DEFAULT_MAX_CONNECTIONS_PER_AGENT: usize = 16;
/// Default largest request body of an anonymous (API-key) connection.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Default largest request body of an agent connection (reports of busy gateways are long).
pub const DEFAULT_MAX_AGENT_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Default cap of request-body bytes all anonymous requests may hold in memory together.
pub const DEFAULT_MAX_PUBLIC_BODY_BYTES_IN_FLIGHT: usize = 64 * 1024 * 1024;
/// Default time a client has to finish the TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a request's headers and body have to arrive, from its first byte.
pub const DEFAULT_REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a keep-alive connection may wait for its next request.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a client has to take a response, from the moment the handler answered.
pub const DEFAULT_RESPONSE_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// File descriptors left for everything but listener connections: the
/// database, the CA files, the log, outgoing connections.
pub const RESERVED_FDS: u64 = 256;
/// The most listener connections sized from the open-files limit, whatever
/// that limit is: each costs memory (TLS and HTTP buffers) as well as a descriptor.
pub const MAX_LISTENER_CONNECTIONS: usize = 32_768;
/// The soft open-files limit asked for at start (the hard limit caps it).
const WANTED_OPEN_FILES: u64 = 1 << 20;

/// The settings of the control plane's listener: time bounds of each stage
/// of a connection, request size, and connection caps. [`Default`] is what
/// production runs with; tests set small values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Time a client has to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time a request's headers and whole body have to arrive, from its first byte.
    pub request_read_timeout: Duration,
    /// Time a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Time a client has to take a whole response, from the moment the handler answered.
    pub response_write_timeout: Duration,
    /// Largest request body of an anonymous connection; larger is a 413.
    pub max_body_bytes: usize,
    /// Largest request body of an agent connection; larger is a 413.
    pub max_agent_body_bytes: usize,
    /// Request-body bytes all anonymous requests may hold at once; past it, 503.
    pub max_public_body_bytes_in_flight: usize,
    /// Concurrent connections from one client address (IPv4 address or IPv6
    /// /64), from before the TLS handshake; agent connections leave this count
    /// once their certificate is verified.
    pub max_connections_per_ip: usize,
    /// Concurrent connections presenting one agent certificate.
    pub max_connections_per_agent: usize,
    /// Connection budgets; `None` sizes them from the open-files limit,
    /// which [`raise_open_files_limit`] first raises to the hard limit.
    pub budgets: Option<Budgets>,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            request_read_timeout: DEFAULT_REQUEST_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            response_write_timeout: DEFAULT_RESPONSE_WRITE_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_agent_body_bytes: DEFAULT_MAX_AGENT_BODY_BYTES,
            max_public_body_bytes_in_flight: DEFAULT_MAX_PUBLIC_BODY_BYTES_IN_FLIGHT,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            max_connections_per_agent: DEFAULT_MAX_CONNECTIONS_PER_AGENT,
            budgets: None,
        }
    }
}

impl ListenerLimits {
    /// Checks that every limit lets at least something through; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let durations = [
            ("handshake timeout", self.handshake_timeout),
            ("request read timeout", self.request_read_timeout),
            ("idle timeout", self.idle_timeout),
            ("response write timeout", self.response_write_timeout),
        ];
        for (what, value) in durations {
            if value.is_zero() {
                return Err(format!("the listener's {what} must be longer than zero"));
            }
        }
        if self.max_public_body_bytes_in_flight < self.max_body_bytes {
            return Err("the listener's public body bytes in flight must be at least its largest body".into());
        }
        let budgets = self.budgets.unwrap_or(Budgets { handshakes: 1, public: 1, agents: 1 });
        let counts = [
            ("largest body", self.max_body_bytes),
            ("largest agent body", self.max_agent_body_bytes),
            ("connections per IP", self.max_connections_per_ip),
            ("connections per agent", self.max_connections_per_agent),
            ("handshake budget", budgets.handshakes),
            ("public connection budget", budgets.public),
            ("agent connection budget", budgets.agents),
        ];
        for (what, value) in counts {
            if value == 0 {
                return Err(format!("the listener's {what} must be at least 1"));
            }
        }
        if u32::try_from(self.max_public_body_bytes_in_flight).is_err() {
            return Err("the listener's public body bytes in flight must be below 4 GiB".into());
        }
        Ok(())
    }
}

/// How many connections of each kind the listener holds at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budgets {
    /// Connections still in the TLS handshake (not yet known as agent or public).
    pub handshakes: usize,
    /// Anonymous (API-key) connections after the handshake.
    pub public: usize,
    /// Connections that presented an agent certificate.
    pub agents: usize,
}

impl Budgets {
    /// Splits the descriptors of `open_files` left after [`RESERVED_FDS`]
    /// (at most [`MAX_LISTENER_CONNECTIONS`]): an eighth for handshakes,
    /// three eighths for public connections, half for agents.
    pub fn from_open_files_limit(open_files: u64) -> Self {
        let usable = open_files.saturating_sub(RESERVED_FDS).clamp(8, MAX_LISTENER_CONNECTIONS as u64) as usize;
        let handshakes = usable / 8;
        let public = usable * 3 / 8;
        Self { handshakes, public, agents: usable - handshakes - public }
    }
}

/// Raises the soft open-files limit of this process to its hard limit (at
/// most 2^20) and returns the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    match rlimit::increase_nofile_limit(WANTED_OPEN_FILES) {
        Ok(limit) => limit,
        Err(e) => {
            let current = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(1024);
            tracing::warn!(error = %e, limit = current, "cannot raise the open-files limit; sizing the listener from it");
            current
        }
    }
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Its client address already holds the most connections one address may.
    #[error("too many connections from this address")]
    PerAddress,
    /// Its agent certificate already holds the most connections one agent may.
    #[error("too many connections with this agent certificate")]
    PerAgent,
    /// Too many connections are in the TLS handshake.
    #[error("too many TLS handshakes in progress")]
    Handshakes,
    /// The public connection budget is used up.
    #[error("the public connection budget is used up")]
    PublicBudget,
    /// The agent connection budget is used up.
    #[error("the agent connection budget is used up")]
    AgentBudget,
}

/// What the listener refused and cut off so far, and what it holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// Connections in the TLS handshake now.
    pub handshakes: usize,
    /// Anonymous connections open now.
    pub public: usize,
    /// Agent connections open now.
    pub agents: usize,
    /// Connections refused because their address held too many.
    pub refused_per_address: u64,
    /// Connections refused because their agent certificate held too many.
    pub refused_per_agent: u64,
    /// Connections refused because too many handshakes were in progress.
    pub refused_handshakes: u64,
    /// Connections refused because the public budget was used up.
    pub refused_public: u64,
    /// Connections refused because the agent budget was used up.
    pub refused_agents: u64,
    /// Requests answered 503 because anonymous bodies in flight were at their cap.
    pub refused_bodies: u64,
    /// Connections cut off because a request did not arrive in time.
    pub request_read_timeouts: u64,
    /// Connections cut off because a response was not taken in time.
    pub response_write_timeouts: u64,
    /// Keep-alive connections closed after waiting too long for a request.
    pub idle_closed: u64,
}

/// Counters behind [`ListenerStats`].
#[derive(Debug, Default)]
struct Counters {
    refused: [AtomicU64; 6],
    request_read_timeouts: AtomicU64,
    response_write_timeouts: AtomicU64,
    idle_closed: AtomicU64,
}

fn refusal_index(refusal: Refusal) -> usize {
    match refusal {
        Refusal::PerAddress => 0,
        Refusal::PerAgent => 1,
        Refusal::Handshakes => 2,
        Refusal::PublicBudget => 3,
        Refusal::AgentBudget => 4,
    }
}
const REFUSED_BODIES: usize = 5;

/// Who a connection is counted against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Holder {
    /// An IPv4 address, or the /64 of an IPv6 address (one host's usual share).
    Address(IpAddr),
    /// The SHA-256 of an agent certificate.
    Agent(String),
}

impl Holder {
    fn address(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                Holder::Address(IpAddr::V6(prefix.into()))
            }
            v4 => Holder::Address(v4),
        }
    }
}

type HolderCounts = Arc<Mutex<HashMap<Holder, usize>>>;

/// One connection counted against a holder; dropping it uncounts it.
#[derive(Debug)]
struct Held {
    counts: HolderCounts,
    holder: Holder,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(n) = counts.get_mut(&self.holder) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.holder);
            }
        }
    }
}

/// A connection in its TLS handshake: counted against its address and a handshake slot.
#[derive(Debug)]
pub struct Handshaking {
    address: Held,
    _slot: OwnedSemaphorePermit,
}

/// Whether a connection came from an agent or from anyone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// No client certificate: API-key routes and enrollment.
    Public,
    /// A client certificate the CA signed.
    Agent,
}

/// An admitted connection; dropping it frees its slot and its holder's count.
#[derive(Debug)]
pub struct Admitted {
    pub class: Class,
    _held: Held,
    _slot: OwnedSemaphorePermit,
}

/// The listener's caps and what they hold now. One per listener.
#[derive(Debug)]
pub struct ConnLimits {
    limits: ListenerLimits,
    budgets: Budgets,
    handshakes: Arc<Semaphore>,
    public: Arc<Semaphore>,
    agents: Arc<Semaphore>,
    public_body_bytes: Arc<Semaphore>,
    counts: HolderCounts,
    counters: Counters,
}

impl ConnLimits {
    /// Caps from `limits`; its `budgets` when set, else from the open-files
    /// limit, which this raises to the hard limit first.
    pub fn new(limits: ListenerLimits) -> Self {
        let budgets = limits.budgets.unwrap_or_else(|| {
            let open_files = raise_open_files_limit();
            let budgets = Budgets::from_open_files_limit(open_files);
            tracing::info!(open_files, ?budgets, "listener connection budgets sized from the open-files limit");
            budgets
        });
        Self {
            handshakes: Arc::new(Semaphore::new(budgets.handshakes)),
            public: Arc::new(Semaphore::new(budgets.public)),
            agents: Arc::new(Semaphore::new(budgets.agents)),
            public_body_bytes: Arc::new(Semaphore::new(limits.max_public_body_bytes_in_flight)),
            counts: HolderCounts::default(),
            counters: Counters::default(),
            budgets,
            limits,
        }
    }

    /// The settings these caps came from.
    pub fn limits(&self) -> &ListenerLimits {
        &self.limits
    }

    /// The connection budgets in force.
    pub fn budgets(&self) -> Budgets {
        self.budgets
    }

    /// A new TCP connection from `ip`, before its TLS handshake.
    pub fn accept(&self, ip: IpAddr) -> Result<Handshaking, Refusal> {
        let address = self.hold(Holder::address(ip), self.limits.max_connections_per_ip, Refusal::PerAddress)?;
        let slot = self.slot(&self.handshakes, Refusal::Handshakes)?;
        Ok(Handshaking { address, _slot: slot })
    }

    /// The handshake of `conn` finished; `agent_cert` is the SHA-256 of the
    /// client certificate it presented (verified against the CA), if any.
    pub fn admit(&self, conn: Handshaking, agent_cert: Option<&str>) -> Result<Admitted, Refusal> {
        match agent_cert {
            Some(cert) => {
                let held = self.hold(
                    Holder::Agent(cert.to_string()),
                    self.limits.max_connections_per_agent,
                    Refusal::PerAgent,
                )?;
                let slot = self.slot(&self.agents, Refusal::AgentBudget)?;
                drop(conn);
                Ok(Admitted { class: Class::Agent, _held: held, _slot: slot })
            }
            None => {
                let slot = self.slot(&self.public, Refusal::PublicBudget)?;
                Ok(Admitted { class: Class::Public, _held: conn.address, _slot: slot })
            }
        }
    }

    /// Reserves room for an anonymous request body of up to `bytes`, held
    /// until the permit drops; `None` (counted) when anonymous bodies in
    /// flight are at their cap.
    pub fn reserve_public_body(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        // `validate` keeps the whole pool, and so any one body, below u32::MAX.
        let bytes = u32::try_from(bytes.max(1)).unwrap_or(u32::MAX);
        let permit = self.public_body_bytes.clone().try_acquire_many_owned(bytes).ok();
        if permit.is_none() {
            self.counters.refused[REFUSED_BODIES].fetch_add(1, Ordering::Relaxed);
        }
        permit
    }

    /// Counts a request that did not arrive in time.
    pub fn count_request_read_timeout(&self) {
        self.counters.request_read_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a response that was not taken in time.
    pub fn count_response_write_timeout(&self) {
        self.counters.response_write_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a keep-alive connection closed for idleness.
    pub fn count_idle_closed(&self) {
        self.counters.idle_closed.fetch_add(1, Ordering::Relaxed);
    }

    /// What the caps hold now and what they refused so far.
    pub fn stats(&self) -> ListenerStats {
        let refused = |i: usize| self.counters.refused[i].load(Ordering::Relaxed);
        let in_use = |sem: &Semaphore, budget: usize| budget - sem.available_permits();
        ListenerStats {
            handshakes: in_use(&self.handshakes, self.budgets.handshakes),
            public: in_use(&self.public, self.budgets.public),
            agents: in_use(&self.agents, self.budgets.agents),
            refused_per_address: refused(refusal_index(Refusal::PerAddress)),
            refused_per_agent: refused(refusal_index(Refusal::PerAgent)),
            refused_handshakes: refused(refusal_index(Refusal::Handshakes)),
            refused_public: refused(refusal_index(Refusal::PublicBudget)),
            refused_agents: refused(refusal_index(Refusal::AgentBudget)),
            refused_bodies: refused(REFUSED_BODIES),
            request_read_timeouts: self.counters.request_read_timeouts.load(Ordering::Relaxed),
            response_write_timeouts: self.counters.response_write_timeouts.load(Ordering::Relaxed),
            idle_closed: self.counters.idle_closed.load(Ordering::Relaxed),
        }
    }

    fn hold(&self, holder: Holder, cap: usize, refusal: Refusal) -> Result<Held, Refusal> {
        let mut counts = self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let n = counts.entry(holder.clone()).or_insert(0);
        if *n >= cap {
            drop(counts);
            return Err(self.refuse(refusal));
        }
        *n += 1;
        Ok(Held { counts: self.counts.clone(), holder })
    }

    fn slot(&self, budget: &Arc<Semaphore>, refusal: Refusal) -> Result<OwnedSemaphorePermit, Refusal> {
        budget.clone().try_acquire_owned().map_err(|_| self.refuse(refusal))
    }

    fn refuse(&self, refusal: Refusal) -> Refusal {
        self.counters.refused[refusal_index(refusal)].fetch_add(1, Ordering::Relaxed);
        refusal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_ip: usize, per_agent: usize, budgets: Budgets) -> ListenerLimits {
        ListenerLimits {
            max_connections_per_ip: per_ip,
            max_connections_per_agent: per_agent,
            budgets: Some(budgets),
            ..ListenerLimits::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_holds_at_most_its_cap_and_others_are_unaffected() {
        let conns = ConnLimits::new(limits(2, 4, Budgets { handshakes: 10, public: 10, agents: 10 }));
        let a = conns.accept(ip("192.0.2.1")).unwrap();
        let _b = conns.accept(ip("192.0.2.1")).unwrap();
        assert_eq!(conns.accept(ip("192.0.2.1")).unwrap_err(), Refusal::PerAddress);
        assert!(conns.accept(ip("192.0.2.2")).is_ok(), "another address has its own count");
        // Admitted public connections stay counted against their address.
        let admitted = conns.admit(a, None).unwrap();
        assert_eq!(admitted.class, Class::Public);
        assert_eq!(conns.accept(ip("192.0.2.1")).unwrap_err(), Refusal::PerAddress);
        drop(admitted);
        assert!(conns.accept(ip("192.0.2.1")).is_ok(), "a closed connection frees its address's count");
        assert_eq!(conns.stats().refused_per_address, 2);
    }

    #[test]
    fn an_ipv6_slash_64_counts_as_one_address() {
        let conns = ConnLimits::new(limits(1, 4, Budgets { handshakes: 10, public: 10, agents: 10 }));
        let _a = conns.accept(ip("2001:db8::1")).unwrap();
        assert_eq!(conns.accept(ip("2001:db8::ffff:2")).unwrap_err(), Refusal::PerAddress);
        assert!(conns.accept(ip("2001:db8:0:1::1")).is_ok());
        let _v4 = conns.accept(ip("192.0.2.9")).unwrap();
        assert_eq!(
            conns.accept(ip("::ffff:192.0.2.9")).unwrap_err(),
            Refusal::PerAddress,
            "v4-mapped is the v4 address"
        );
    }

    #[test]
    fn agents_leave_their_address_count_and_use_their_own_budget() {
        let conns = ConnLimits::new(limits(1, 2, Budgets { handshakes: 10, public: 1, agents: 10 }));
        let public = conns.admit(conns.accept(ip("192.0.2.1")).unwrap(), None).unwrap();
        assert_eq!(conns.admit(conns.accept(ip("192.0.2.2")).unwrap(), None).unwrap_err(), Refusal::PublicBudget);
        // Behind one NAT: many agents from the address the public connection holds.
        let nat = ip("192.0.2.2");
        let a1 = conns.admit(conns.accept(nat).unwrap(), Some("cert-1")).unwrap();
        let a2 = conns.admit(conns.accept(nat).unwrap(), Some("cert-2")).unwrap();
        let a3 = conns.admit(conns.accept(nat).unwrap(), Some("cert-2")).unwrap();
        assert_eq!((a1.class, a2.class, a3.class), (Class::Agent, Class::Agent, Class::Agent));
        assert_eq!(conns.admit(conns.accept(nat).unwrap(), Some("cert-2")).unwrap_err(), Refusal::PerAgent);
        let stats = conns.stats();
        assert_eq!((stats.public, stats.agents, stats.handshakes), (1, 3, 0));
        assert_eq!((stats.refused_public, stats.refused_per_agent), (1, 1));
        drop(public);
        assert_eq!(conns.stats().public, 0);
    }

    #[test]
    fn budgets_refuse_instead_of_waiting() {
        let conns = ConnLimits::new(limits(10, 10, Budgets { handshakes: 1, public: 1, agents: 1 }));
        let first = conns.accept(ip("192.0.2.1")).unwrap();
        assert_eq!(conns.accept(ip("192.0.2.2")).unwrap_err(), Refusal::Handshakes);
        let _agent = conns.admit(first, Some("cert")).unwrap();
        let second = conns.accept(ip("192.0.2.2")).unwrap();
        assert_eq!(conns.admit(second, Some("other")).unwrap_err(), Refusal::AgentBudget);
        assert_eq!(conns.stats().handshakes, 0, "a refused connection frees its handshake slot");
    }

    #[test]
    fn public_bodies_in_flight_are_capped() {
        let conns = ConnLimits::new(ListenerLimits {
            max_body_bytes: 100,
            max_public_body_bytes_in_flight: 250,
            budgets: Some(Budgets { handshakes: 1, public: 1, agents: 1 }),
            ..ListenerLimits::default()
        });
        let a = conns.reserve_public_body(100).unwrap();
        let _b = conns.reserve_public_body(100).unwrap();
        assert!(conns.reserve_public_body(100).is_none());
        drop(a);
        assert!(conns.reserve_public_body(100).is_some());
        assert_eq!(conns.stats().refused_bodies, 1);
    }

    #[test]
    fn budgets_follow_the_open_files_limit_and_leave_headroom() {
        let small = Budgets::from_open_files_limit(1024);
        assert_eq!(small, Budgets { handshakes: 96, public: 288, agents: 384 });
        assert!(small.handshakes + small.public + small.agents <= 1024 - RESERVED_FDS as usize);
        let huge = Budgets::from_open_files_limit(u64::MAX);
        assert_eq!(huge.handshakes + huge.public + huge.agents, MAX_LISTENER_CONNECTIONS);
        let tiny = Budgets::from_open_files_limit(10);
        assert!(tiny.handshakes >= 1 && tiny.public >= 1 && tiny.agents >= 1);
    }

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
        let limit = raise_open_files_limit();
        assert_eq!(limit, soft.max(hard.min(WANTED_OPEN_FILES)));
        assert_eq!(rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap().0, limit);
    }

    #[test]
    fn zero_limits_are_rejected_with_the_field_named() {
        let zero_ip = ListenerLimits { max_connections_per_ip: 0, ..ListenerLimits::default() };
        assert!(zero_ip.validate().unwrap_err().contains("connections per IP"));
        let zero_idle = ListenerLimits { idle_timeout: Duration::ZERO, ..ListenerLimits::default() };
        assert!(zero_idle.validate().unwrap_err().contains("idle timeout"));
        assert_eq!(ListenerLimits::default().validate(), Ok(()));
    }
}
