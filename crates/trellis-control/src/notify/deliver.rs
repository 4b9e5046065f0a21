//! The delivery worker: reads the outbox (pending deliveries), POSTs the
//! oldest pending event of each notification when it is due, and writes the
//! attempt into the delivery's log.
//!
//! One attempt per notification at a time, so a notification's events arrive
//! in order (a later event waits while an earlier one is retried); at most
//! `max_in_flight` attempts in all. Attempts run outside any store
//! transaction with a deadline, so a slow or dead receiver holds up only its
//! own notification, never the API. Retry times live in memory (and in each
//! delivery's `nextAttemptAt`, which a restart starts from).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::SecureRandom;
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use trellis_model::{
    ConnectionNotification, ConnectionNotificationId, ConnectionNotificationSecret, DeliveryAttempt,
    NotificationDelivery, PENDING_DELIVERY_REF, Timestamp,
};
use trellis_store::{Filter, TxExt};

use super::WebhookSettings;
use super::sign::{EVENT_ID_HEADER, SIGNATURE_HEADER, signature_header};
use super::target::{GuardedResolver, check_url};
use crate::state::{AppState, now};

/// Rescan at least this often even when nothing is due (events recorded by
/// another control-plane replica wake no one here).
const IDLE_RESCAN: Duration = Duration::from_secs(30);
/// Wait after a failed store read before the next scan.
const STORE_RETRY: Duration = Duration::from_secs(5);
/// Most characters of an attempt's error text.
const MAX_ERROR_CHARS: usize = 500;

/// A delivery being attempted.
struct InFlight {
    notification: ConnectionNotificationId,
    event_id: String,
    created_at: Timestamp,
    failures_before: u32,
}

/// What one attempt needs.
struct Job {
    delivery: NotificationDelivery,
    url: String,
    secret: String,
}

struct Worker {
    state: AppState,
    settings: WebhookSettings,
    http: reqwest::Client,
    /// When each delivery that failed here is next due.
    due: HashMap<String, Instant>,
    in_flight: HashMap<tokio::task::Id, InFlight>,
    attempts: JoinSet<DeliveryAttempt>,
}

/// Runs the worker until `shutdown`; attempts in flight are abandoned then
/// (and made again after a restart: delivery is at least once).
///
/// Wakes when a write recorded events ([`AppState::webhooks`]), when a retry
/// falls due, and when an attempt ends.
pub async fn run(state: AppState, settings: WebhookSettings, shutdown: CancellationToken) {
    let http = match client(&settings) {
        Ok(http) => http,
        Err(e) => {
            tracing::error!(error = %e, "webhooks cannot be delivered: the HTTP client cannot be built");
            return;
        }
    };
    let recorded = state.webhooks.clone();
    let mut worker =
        Worker { state, settings, http, due: HashMap::new(), in_flight: HashMap::new(), attempts: JoinSet::new() };
    loop {
        let wake = worker.scan().await;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = recorded.notified() => {}
            () = tokio::time::sleep_until(wake) => {}
            Some(done) = worker.attempts.join_next_with_id() => worker.finish(done).await,
        }
    }
}

