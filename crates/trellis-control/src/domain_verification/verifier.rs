//! The verifier task: a loop that reads the PENDING verifications, times out
//! those past their deadline, starts a TXT lookup for each one that is due
//! (right after its creation, then with a doubling wait), and writes what each
//! lookup found.
//!
//! Lookups run outside any store transaction, each with a deadline, at most
//! `max_lookups` at once and `max_lookups_per_account` for one account. The
//! schedule lives in memory: after a restart every PENDING verification is
//! checked once more right away.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use trellis_model::{AccountId, CheckOutcome, DomainVerification, DomainVerificationId, DomainVerificationStatus};
use trellis_store::{Filter, TxExt};

use super::VerificationSettings;
use super::lookup::lookup_txt;
use crate::state::{AppState, now};

/// Rescan at least this often even when nothing is due (writes made by
/// another control-plane replica wake no one here).
const IDLE_RESCAN: Duration = Duration::from_secs(60);
/// Wait after a failed store read before the next scan.
const STORE_RETRY: Duration = Duration::from_secs(5);
/// Why lookups fail when there is no resolver at all.
const NO_RESOLVER: &str =
    "the control plane has no DNS resolver (none in /etc/resolv.conf); start it with --dns-resolver IP:PORT";

impl VerificationSettings {
    /// The wait after the `checks`-th unsuccessful check: `first_retry`, doubling, at most `max_retry`.
    pub fn retry_after(&self, checks: u32) -> Duration {
        let doublings = checks.saturating_sub(1).min(30);
        self.first_retry.saturating_mul(1 << doublings).min(self.max_retry)
    }
}

/// When a PENDING verification is next checked.
struct Schedule {
    checks: u32,
    next_due: Instant,
}

struct Verifier {
    state: AppState,
    settings: VerificationSettings,
    resolver: Option<SocketAddr>,
    schedule: HashMap<DomainVerificationId, Schedule>,
    /// The verification and account of each lookup in flight, by task.
    in_flight: HashMap<tokio::task::Id, (DomainVerificationId, AccountId)>,
    lookups: JoinSet<CheckOutcome>,
}

/// Runs the verifier until `shutdown`; lookups in flight are abandoned then.
///
/// Wakes when a verification is created ([`AppState::domain_checks`], so it
/// is checked at once), when a check falls due, and when a lookup ends.
pub async fn run(state: AppState, settings: VerificationSettings, shutdown: CancellationToken) {
    let resolver = settings.resolver.or_else(super::system_resolver);
    match resolver {
        Some(resolver) => tracing::info!(%resolver, "domain verification looks TXT records up through this resolver"),
        None => tracing::warn!("domain verification has no DNS resolver: {NO_RESOLVER}"),
    }
    let created = state.domain_checks.clone();
    let mut verifier = Verifier {
        state,
        settings,
        resolver,
        schedule: HashMap::new(),
        in_flight: HashMap::new(),
        lookups: JoinSet::new(),
    };
    loop {
        let wake = verifier.scan().await;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = created.notified() => {}
            () = tokio::time::sleep_until(wake) => {}
            Some(done) = verifier.lookups.join_next_with_id() => verifier.finish(done).await,
        }
    }
}

impl Verifier {
    fn account_in_flight(&self, account: &AccountId) -> usize {
        self.in_flight.values().filter(|(_, a)| a == account).count()
    }

    /// Times out, starts what is due, and returns when to look again.
    async fn scan(&mut self) -> Instant {
        let read = self.state.read(|tx| Ok(tx.list_obj::<DomainVerification>(&Filter::default())?)).await;
        let all = match read {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(error = %e, "domain verification cannot read the store; retrying");
                return Instant::now() + STORE_RETRY;
            }
        };
        let (now, clock, wall) = (now(), Instant::now(), SystemTime::now());
        let pending: Vec<DomainVerification> =
            all.into_iter().filter(|v| v.status == DomainVerificationStatus::Pending).collect();
        let live: HashSet<&DomainVerificationId> = pending.iter().map(|v| &v.id).collect();
        self.schedule.retain(|id, _| live.contains(id));
        let busy: HashSet<DomainVerificationId> = self.in_flight.values().map(|(id, _)| id.clone()).collect();

        let mut wake = clock + IDLE_RESCAN;
        let mut expired = Vec::new();
        let mut due = Vec::new();
        for v in pending {
            if busy.contains(&v.id) {
                continue;
            }
            let deadline = v.deadline(self.settings.timeout);
            if now >= deadline {
                expired.push(v.id);
                continue;
            }
            wake = wake.min(clock + deadline.system_time().duration_since(wall).unwrap_or_default());
            let next_due =
                self.schedule.entry(v.id.clone()).or_insert(Schedule { checks: 0, next_due: clock }).next_due;
            if next_due <= clock {
                due.push((next_due, v));
            } else {
                wake = wake.min(next_due);
            }
        }
        if !expired.is_empty() {
            self.time_out(expired, now).await;
        }
        // Longest-waiting first; an account at its cap waits for one of its own
        // lookups to end (which wakes the loop) without holding up the others.
        due.sort_by_key(|(next_due, _)| *next_due);
        for (_, v) in due {
            if self.in_flight.len() >= self.settings.max_lookups {
                break;
            }
            if self.account_in_flight(&v.account_id) < self.settings.max_lookups_per_account {
                self.start(v);
            }
        }
        wake
    }

    fn start(&mut self, v: DomainVerification) {
        let (resolver, timeout) = (self.resolver, self.settings.query_timeout);
        let (name, value) = (v.txt_record_name, v.txt_record_value);
        let task = self.lookups.spawn(async move { check(resolver, &name, &value, timeout).await });
        tracing::debug!(id = %v.id, "looking up the TXT record of a domain verification");
        self.in_flight.insert(task.id(), (v.id, v.account_id));
    }

    /// Schedules the next check and writes the outcome (unless the
    /// verification was deleted or decided meanwhile).
    async fn finish(&mut self, done: Result<(tokio::task::Id, CheckOutcome), JoinError>) {
        let (task, outcome) = match done {
            Ok(done) => done,
            Err(e) => (e.id(), CheckOutcome::Failed("the lookup task failed".into())),
        };
        let Some((id, _)) = self.in_flight.remove(&task) else { return };
        let entry = self.schedule.entry(id.clone()).or_insert(Schedule { checks: 0, next_due: Instant::now() });
        entry.checks += 1;
        entry.next_due = Instant::now() + self.settings.retry_after(entry.checks);
        let now = now();
        let key = id.clone();
        let written = self
            .state
            .write(move |tx| {
                let Some(mut v) = tx.get_obj::<DomainVerification>(key.as_str())? else { return Ok(false) };
                if v.status != DomainVerificationStatus::Pending {
                    return Ok(false);
                }
                let verified = v.apply_check(&outcome, now);
                tx.update_obj(&v)?;
                Ok(verified)
            })
            .await;
        match written {
            Ok(true) => tracing::info!(%id, "domain verified"),
            Ok(false) => {}
            Err(e) => tracing::warn!(%id, error = %e, "cannot record a domain verification check"),
        }
    }

    async fn time_out(&self, ids: Vec<DomainVerificationId>, now: trellis_model::Timestamp) {
        let timeout = self.settings.timeout;
        let written = self
            .state
            .write(move |tx| {
                let mut changed = 0;
                for id in &ids {
                    if let Some(mut v) = tx.get_obj::<DomainVerification>(id.as_str())?
                        && v.time_out_if_due(timeout, now)
                    {
                        tx.update_obj(&v)?;
                        changed += 1;
                    }
                }
                Ok(changed)
            })
            .await;
        match written {
            Ok(0) => {}
            Ok(n) => tracing::info!(count = n, "domain verifications timed out"),
            Err(e) => tracing::warn!(error = %e, "cannot time out domain verifications"),
        }
    }
}

/// Looks up `name` and compares its TXT records with `value`.
async fn check(resolver: Option<SocketAddr>, name: &str, value: &str, timeout: Duration) -> CheckOutcome {
    let Some(resolver) = resolver else { return CheckOutcome::Failed(NO_RESOLVER.into()) };
    match lookup_txt(resolver, name, timeout).await {
        Ok(records) if records.iter().any(|r| r.as_slice() == value.as_bytes()) => CheckOutcome::Found,
        Ok(records) if records.is_empty() => CheckOutcome::Missing,
        Ok(records) => CheckOutcome::Mismatch { records: records.len() },
        Err(e) => CheckOutcome::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_up_to_the_maximum() {
        let s = VerificationSettings {
            first_retry: Duration::from_secs(30),
            max_retry: Duration::from_secs(300),
            ..Default::default()
        };
        let waits: Vec<u64> = (1..=6).map(|n| s.retry_after(n).as_secs()).collect();
        assert_eq!(waits, [30, 60, 120, 240, 300, 300]);
        assert_eq!(s.retry_after(u32::MAX), Duration::from_secs(300), "no overflow");
    }
}