/// The HTTP client of every attempt: aws-lc and the system's roots for
/// https, the guarded resolver, no proxy from the environment, no redirects
/// (a 3xx is a failed attempt: following it could lead anywhere).
fn client(settings: &WebhookSettings) -> Result<reqwest::Client, String> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_platform_verifier())
        .map_err(|e| format!("TLS set-up failed: {e}"))?
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .dns_resolver(Arc::new(GuardedResolver { allow_private: settings.allow_private }))
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(settings.timeout.min(Duration::from_secs(5)))
        .timeout(settings.timeout)
        .user_agent(concat!("trellis-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| error_chain(&e))
}

impl Worker {
    fn busy(&self) -> HashSet<ConnectionNotificationId> {
        self.in_flight.values().map(|f| f.notification.clone()).collect()
    }

    /// Starts what is due and returns when to look again.
    async fn scan(&mut self) -> Instant {
        let busy = self.busy();
        let read = self
            .state
            .read(move |tx| {
                let pending = tx.list_obj::<NotificationDelivery>(&Filter::reference(PENDING_DELIVERY_REF))?;
                // The oldest pending delivery of each notification not being attempted.
                let mut heads: HashMap<ConnectionNotificationId, NotificationDelivery> = HashMap::new();
                for d in pending {
                    if busy.contains(&d.connection_notification_id) {
                        continue;
                    }
                    match heads.get(&d.connection_notification_id) {
                        Some(h) if h.sequence <= d.sequence => {}
                        _ => {
                            heads.insert(d.connection_notification_id.clone(), d);
                        }
                    }
                }
                let mut jobs = Vec::with_capacity(heads.len());
                for (id, delivery) in heads {
                    let notification = tx.get_obj::<ConnectionNotification>(id.as_str())?;
                    let secret = tx.get_obj::<ConnectionNotificationSecret>(id.as_str())?;
                    if let (Some(n), Some(s)) = (notification, secret) {
                        jobs.push(Job { delivery, url: n.url, secret: s.secret });
                    }
                }
                Ok(jobs)
            })
            .await;
        let mut jobs = match read {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(error = %e, "webhook delivery cannot read the store; retrying");
                return Instant::now() + STORE_RETRY;
            }
        };
        let (clock, wall) = (Instant::now(), SystemTime::now());
        let live: HashSet<&str> = jobs.iter().map(|j| j.delivery.event_id.as_str()).collect();
        let in_flight: HashSet<&str> = self.in_flight.values().map(|f| f.event_id.as_str()).collect();
        self.due.retain(|id, _| live.contains(id.as_str()) || in_flight.contains(id.as_str()));

        let mut wake = clock + IDLE_RESCAN;
        let mut ready = Vec::new();
        for job in jobs.drain(..) {
            let due = self.due.get(&job.delivery.event_id).copied().unwrap_or_else(|| {
                let at = job.delivery.next_attempt_at.map_or(wall, |t| t.system_time());
                clock + at.duration_since(wall).unwrap_or_default()
            });
            if due <= clock {
                ready.push((due, job));
            } else {
                wake = wake.min(due);
            }
        }
        // Longest-waiting first.
        ready.sort_by_key(|(due, _)| *due);
        for (_, job) in ready {
            if self.in_flight.len() >= self.settings.max_in_flight {
                break;
            }
            self.start(job);
        }
        wake
    }

    fn start(&mut self, job: Job) {
        let flight = InFlight {
            notification: job.delivery.connection_notification_id.clone(),
            event_id: job.delivery.event_id.clone(),
            created_at: job.delivery.created_at,
            failures_before: job.delivery.attempt_count,
        };
        let (http, allow_private) = (self.http.clone(), self.settings.allow_private);
        let task = self.attempts.spawn(async move { attempt(&http, &job, allow_private).await });
        self.in_flight.insert(task.id(), flight);
    }

    /// Writes the attempt into the delivery's log and schedules the next one.
    async fn finish(&mut self, done: Result<(tokio::task::Id, DeliveryAttempt), JoinError>) {
        let (task, attempt) = match done {
            Ok(done) => done,
            Err(e) => {
                let failed = DeliveryAttempt {
                    at: now(),
                    status_code: None,
                    error: Some("the delivery task failed".into()),
                    duration_ms: 0,
                };
                (e.id(), failed)
            }
        };
        let Some(flight) = self.in_flight.remove(&task) else { return };
        let now = now();
        let retry = if attempt.succeeded() {
            None
        } else {
            self.settings.retry.next(flight.failures_before.saturating_add(1), jitter(), flight.created_at, now)
        };
        match (attempt.succeeded(), retry) {
            (false, Some(wait)) => {
                self.due.insert(flight.event_id.clone(), Instant::now() + wait);
            }
            _ => {
                self.due.remove(&flight.event_id);
            }
        }
        let outcome = attempt.status_code.map_or_else(|| attempt.error.clone().unwrap_or_default(), |c| c.to_string());
        let id = flight.event_id.clone();
        let written = self
            .state
            .write(move |tx| {
                let Some(mut d) = tx.get_obj::<NotificationDelivery>(&id)? else { return Ok(None) };
                if d.state != trellis_model::DeliveryState::Pending {
                    return Ok(None);
                }
                d.finish_attempt(attempt.clone(), retry, now);
                tx.update_obj(&d)?;
                Ok(Some(d.state))
            })
            .await;
        match written {
            Ok(Some(state)) => {
                tracing::debug!(event_id = %flight.event_id, %outcome, ?state, "webhook attempt")
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(event_id = %flight.event_id, error = %e, "cannot record a webhook attempt"),
        }
    }
}

/// A number in [0, 1] from the system CSPRNG (0.5 if it fails).
fn jitter() -> f64 {
    let mut b = [0u8; 4];
    match aws_lc_rs::rand::SystemRandom::new().fill(&mut b) {
        Ok(()) => f64::from(u32::from_be_bytes(b)) / f64::from(u32::MAX),
        Err(_) => 0.5,
    }
}

/// One POST of `job`'s event, signed now.
async fn attempt(http: &reqwest::Client, job: &Job, allow_private: bool) -> DeliveryAttempt {
    let (at, started) = (now(), Instant::now());
    let result = send(http, job, allow_private).await;
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    match result {
        Ok(status) => DeliveryAttempt { at, status_code: Some(status), error: None, duration_ms },
        Err(error) => DeliveryAttempt { at, status_code: None, error: Some(error), duration_ms },
    }
}

async fn send(http: &reqwest::Client, job: &Job, allow_private: bool) -> Result<u16, String> {
    // Checked again: the URL may predate a restart without the flag. Names
    // are checked by the resolver, on the addresses actually dialled.
    let url = check_url(&job.url, allow_private)?;
    let body = serde_json::to_vec(&job.delivery.event).map_err(|e| format!("cannot encode the event: {e}"))?;
    let unix = Timestamp::new(SystemTime::now()).unix_seconds();
    let resp = http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, signature_header(job.secret.as_bytes(), unix, &body))
        .header(EVENT_ID_HEADER, &job.delivery.event_id)
        .body(body)
        .send()
        .await
        .map_err(|e| error_chain(&e))?;
    Ok(resp.status().as_u16())
}

/// An error and its causes, `: `-separated (reqwest's own message is only the outermost).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    if let Some((cut, _)) = out.char_indices().nth(MAX_ERROR_CHARS) {
        out.truncate(cut);
        out.push('…');
    }
    out
}
